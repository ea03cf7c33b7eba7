"""The instrument itself: can loadtest.py be trusted?

Open loop (the schedule holds whatever the server does), latency from the intended send time
(no coordinated omission), client timeouts and connection errors counted, seeded plans, checks
with reasons, loopback-only safety, the CLI and the JSON shape, and cleanup on exit and Ctrl-C.
Every server here is an in-test asyncio server on 127.0.0.1 or a process this file starts.
"""
import asyncio
import contextlib
import io
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import (LOADTEST, ROOT, constant_plan, group_members, load_against, proc_cmdline, proc_stat,
                      read_ready, requester, run_loadtest, serve)

sys.path.insert(0, ROOT)
import loadtest  # noqa: E402

SCENARIO_NAMES = ["steady", "spike", "slow-payment", "slow-shipping", "hang-payment", "flaky-payment",
                  "retry-storm", "payment-down", "early-warning", "partial-failure", "overload", "capacity-drop",
                  "crash"]
HAS_PROC = os.path.isdir("/proc/self")


# --- helpers: in-test servers and load ---------------------------------------------------------


def lat(records):
    return [r.latency for r in records]


# --- helpers: processes (Linux /proc; only processes this file started) --------------------------


stat_of, cmdline_of = proc_stat, proc_cmdline  # (state, ppid, pgrp); the command line


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def threads_of(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def live_group(pgid):
    """The group's live members, read from /proc by conftest, not with loadtest's own check."""
    return group_members(pgid)


def wait_group_gone(pgid, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not live_group(pgid):
            return True
        time.sleep(0.02)
    return not live_group(pgid)


def find_child(parent_pid, needle, proc, timeout_s=30.0):
    """The pid of a child of parent_pid whose command line contains needle (polled with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for pid in all_pids():
            st = stat_of(pid)
            if st and st[1] == parent_pid and needle in cmdline_of(pid):
                return pid
        time.sleep(0.02)
    return None


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def loadtest_and_its_version(*args):
    """loadtest.py --target v0_1 ... in its own session, and the pid of the v0_1 it starts (None if not seen);
    both process groups are killed afterwards, whatever the test did."""
    lt, version = start_loadtest(*args), None
    try:
        version = find_child(lt.pid, "v0_1_naive.py", lt)
        yield lt, version
    finally:
        kill_group(lt.pid)
        if version:
            kill_group(version)
        if lt.poll() is None:
            lt.communicate()


def start_loadtest(*args):
    """loadtest.py as a process of its own session (its group is its pid)."""
    return subprocess.Popen([sys.executable, LOADTEST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


# === 1. percentile =================================================================================


def test_percentile_nearest_rank_on_known_lists():
    values = list(range(1, 101))
    assert loadtest.percentile(values, 50) == 50
    assert loadtest.percentile(values, 90) == 90
    assert loadtest.percentile(values, 99) == 99
    assert loadtest.percentile(values, 100) == 100
    assert loadtest.percentile(values, 1) == 1
    assert loadtest.percentile(values, 0) == 1
    assert loadtest.percentile(list(reversed(values)), 99) == 99  # order of the input does not matter
    assert loadtest.percentile([7.5], 0) == 7.5
    assert loadtest.percentile([7.5], 50) == 7.5
    assert loadtest.percentile([7.5], 100) == 7.5
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([3, 1, 2, 4], 50) == 2  # nearest rank: ceil(0.5 * 4) = 2nd, no interpolation
    assert loadtest.percentile([3, 1, 2, 4], 51) == 3
    assert loadtest.percentile([10, 20, 30], 99.9) == 30
    assert loadtest.percentile(list(range(1, 11)), 99.9) == 10


def test_percentile_rank_is_exact_for_every_q():
    assert loadtest.percentile(list(range(1, 1001)), 99.9) == 999
    for q in range(1, 101):
        assert loadtest.percentile(list(range(1, 101)), q) == q


def test_latency_summary_in_ms():
    summary = loadtest.latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert set(summary) == {"p50", "p90", "p99", "p999", "max"}
    assert summary["p50"] == 50.0 and summary["p90"] == 90.0 and summary["p99"] == 99.0
    assert summary["p999"] == 100.0 and summary["max"] == 100.0
    assert loadtest.latency_summary([]) == {k: None for k in ("p50", "p90", "p99", "p999", "max")}


# === 2. outcome_of, build_request ==================================================================


@pytest.mark.parametrize("status, outcome", [
    (200, "ok"), (201, "ok"), (204, "ok"), (503, "shed"), (429, "shed"), (502, "502"), (504, "504"),
    (404, "4xx"), (400, "4xx"), (409, "4xx"), (500, "5xx"), (501, "5xx")])
def test_outcome_of(status, outcome):
    assert loadtest.outcome_of(status) == outcome


def parse_request(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def test_build_request_with_body():
    raw = loadtest.build_request("POST", "127.0.0.1", 8080, "/orders", {"item": "mug", "qty": 2},
                                 {"Idempotency-Key": "k-1"})
    start, headers, body = parse_request(raw)
    assert start == "POST /orders HTTP/1.1"
    assert headers["host"] == "127.0.0.1:8080"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == "k-1"
    assert json.loads(body) == {"item": "mug", "qty": 2}


def test_build_request_without_body():
    start, headers, body = parse_request(loadtest.build_request("GET", "localhost", 9, "/orders/abc"))
    assert start == "GET /orders/abc HTTP/1.1"
    assert headers["connection"] == "close"
    assert headers["content-length"] == "0"
    assert body == b""
    assert "content-type" not in headers


def test_exchange_reads_a_response():
    async def main():
        server, port = await serve(lambda now: 0, status=201, body=b'{"order_id": "o-1"}')
        try:
            loop = asyncio.get_running_loop()
            request = loadtest.build_request("POST", "127.0.0.1", port, "/orders", {"item": "pen"})
            return await loadtest.round_trip("127.0.0.1", port, request, loop.time() + 5)
        finally:
            server.close()

    status, body = asyncio.run(main())
    assert status == 201
    assert json.loads(body) == {"order_id": "o-1"}


# === 3. the open loop keeps its schedule ===========================================================


def test_open_loop_keeps_schedule_against_slow_server():
    rate, seconds, service_s = 100, 2.0, 0.3
    plan = constant_plan(rate, seconds)
    peak = [0]

    async def main():
        server, port = await serve(lambda now: service_s)
        try:
            load = loadtest.Load(plan, requester(port), client_timeout_s=5.0)

            def on_tick(t):
                peak[0] = max(peak[0], load.in_flight)

            started = time.monotonic()
            await load.drive(on_tick)
            return load, time.monotonic() - started
        finally:
            server.close()

    load, wall_s = asyncio.run(main())
    recs = load.records
    outcomes = {r.outcome for r in recs}
    assert outcomes == {"ok"}, f"outcomes {outcomes}"
    assert sorted(r.intended for r in recs) == [p[0] for p in plan]
    lag_p99 = loadtest.percentile([r.lag for r in recs], 99)
    assert lag_p99 < 0.020, f"scheduler lag p99 {lag_p99 * 1000:.1f} ms: requests did not leave on schedule"
    # Little's law: 100/s x 0.3 s = ~30 in flight. A closed loop would have 1.
    assert peak[0] >= 10, f"in flight peaked at {peak[0]}: requests waited for earlier answers"
    latencies = lat(recs)
    assert min(latencies) >= service_s - 0.01
    assert loadtest.percentile(latencies, 50) < service_s + 0.15
    # 200 requests x 0.3 s would take 60 s one after the other; the open loop needs ~2.3 s
    assert wall_s < seconds + service_s + 2.0


# === 4. coordinated omission =======================================================================


def test_latency_is_measured_from_intended_time_through_a_stall():
    rate, seconds = 200, 2.5
    stall_from, stall_to = 0.7, 1.5  # 0.8 s of 2.5 s (32 %): every request arriving then waits until 1.5
    plan = constant_plan(rate, seconds)
    closed = []  # what a closed-loop client (time from its actual send, one request at a time) would report

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        start, end = t0 + stall_from, t0 + stall_to
        server, port = await serve(lambda now: end - now if start <= now < end else 0)
        try:
            load = loadtest.Load(plan, requester(port), client_timeout_s=5.0)
            load.t0 = t0
            request = loadtest.build_request("GET", "127.0.0.1", port, "/")

            async def closed_loop():
                for offset, _ in plan:
                    await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
                    sent = loop.time()
                    await loadtest.round_trip("127.0.0.1", port, request, sent + 5)
                    closed.append(loop.time() - sent)

            await asyncio.gather(load.drive(), closed_loop())
            return load
        finally:
            server.close()

    load = asyncio.run(main())
    recs = load.records
    assert len(recs) == len(plan) and {r.outcome for r in recs} == {"ok"}
    latencies = lat(recs)
    p50, p99 = loadtest.percentile(latencies, 50), loadtest.percentile(latencies, 99)
    assert p99 >= 0.5, f"p99 {p99 * 1000:.0f} ms hides a 0.8 s stall that a third of the requests sat through"
    assert p50 < 0.1, f"p50 {p50 * 1000:.0f} ms: most requests were answered at once"
    assert loadtest.latency_summary(latencies)["p99"] >= 500
    # Each request intended inside the stall waited until the stall's end, counted from its intended time,
    # and it was sent on time (not held back behind the stalled ones).
    inside = [r for r in recs if stall_from + 0.05 <= r.intended <= stall_to - 0.05]
    assert len(inside) >= 120
    for intended, lag, latency, *_ in inside:
        assert abs(latency - (stall_to - intended)) < 0.1, (intended, latency)
        assert lag < 0.05, f"request intended at {intended:.3f} s left {lag * 1000:.0f} ms late"
    slow_share = sum(1 for x in latencies if x >= 0.1) / len(latencies)
    assert 0.2 <= slow_share <= 0.4, slow_share
    # A closed-loop measurement of the same stall sees it once, and its p99 says everything was fine.
    assert len(closed) == len(plan)
    assert max(closed) >= 0.5
    assert loadtest.percentile(closed, 99) < 0.25


# === 5. client timeout, connection errors, the in-flight cap, retries ==============================


def test_client_timeout_against_a_server_that_never_answers():
    timeout_s = 0.5
    plan = constant_plan(50, 0.2)  # 10 requests

    recs = load_against(lambda now: None, plan, client_timeout_s=timeout_s).records
    assert len(recs) == len(plan)
    for r in recs:
        assert r.outcome == "timeout" and r.status == 0, r
        assert timeout_s - 0.01 <= r.latency <= timeout_s + 0.3, f"gave up after {r.latency:.3f} s"


def test_refused_connection_is_counted_as_conn():
    with socket.socket() as sock:  # bound but not listening: connecting is refused, and nobody else gets the port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        plan = constant_plan(50, 0.1)

        async def main():
            load = loadtest.Load(plan, requester(port), client_timeout_s=2.0)
            await load.drive()
            return load

        recs = asyncio.run(main()).records
    assert len(recs) == len(plan)
    for r in recs:
        assert r.outcome == "conn" and r.status == 0, r
        assert r.latency < 1.0


@pytest.mark.parametrize("plan", [constant_plan(100, 0.1), [(0.0, "post")] * 10], ids=["spaced", "due-together"])
def test_in_flight_cap_counts_requests_over_it(plan):
    """10 requests against a server that never answers, cap 3: 3 time out, 7 are counted as capped,
    whether they arrive 10 ms apart or all at once (the cap is counted at launch, not at first run)."""

    recs = load_against(lambda now: None, plan, client_timeout_s=0.4, max_in_flight=3).records
    assert len(recs) == len(plan), "capped requests are counted, never silently dropped"
    assert sorted(r.outcome for r in recs) == ["capped"] * 7 + ["timeout"] * 3


@pytest.mark.parametrize("status, outcome, attempts", [(503, "shed", 3), (201, "ok", 1), (404, "4xx", 1)])
def test_retrying_clients_record_attempts(status, outcome, attempts):
    plan = constant_plan(100, 0.05)  # 5 logical requests, each may try 3 times
    answers = []

    recs = load_against(lambda now: 0, plan, {"status": status, "body": b"{}"},
                        {"attempts": 3, "retry": True, "answers": answers}, client_timeout_s=2).records
    assert len(recs) == len(plan)
    assert {(r.outcome, r.status, r.attempts) for r in recs} == {(outcome, status, attempts)}
    assert len(answers) == len(plan) * attempts and {a[0] for a in answers} == {status}


# === 6. make_plan ==================================================================================


def test_make_plan_is_reproducible_with_a_seed():
    spike = loadtest.SCENARIOS["spike"]
    a = loadtest.make_plan(spike, 100, False, 7)
    b = loadtest.make_plan(spike, 100, False, 7)
    c = loadtest.make_plan(spike, 100, False, 8)
    assert a == b
    assert a[0] != c[0]


@pytest.mark.parametrize("name", ["steady", "spike"])
def test_make_plan_rate_matches_load_times_capacity(name):
    capacity = 100.0
    plan, phases = loadtest.make_plan(loadtest.SCENARIOS[name], capacity, False, 3)
    offsets = [t for t, _ in plan]
    assert offsets == sorted(offsets)
    assert all(0 <= t < phases[-1]["end"] for t in offsets)
    for ph in phases:
        length = ph["end"] - ph["start"]
        expected = ph["load"] * capacity * length
        got = sum(1 for t in offsets if ph["start"] <= t < ph["end"])
        if expected >= 400:  # long enough for the mean to be within 15 %
            assert abs(got - expected) <= 0.15 * expected, (ph["name"], got, expected)
        else:
            assert got > 0, ph["name"]
    assert {k for _, k in plan} == {"post"}


def test_make_plan_phases_carry_start_and_end():
    for name, scenario in loadtest.SCENARIOS.items():
        for quick in (False, True):
            _, phases = loadtest.make_plan(scenario, 100, quick, 1)
            key = "quick_s" if quick else "full_s"
            planned = [p for p in scenario["phases"] if p[key] > 0]  # --quick skips "before"
            assert [p["name"] for p in phases] == [p["name"] for p in planned], name
            assert phases[0]["start"] == 0
            for prev, nxt in zip(phases, phases[1:], strict=False):
                assert math.isclose(prev["end"], nxt["start"]), name
            for ph, spec in zip(phases, planned, strict=True):
                want = spec[key]
                assert math.isclose(ph["end"] - ph["start"], want), (name, ph["name"])
                assert ph["fault"] == spec["fault"] and ph["load"] == spec["load"]


def test_quick_phases_are_shorter():
    for name, scenario in loadtest.SCENARIOS.items():
        full_plan, full = loadtest.make_plan(scenario, 100, False, 1)
        quick_plan, quick = loadtest.make_plan(scenario, 100, True, 1)
        assert quick[-1]["end"] < full[-1]["end"], name
        assert len(quick_plan) < len(full_plan), name


def test_make_plan_duration_stretches_the_fault_window():
    _, phases = loadtest.make_plan(loadtest.SCENARIOS["spike"], 100, False, 1, duration_s=8)
    fault = [p for p in phases if p["fault"]]
    assert len(fault) == 1 and math.isclose(fault[0]["end"] - fault[0]["start"], 8)
    assert math.isclose(phases[0]["end"], 3) and math.isclose(phases[-1]["end"] - phases[-1]["start"], 8)
    _, phases = loadtest.make_plan(loadtest.SCENARIOS["spike"], 100, True, 1, duration_s=8)
    assert [(p["name"], p["end"] - p["start"]) for p in phases] == [("spike", 8)]  # --quick: no before, no after
    _, phases = loadtest.make_plan(loadtest.SCENARIOS["steady"], 100, True, 1, duration_s=2)
    assert math.isclose(phases[-1]["end"], 2)


def test_make_plan_mixes_gets_for_payment_down():
    plan, _ = loadtest.make_plan(loadtest.SCENARIOS["payment-down"], 100, False, 1)
    share = sum(1 for _, k in plan if k == "get") / len(plan)
    assert 0.4 <= share <= 0.6


# === 7. the verdict ====================================================================================


def test_the_verdict_passes_with_ok_reasons():
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["steady"], {"error_pct": 0.0, "p99_ms": 80.0}, [])
    assert verdict == "pass"
    assert len(reasons) == 2 and all(r.endswith("(ok)") for r in reasons)
    assert any("p99_ms" in r and "80" in r for r in reasons)


def test_the_verdict_fails_saying_which_bound():
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["steady"], {"error_pct": 0.0, "p99_ms": 300.0}, [])
    assert verdict == "fail"
    assert any("p99_ms = 300" in r and "needs <= 250" in r for r in reasons), reasons
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["hang-payment"],
                                      {"goodput_pct": 80.0, "p99_ms": 100.0, "held_open_after": 0}, [])
    assert verdict == "fail" and any("goodput_pct = 80" in r and ">= 95" in r for r in reasons), reasons


def test_an_overloaded_instrument_gives_no_verdict():
    """Past UNTRUSTED_LAG_MS of its own schedule lag, a pass or a fail becomes 'untrusted', saying why."""
    steady = loadtest.SCENARIOS["steady"]
    for p99_ms in (80.0, 300.0):  # a pass, a fail
        figures = {"error_pct": 0.0, "p99_ms": p99_ms, "schedule_lag_p99_ms": 2.2}
        verdict, reasons = loadtest.decide(steady, figures, [])
        assert verdict == ("pass" if p99_ms < 250 else "fail") and len(reasons) == 2
        got, lagged = loadtest.decide(steady, dict(figures, schedule_lag_p99_ms=160.0), [])
        assert got == "untrusted" and "160 ms behind" in lagged[0] and lagged[1:] == reasons
    assert loadtest.decide(steady, {"error_pct": 0.0, "p99_ms": 80.0, "schedule_lag_p99_ms": None}, [])[0] == "pass"


def test_a_run_that_did_not_do_what_its_scenario_says_fails_whatever_else():
    """A fault that was never set voids a run: it fails first, even when loadtest also lagged and every check
    passed, and the problem is its first reason."""
    figures = {"error_pct": 0.0, "p99_ms": 80.0, "schedule_lag_p99_ms": 160.0}
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["steady"], figures, ["could not set payment chaos"])
    assert verdict == "fail"
    assert reasons[0] == "could not set payment chaos" and "behind its own schedule" in reasons[1]
    assert all(r.endswith("(ok)") for r in reasons[2:]) and len(reasons) == 4


def test_a_run_ends_with_what_you_saw_why_and_next():
    """The terminal leads the way: the version's lesson in words, its mechanism, the next command."""
    out = io.StringIO()
    loadtest.print_story([{"target": "v0_1", "scenario": "spike", "verdict": "fail", "decisive": "p99_ms",
                           "figures": {"p99_ms": 4919.0}}], out)
    lines = out.getvalue().strip().splitlines()
    assert lines[0] == "What you saw: v0_1 fails spike (p99_ms 4,919)."
    assert lines[1].startswith("Why: nothing limits what comes in")
    assert "diff -u v0_1_naive.py v0_2_admission.py" in lines[2] and "--target v0_2" in lines[2]


def test_a_missing_figure_fails_with_a_reason():
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["steady"], {"error_pct": 0.0, "p99_ms": None}, [])
    assert verdict == "fail"
    assert any(r.startswith("p99_ms:") and "not measurable" in r and "<= 250" in r for r in reasons), reasons
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["retry-storm"], {"fault_amplification": 1.0}, [])
    assert verdict == "fail"
    assert any("recovery_s" in r and "never recovered" in r for r in reasons), reasons


