"""crash: loadtest runs a version as three processes, kills orders (SIGKILL) and starts it again with
the same command line, and counts what was acknowledged and then lost. Its plumbing, here; the lesson
itself (v0.8 fails, v1.0 passes) is tests/test_lessons.py's."""
import asyncio
import os
import types

import pytest

import loadtest
from conftest import VERSIONS, group_alive, request, version_id

CRASH = loadtest.SCENARIOS["crash"]
V0_8, V1_0 = (next(p for p in VERSIONS if version_id(p) == v) for v in ("v0_8", "v1_0"))


def test_crash_kills_orders_once_with_retrying_clients_and_judges_what_was_acknowledged():
    assert [p["crash"] for p in CRASH["phases"]] == [False, True, False]
    assert CRASH["client_retries"] >= 2 and CRASH["client_retry_pause_s"] > 0
    assert CRASH["decisive"] == "lost_acked"
    assert {figure for figure, _, _ in CRASH["checks"]} == {
        "lost_acked", "duplicate_charges", "duplicate_orders", "orphan_charges", "restart_to_201_s"}
    assert "crash" in loadtest.LADDER["v1_0"][0]


def test_only_a_version_that_keeps_a_data_file_is_given_one():
    assert loadtest.keeps_data(V1_0) and not loadtest.keeps_data(V0_8)


@pytest.mark.parametrize("path", [V0_8, V1_0], ids=version_id)
def test_a_split_target_restarts_orders_on_the_same_port_and_leaves_nothing_behind(path):
    target = loadtest.SplitTarget.spawn(path, seed=7)
    helpers = [h.proc.pid for h in target.helpers]
    try:
        first = target.proc.pid
        assert request(target.urls["orders"] + "/health")[0] == 200
        killed, ready = target.crash_and_restart()
        assert target.proc.pid != first and not group_alive(first) and 0 < ready - killed < 10
        assert request(target.urls["orders"] + "/health")[0] == 200, "the same URL, a new process"
        assert request(target.urls["payment"] + "/stats")[0] == 200, "payment lived through it"
    finally:
        target.stop()
    assert not any(group_alive(pid) for pid in [target.proc.pid, *helpers])
    assert not os.path.exists(target.scratch), "its data directory is removed"
    assert target not in loadtest.RUNNING


def test_restart_to_201_counts_from_the_kill_to_the_first_201_after_it():
    run = types.SimpleNamespace(crashed_at=None, acked={"a": 1.0})
    assert loadtest.restart_to_201_s(run) is None, "no crash, no figure"
    run = types.SimpleNamespace(crashed_at=2.0, acked={"a": 1.0, "b": 2.5, "c": 2.3})
    assert loadtest.restart_to_201_s(run) == 0.3
    run = types.SimpleNamespace(crashed_at=2.0, acked={"a": 1.0})
    assert loadtest.restart_to_201_s(run) is None, "never: the check fails, it does not pass"


def test_a_client_pauses_before_it_tries_again():
    """Clients of the crash scenario retry 0.5 s later, not at once into a dead port."""
    async def main():
        loop = asyncio.get_running_loop()
        port = loadtest.free_port()  # nobody listens: every attempt fails at once
        message = loadtest.build_request("POST", "127.0.0.1", port, "/orders", {"item": "pen"})
        attempt = loadtest.Attempt("127.0.0.1", port, message, loadtest.ignore_answer, True)
        load = loadtest.Load([(0.0, "post")], lambda kind: loadtest.Request(kind, [attempt] * 3, 0.2))
        started = loop.time()
        await load.drive()
        return load.records[0], loop.time() - started

    record, took_s = asyncio.run(main())
    assert record.outcome == "conn" and record.attempts == 3
    assert took_s >= 0.4, f"two pauses of 0.2 s: {took_s:.2f} s"


def test_attach_mode_skips_a_scenario_that_kills_orders(tmp_path):
    from conftest import run_loadtest
    proc, _ = run_loadtest("--url", "http://127.0.0.1:9", "--payment-url", "http://127.0.0.1:9",
                           "--shipping-url", "http://127.0.0.1:9", "--scenario", "crash", "--quick", timeout_s=60)
    assert "skipped: it kills orders" in proc.stdout, proc.stdout + proc.stderr
