"""Defects found in loadtest.py, each pinned by the test that failed before its fix."""
import asyncio
import contextlib
import io
import os
import signal
import time

from conftest import group_alive, serve

import loadtest


def test_a_get_planned_before_any_order_is_recorded_as_the_post_it_was_sent_as():
    """payment-down mixes GETs of placed orders into the plan; a GET due before any order was placed
    has no id to read, so it is sent as a POST, and must be recorded as one (it was kind="get")."""
    heard = []
    plan = [(0.0, "get"), (0.15, "post"), (0.4, "get")]

    async def main():
        server, port = await serve(lambda now: 0, status=201, body=b'{"order_id": "o-1"}', heard=heard)
        try:
            target = loadtest.Target("fake", {"orders": f"http://127.0.0.1:{port}"})
            run = loadtest.Run(target, "payment-down", 100, True, 1)
            run.load = loadtest.Load(plan, loadtest.request_maker(run))
            await run.load.drive()
            return run.load.records
        finally:
            server.close()

    records = sorted(asyncio.run(main()), key=lambda r: r.intended)
    assert [h.split()[0] for h in heard] == ["POST", "POST", "GET"], heard
    assert heard[2] == "GET /orders/o-1 HTTP/1.1"
    assert [r.kind for r in records] == ["post", "post", "get"], records


def test_a_version_name_keeps_every_digit(tmp_path, monkeypatch):
    """v1_10 is not v1_1: the name is read up to the second underscore, not as four characters, and
    versions are ordered by number, so the story's next step after v1_2 is v1_10."""
    assert loadtest.version_name("./v0_3_backpressure.py") == "v0_3"
    assert loadtest.version_name("v1_10_sharded.py") == "v1_10"
    assert loadtest.version_name("/x/fake_version.py") == "fake_version"
    for name in ("v0_9_a.py", "v1_10_c.py", "v1_2_b.py"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr(loadtest, "HERE", str(tmp_path))
    assert loadtest.available_versions() == ["v0_9", "v1_2", "v1_10"]
    path, why = loadtest.find_version("v1_10")
    assert why is None and os.path.basename(path) == "v1_10_c.py"
    assert loadtest.find_version("v1_1")[0] is None
    monkeypatch.setitem(loadtest.LADDER, "v1_2", (["steady"], []))
    out = io.StringIO()
    loadtest.print_story([{"target": "v1_2", "scenario": "steady", "verdict": "pass", "decisive": "p99_ms",
                           "figures": {"p99_ms": 50.0}}], out)
    assert "diff -u v1_2_b.py v1_10_c.py" in out.getvalue(), out.getvalue()


SLOW_TO_STOP = """import json, signal, sys, time
def stop(*_):
    time.sleep(1.0)  # a version that takes a second to shut down
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("READY " + json.dumps({"orders": "http://127.0.0.1:9"}), flush=True)
while True:
    signal.pause()
"""


def run_then_kill(main, pgids):
    """asyncio.run(main()), then SIGKILL every process group it started, whatever happened."""
    try:
        return asyncio.run(main())
    finally:
        for pid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_stopping_a_target_does_not_block_the_event_loop(tmp_path):
    """A target that takes a second to stop must not freeze the loop for that second (stop() waited for
    the process group with time.sleep inside the event loop: up to ~10 s with nothing else running)."""
    fake = tmp_path / "slow_to_stop.py"
    fake.write_text(SLOW_TO_STOP)
    gaps = []
    pgid = []

    async def main():
        loop = asyncio.get_running_loop()
        spawner = loadtest.Spawner(seed=1)
        spawner.prepare((str(fake), "steady"))
        target = await spawner.ahead[1]
        pgid.append(target.proc.pid)

        async def ticker():
            last = loop.time()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - last)
                last = loop.time()

        ticking = asyncio.ensure_future(ticker())
        while not gaps:  # the ticker is running
            await asyncio.sleep(0.005)
        started = time.monotonic()
        await (await spawner.take(str(fake), "steady")).stop_in_thread()  # SIGTERM, and its second
        took_s = time.monotonic() - started
        ticks = len(gaps)
        while len(gaps) == ticks:  # the tick that was due while the stop ran has been measured
            await asyncio.sleep(0.005)
        ticking.cancel()
        return took_s

    took_s = run_then_kill(main, pgid)
    assert took_s >= 0.9, f"stopped in {took_s:.2f} s: the fake was meant to take a second"
    assert not group_alive(pgid[0])
    assert max(gaps) < 0.3, f"the event loop froze for {max(gaps):.2f} s while a target stopped"


def test_a_run_over_is_killed_at_once_not_waited_for(tmp_path):
    """Once a run's ground truth is read its target is SIGKILLed: a version's graceful stop (up to 2.5 s
    of shipping what is left; 0.5 s for v0.3 after a partial-failure) measured nothing and held up the
    next run of a matrix. So is a target started for a run that will not come (Spawner.close)."""
    fake = tmp_path / "slow_to_stop.py"
    fake.write_text(SLOW_TO_STOP)
    pgid = []

    async def main():
        spawner = loadtest.Spawner(seed=1)
        target = await spawner.take(str(fake), "steady")
        pgid.append(target.proc.pid)
        spawner.prepare((str(fake), "steady"))
        pgid.append((await spawner.ahead[1]).proc.pid)
        started = time.monotonic()
        await target.stop_in_thread(at_once=True)
        await spawner.close()
        return time.monotonic() - started

    took_s = run_then_kill(main, pgid)
    assert took_s < 0.5, f"two targets stopped in {took_s:.2f} s: each was waited for (1 s)"
    assert len(pgid) == 2 and not any(group_alive(pid) for pid in pgid)
    assert not [t for t in loadtest.RUNNING if t.proc.pid in pgid], "both forgotten: nothing to stop at exit"