def test_nothing_shed_is_not_a_failure():
    figures = {"timeouts": 0, "p99_ms": 200.0, "shed_p99_ms": None, "fault_goodput_x": 0.9}
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["spike"], figures, [])
    assert verdict == "pass", reasons
    assert any("shed_p99_ms" in r and "nothing shed" in r for r in reasons), reasons


def test_every_scenario_check_has_a_known_operator():
    assert list(loadtest.SCENARIOS) == SCENARIO_NAMES
    for name, scenario in loadtest.SCENARIOS.items():
        assert scenario["checks"], name
        for figure, op, bound in scenario["checks"]:
            assert op in ("<=", ">=") and isinstance(bound, (int, float)), (name, figure)
        assert scenario["decisive"] in [c[0] for c in scenario["checks"]], name


# === 8. recovery_time ==============================================================================


def timeline(rows):
    """rows: (errors, p99_ms) or (errors, p99_ms, shed) per second, 20 requests offered in each."""
    return [{"t": t, "offered": 20, "ok": 20 - row[0] - (row[2] if len(row) > 2 else 0), "errors": row[0],
             "shed": row[2] if len(row) > 2 else 0, "p99_ms": row[1], "fault": False} for t, row in enumerate(rows)]


def test_recovery_time_on_synthetic_timelines():
    healthy = (0, 50.0)
    tl = timeline([healthy] * 3 + [(5, 900.0)] * 2 + [(2, 50.0), (0, 700.0), healthy, (0, None), healthy])
    assert loadtest.recovery_time(tl, 5.0) == 2  # seconds 5 and 6 still bad, good from 7 on
    assert loadtest.recovery_time(timeline([healthy] * 10), 5.0) == 0
    assert loadtest.recovery_time(timeline([healthy] * 9 + [(1, 50.0)]), 5.0) is None  # bad at the end
    # a good second followed by a bad one does not count: recovery is "every later second is good"
    assert loadtest.recovery_time(timeline([healthy] * 5 + [healthy, (1, 40.0), healthy, healthy]), 5.0) == 2
    # p99 exactly at the bound is good, above is not
    bound = loadtest.RECOVERED_P99_MS
    assert loadtest.recovery_time(timeline([healthy] * 5 + [(0, bound + 1), (0, bound)]), 5.0) == 1
    # a fractional fault end: seconds are counted from the end of the fault
    assert loadtest.recovery_time(timeline([healthy] * 8), 4.5) == 0.5
    # shedding (nearly) everything is not recovered, even with a fast p99 of the few accepted
    assert loadtest.recovery_time(timeline([healthy] * 5 + [(0, 10.0, 15), (0, 10.0, 2), healthy]), 5.0) == 1
    # fault lasting until the end of the run: no second after it, never recovered
    assert loadtest.recovery_time(timeline([healthy] * 5), 5.0) is None


