"""Defects found in loadtest.py, each pinned by the test that failed before its fix."""
import asyncio

from conftest import serve

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
            await run.load.run()
            return run.load.records
        finally:
            server.close()

    records = sorted(asyncio.run(main()), key=lambda r: r.intended)
    assert [h.split()[0] for h in heard] == ["POST", "POST", "GET"], heard
    assert heard[2] == "GET /orders/o-1 HTTP/1.1"
    assert [r.kind for r in records] == ["post", "post", "get"], records
