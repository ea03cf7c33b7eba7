"""The simulated world (identical in every version, so v0.1's copy stands for all): the
dependencies keep the capacity they are given, whatever the host is doing."""

import asyncio
import time

from conftest import VERSIONS, load_version


def test_a_busy_event_loop_costs_the_simulated_payment_no_capacity():
    """The world is the same in every version (v0.1's copy here). Payment's 4 slots of 40 ms
    serve 100 calls/s while its event loop is stalled 8 ms in every 10 (a busy core): a slot's
    next call starts when the last was due to end, not when a late wake-up noticed it. Timed
    from each late wake-up instead, it served 94 calls/s."""
    module = load_version(VERSIONS[0])
    calls = 120

    async def serve_all():
        payment = module.Dependency("payment", 4, 40, seed=1)
        payment.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        dispatcher = asyncio.ensure_future(payment.dispatch())
        jobs = []
        started = time.monotonic()
        for n in range(calls):
            job = {"ref": str(n), "key": None, "gone": False, "eof": False, "committed": False}
            job.update(deadline=None, queued_at=started, done=loop.create_future())
            payment.queue.put_nowait(job)
            jobs.append(job["done"])

        def stall():  # the busy core: the loop runs nothing else for 8 ms, every 10 ms
            time.sleep(0.008)
            if not all(done.done() for done in jobs):
                loop.call_later(0.002, stall)

        loop.call_soon(stall)
        await asyncio.gather(*jobs)
        dispatcher.cancel()
        return time.monotonic() - started, payment.stats["commits"]

    elapsed_s, commits = asyncio.run(serve_all())
    assert commits == calls
    nominal_s = calls / 4 * 0.040
    assert elapsed_s <= nominal_s / 0.97 + 0.010, f"{calls / elapsed_s:.1f} calls/s of 100"


def test_a_slot_the_workers_knob_takes_away_takes_its_schedule_with_it():
    """Half the workers, half the capacity: 2 slots of 40 ms serve 50 calls/s, whatever the 4
    served before (a schedule kept for a slot out of service gave 65/s: found by a reviewer).
    And 64 slots for a moment, then the 4 again: 100/s, not more."""
    module = load_version(VERSIONS[0])

    async def rate_after(*knobs):
        payment = module.Dependency("payment", 4, 40, seed=1)
        payment.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        dispatcher = asyncio.ensure_future(payment.dispatch())
        for n in range(1000):  # never short of work
            job = {"ref": str(n), "key": None, "gone": False, "eof": False, "committed": False}
            job.update(deadline=None, queued_at=time.monotonic(), done=loop.create_future())
            payment.queue.put_nowait(job)
        for knobs_now in knobs:
            await asyncio.sleep(0.2)
            payment.set_chaos(knobs_now)
        await asyncio.sleep(0.2)  # the calls started before the last change have ended
        commits, started = payment.stats["commits"], time.monotonic()
        await asyncio.sleep(1.0)
        rate = (payment.stats["commits"] - commits) / (time.monotonic() - started)
        dispatcher.cancel()
        return rate

    assert 45 <= asyncio.run(rate_after({"workers": 2})) <= 53
    assert 90 <= asyncio.run(rate_after({"workers": 64}, {})) <= 105