# === 9. check_loopback =============================================================================


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
                                 "http://127.0.0.2:9", "http://LOCALHOST:1/x"])
def test_check_loopback_allows_loopback(url):
    assert loadtest.check_loopback(url, False) is None
    assert loadtest.check_loopback(url, True) is None


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "http://example.com:8080/orders",
                                 "http://localhost.example.com:80", "http://127.0.0.1@example.com/",
                                 "http://[2001:db8::1]:80", "127.0.0.1:8080"])
def test_check_loopback_refuses_remote(url):
    with pytest.raises(SystemExit) as err:
        loadtest.check_loopback(url, False)
    assert "loopback" in str(err.value)
    loadtest.check_loopback(url, True)  # allowed when asked for; no traffic is sent by the check


# === 10. CLI =======================================================================================


def run_cli(*args, timeout_s=30):
    return subprocess.run([sys.executable, LOADTEST, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def test_cli_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--target", "--compare", "--quick", "--json", "--calibrate", "--scenario", "--url", "--list"):
        assert option in proc.stdout, option


def test_cli_list_names_all_thirteen_scenarios():
    proc = run_cli("--list")
    assert proc.returncode == 0, proc.stderr
    for name in SCENARIO_NAMES:
        assert f"  {name}:" in proc.stdout, name
    assert proc.stdout.count("pass when:") == len(SCENARIO_NAMES) == 13


# (the command lines refused before anything starts: tests/test_cli_safety.py)


# === 11. a real run: JSON shape, nothing left behind ===============================================


def test_json_shape_and_html_report_of_a_quick_steady_run(tmp_path):
    report = tmp_path / "report.html"
    proc, data = run_loadtest("--target", "v0_1", "--scenario", "steady", "--quick", "--duration", "2",
                              "--report", str(report), timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = report.read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and "<table>" in page and "<h2>steady</h2>" in page and ">v0_1<" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page, "self-contained"
    assert isinstance(data, dict) and list(data) == ["runs"]
    assert isinstance(data["runs"], list) and len(data["runs"]) == 1
    run = data["runs"][0]
    assert run["target"] == "v0_1" and run["scenario"] == "steady"
    assert run["verdict"] in ("pass", "fail")
    assert isinstance(run["reasons"], list) and run["reasons"] and all(isinstance(r, str) for r in run["reasons"])
    assert (run["verdict"] == "pass") == all(r.endswith("(ok)") for r in run["reasons"])
    latency = run["latency_ms"]
    assert set(latency) == {"p50", "p90", "p99", "p999", "max"}
    figures = [latency[k] for k in ("p50", "p90", "p99", "p999", "max")]
    assert None not in figures and figures == sorted(figures), figures
    counts = run["counts"]
    assert set(loadtest.OUTCOMES) <= set(counts) and "sent" in counts
    total = sum(counts[o] for o in loadtest.OUTCOMES)
    assert 50 <= total <= 170, f"{total} requests for 2 s at 0.5 x 100/s"
    assert counts["sent"] == total - counts["capped"]
    assert isinstance(run["ground_truth"], dict)
    assert {"duplicate_charges", "lost_orders", "amplification"} <= set(run["ground_truth"])
    assert "recovery_s" in run and run["recovery_s"] is None  # steady has no fault to recover from
    tl = run["timeline"]
    assert isinstance(tl, list) and len(tl) == 2
    for t, second in enumerate(tl):
        assert {"offered", "ok", "shed", "errors", "p99_ms", "fault"} <= set(second)
        assert second["t"] == t and second["fault"] is False
        assert second["ok"] + second["shed"] + second["errors"] <= second["offered"]
    assert sum(s["offered"] for s in tl) == total
    assert sum(s["ok"] for s in tl) == counts["ok"]
    # the report draws a short run in sub-second buckets, kept in the run as "chart"
    chart = run["chart"]
    assert chart["bucket_s"] == 0.1 and len(chart["rows"]) == 20
    assert sum(row["ok"] for row in chart["rows"]) == counts["ok"]
    drawn = [line.split('points="')[1].split('"')[0].split() for line in page.split("<polyline")[1:]]
    assert [len(points) for points in drawn] == [20, 20], "20 points a chart, not one a second"
    assert "per 0.1 s" in page


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to find the version's process")
def test_normal_exit_leaves_no_process_behind():
    with loadtest_and_its_version("--target", "v0_1", "--scenario", "steady", "--quick", "--duration", "1") as (
            lt, version):
        out, err = lt.communicate(timeout=120)
        assert lt.returncode == 0, err[-2000:]
        assert "steady" in out
        assert version is not None, "did not see the version process while loadtest ran"
        assert wait_group_gone(version, 3.0), f"left behind: {live_group(version)}"
        assert wait_group_gone(lt.pid, 3.0)


def wait_until_under_load(version, lt):
    """v0_1 has 4 resident threads once it is ready; under load its thread-per-connection server has more."""
    deadline = time.monotonic() + 20
    while threads_of(version) < 5 and time.monotonic() < deadline and lt.poll() is None:
        time.sleep(0.005)
    assert threads_of(version) >= 5, "the load never started (or the version died)"
    assert len(live_group(version)) == 3, "orders, payment and shipping share the version's process group"


# === 12. Ctrl-C and SIGTERM clean up ===============================================================


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to find the version's process")
@pytest.mark.parametrize("when", ["under-load", "while-starting"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_everything(sig, when):
    with loadtest_and_its_version("--target", "v0_1", "--scenario", "steady", "--quick") as (lt, version):
        assert version is not None, "did not see the version process start"
        assert stat_of(version)[2] == version, "the version runs in its own process group"
        if when == "under-load":
            wait_until_under_load(version, lt)
        assert lt.poll() is None, "loadtest ended before it was interrupted"
        os.kill(lt.pid, sig)
        started = time.monotonic()
        _, err = lt.communicate(timeout=15)
        assert time.monotonic() - started < 10, "loadtest took too long to stop"
        assert lt.returncode == 130, (lt.returncode, err[-2000:])
        assert "interrupted" in err
        assert wait_group_gone(version, 5.0), f"left behind: {live_group(version)}"
        assert wait_group_gone(lt.pid, 5.0)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to find the target's process")
def test_ctrl_c_while_a_target_never_gets_ready_stops_at_once(tmp_path):
    """Found by trying: the wait for READY ran in a worker thread for up to 20 s, and a Ctrl-C
    waited for it (19.3 s measured) while the target and the canary ran on."""
    silent = tmp_path / "my_silent.py"
    silent.write_text("import time\ntime.sleep(60)\n")
    lt = start_loadtest("--target", str(silent), "--scenario", "steady", "--quick")
    try:
        target = find_child(lt.pid, "my_silent.py", lt)
        assert target is not None, "did not see the target start"
        os.kill(lt.pid, signal.SIGINT)
        started = time.monotonic()
        _, err = lt.communicate(timeout=15)
        assert time.monotonic() - started < 3, "Ctrl-C waited for the target's READY timeout"
        assert lt.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert wait_group_gone(target, 5.0), f"left behind: {live_group(target)}"
    finally:
        kill_group(lt.pid)
        if lt.poll() is None:
            lt.communicate()


def test_ctrl_c_still_prints_the_matrix_of_what_was_measured():
    lt = start_loadtest("--compare", "v0_1,v0_2", "--scenario", "steady", "--quick")
    try:
        seen, deadline = b"", time.monotonic() + 60  # raw reads: readline() would buffer lines select() cannot see
        while b"PASS:" not in seen and b"FAIL:" not in seen and time.monotonic() < deadline:
            if select.select([lt.stdout], [], [], 1.0)[0]:
                seen += os.read(lt.stdout.fileno(), 65536)
        assert "v0_1 · steady" in seen.decode(), seen
        assert b"v0_2 \xc2\xb7 steady" not in seen, "too late to interrupt: the second run is over"
        os.kill(lt.pid, signal.SIGINT)
        rest, err = lt.communicate(timeout=30)
        out = seen.decode() + rest
        assert lt.returncode == 130 and "interrupted" in err
        matrix = out[out.index("Lesson matrix"):]
        assert "v0_1" in matrix and "steady (p99_ms)" in matrix, out
    finally:
        kill_group(lt.pid)
        if lt.poll() is None:
            lt.communicate()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to find the version's process")
def test_kill_9_of_loadtest_orphans_nothing():
    """SIGKILL cannot be caught: the version notices its parent is gone and stops itself and its children."""
    with loadtest_and_its_version("--target", "v0_1", "--scenario", "steady", "--quick") as (lt, version):
        assert version is not None, "did not see the version process start"
        wait_until_under_load(version, lt)  # long past READY and its banner
        os.kill(lt.pid, signal.SIGKILL)
        lt.communicate(timeout=15)
        assert wait_group_gone(version, 10.0), f"left behind: {live_group(version)}"


FAKE_VERSION = """
import http.server, json, sys, time


class Orders(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"order_id": "o"}'
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Orders)
print("READY " + json.dumps({"orders": "http://127.0.0.1:%d" % server.server_address[1]}), flush=True)
time.sleep(0.5)  # descheduled between READY and the banner, as happens on a busy machine
print("a banner for humans, like every version prints after READY", flush=True)
server.serve_forever()
"""


def test_a_version_may_print_after_ready(tmp_path):
    """Regression: loadtest used to close the version's stdout after READY, so a banner printed a moment
    later raised BrokenPipeError and killed the version (every request then 'conn', verdict FAIL)."""
    fake = tmp_path / "fake_banner.py"
    fake.write_text(FAKE_VERSION)
    proc, data = run_loadtest("--target", str(fake), "--scenario", "steady", "--quick", "--duration", "1",
                              timeout_s=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = data["runs"][0]["counts"]
    assert counts["conn"] == 0 and counts["ok"] == counts["sent"] > 0, counts


# === the calibration responder =====================================================================


def test_trivial_responder_answers_an_open_loop():
    proc = subprocess.Popen([sys.executable, LOADTEST, "--responder", "trivial"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        urls = read_ready(proc, 20)
        assert urls, "the responder printed no READY line"
        url = urls["orders"]
        host, port = url.split("//")[1].rsplit(":", 1)
        assert host == "127.0.0.1"
        plan = constant_plan(200, 1.0, kind="get")
        request = loadtest.build_request("GET", host, int(port), "/")

        async def main():
            attempt = loadtest.Attempt(host, int(port), request, loadtest.ignore_answer, False)
            load = loadtest.Load(plan, lambda kind: loadtest.Request(kind, [attempt]))
            await load.drive()
            return load

        recs = asyncio.run(main()).records
        assert len(recs) == len(plan)
        assert {(r.outcome, r.status) for r in recs} == {("ok", 200)}
        assert loadtest.percentile(lat(recs), 50) < 0.1
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert wait_group_gone(proc.pid, 5.0)
    finally:
        kill_group(proc.pid)
        proc.communicate()


def test_probe_measures_both_dependencies():
    proc = subprocess.run([sys.executable, LOADTEST, "--target", "v0_1", "--probe", "--quick"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if "p999" in line}
    assert set(lines) == {"payment", "shipping"}, proc.stdout
    p999 = {name: float(line.split("p999 ")[1].split()[0].replace(",", "")) for name, line in lines.items()}
    assert 40 <= p999["payment"] < 2000 and 0 < p999["shipping"] < 2000, p999  # 40 ms is payment's service time


def test_amplification_counts_work_not_cheap_refusals():
    """Amplification is payment's slot-taking work per order that reached it; 409s and replays are calls only."""
    run = "r"
    before = {"payment": {"calls": 0, "zombie": 0}}
    after = {"payment": {"calls": 9, "zombie": 1, "held_open": 0, "queue_peak": 3,
                         "refs": {"r-1": 1, "r-2": 1, "r-3": 1, "other-9": 4},
                         "calls_by_ref": {"r-1": 5, "r-2": 1, "r-3": 3, "other-9": 4},  # r-1: one charge, four 409s
                         "work_by_ref": {"r-1": 1, "r-2": 1, "r-3": 3, "other-9": 4}}}  # r-3: two failed tries
    truth = loadtest.ground_truth(before, after, run, {"r-1": 1.0, "r-2": 1.0}, {"r-3"}, [])
    assert truth["amplification"] == round(5 / 3, 2)  # other runs' refs do not count
    assert truth["fault_amplification"] == 3.0
    assert truth["calls_per_order"] == 3.0
    assert truth["orphan_charges"] == 1  # r-3 was charged, and its client was told it failed
    assert truth["duplicate_charges"] == 0


@pytest.mark.parametrize("seconds", [3, 21, 111, 600])
def test_report_chart_ticks_any_run_length(seconds):
    """A --duration run up to 600 s draws its time axis (a 111 s run once raised StopIteration)."""
    chart = loadtest.svg_chart([("v0_1", "#000", [(t, 1.0) for t in range(seconds)])], (1, seconds - 1), "t", "ms")
    ticks = chart.count('text-anchor="middle">')
    assert chart.startswith("<svg") and 3 <= ticks <= 12, ticks


@pytest.mark.parametrize("seconds, bucket", [(2, 0.1), (3, 0.1), (6.25, 0.25), (9, 0.25), (12, 0.5),
                                             (20, 1), (600, 1)])
def test_chart_buckets_are_finer_the_shorter_the_run(seconds, bucket):
    assert loadtest.chart_bucket_s(seconds) == bucket
    assert seconds / bucket >= loadtest.MIN_CHART_POINTS


def test_chart_rows_bucket_successes_by_intended_send_time():
    record = lambda t, outcome="ok", latency=0.01: loadtest.Record(t, 0.0, latency, "post", outcome, 201, 1)  # noqa: E731
    records = [record(0.05), record(0.12, latency=0.2), record(0.15, latency=0.03), record(0.11, "shed"),
               record(0.1 * 3), record(0.95, latency=0.5), record(1.0)]  # 0.1 * 3 is 0.30000000000000004
    rows = loadtest.build_chart(records, 1.0, 0.1)
    assert [row["t"] for row in rows] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert [row["ok"] for row in rows] == [1, 2, 0, 1, 0, 0, 0, 0, 0, 2]  # shed is not goodput; 1.0 ends the run
    assert rows[1]["p99_ms"] == 200.0 and rows[2]["p99_ms"] is None and rows[9]["p99_ms"] == 500.0
    assert loadtest.chart_of(records, 1.0)["chart"]["bucket_s"] == 0.1
    assert loadtest.chart_of(records, 30.0) == {}, "a long run's chart is its timeline"


def report_result(target, seconds, chart):
    """A run as --json has it, as much of it as the report reads."""
    timeline = [{"t": t, "ok": 100, "p99_ms": 50.0, "fault": 1 <= t < 2} for t in range(seconds)]
    result = {"target": target, "scenario": "spike", "verdict": "pass", "reasons": ["p99_ms = 50 <= 1000 (ok)"],
              "decisive": "p99_ms", "figures": {"p99_ms": 50.0}, "timeline": timeline}
    if chart:
        result["chart"] = {"bucket_s": 0.25, "rows": [{"t": k / 4, "ok": 25, "p99_ms": 40.0 + k}
                                                      for k in range(4 * seconds)]}
    return result


def test_report_draws_a_short_run_finer_than_its_seconds_and_an_older_json_per_second(tmp_path):
    path = tmp_path / "report.html"
    loadtest.write_report([report_result("v0_1", 3, chart=True), report_result("v0_2", 3, chart=False)], path)
    page = path.read_text(encoding="utf-8")
    drawn = [line.split('points="')[1].split('"')[0].split() for line in page.split("<polyline")[1:]]
    assert [len(points) for points in drawn] == [12, 3, 12, 3], "v0_1 in 0.25 s buckets, v0_2 per second"
    assert "p99 latency of successful requests, per 0.25 s or second" in page
    assert "goodput: successful requests per second, counted per 0.25 s or second" in page
    # 25 successes in 0.25 s are 100 req/s, as 100 in a second are: one axis, topped at 100
    goodput = page.split("<svg")[2]
    assert 'text-anchor="end">100</text>' in goodput and 'text-anchor="end">200</text>' not in goodput
    assert len({point.split(",")[1] for point in drawn[2] + drawn[3]}) == 1, "the same height, both lines"
    loadtest.write_report([report_result("v0_2", 3, chart=False)], path)
    page = path.read_text(encoding="utf-8")
    assert "successful requests, per second" in page and "counted per" not in page
