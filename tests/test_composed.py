"""v1.0 on its own terms: one deadline budget end to end, and an acknowledged order is never lost.

The deadline: X-Deadline-Ms (relative milliseconds, like gRPC's grpc-timeout) is checked, bounds the whole
request from accept to answer, is refused before any work when too short to succeed, and is re-encoded for
payment, which drops work nobody waits for. Redelivery: an order placed while shipping is down is shipped
once shipping is back, exactly once. Conditions are polled with a deadline, never slept on.
"""
import threading
import time

import pytest
from conftest import request, service_fixture, versions_from

COMPOSED = versions_from("v1_0")
ORDER = {"item": "pen", "qty": 1, "customer": "ada"}


svc = service_fixture(COMPOSED)


def post(svc, body, headers=None, timeout_s=10.0):
    return request(svc.urls["orders"] + "/orders", "POST", body, headers, timeout_s)


def stats(svc, role):
    return request(svc.urls[role] + "/stats?refs=1")[2]


def chaos(svc, role, knobs):
    assert request(svc.urls[role] + "/chaos", "POST", knobs)[0] == 200


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "10001", "9" * 40, ""])
def test_a_bad_deadline_is_400(svc, value):
    status, _, body = post(svc, ORDER, {"X-Deadline-Ms": value})
    assert status == 400 and body["error"] == "invalid X-Deadline-Ms", body


def test_a_deadline_too_short_to_succeed_is_504_before_any_work(svc):
    calls = stats(svc, "payment")["calls"]
    status, _, body = post(svc, {**ORDER, "ref": "too-short"}, {"X-Deadline-Ms": "5"})
    assert status == 504 and body["error"] == "deadline exceeded", body
    assert stats(svc, "payment")["calls"] == calls, "no work for a request that cannot finish in time"


def test_the_deadline_bounds_the_whole_request_and_travels_to_payment(svc):
    chaos(svc, "payment", {"latency_factor": 10})  # 400 ms a charge
    started = time.monotonic()
    status, _, body = post(svc, {**ORDER, "ref": "bounded"}, {"X-Deadline-Ms": "150"})
    elapsed = time.monotonic() - started
    assert status in (502, 504), body
    assert elapsed < 0.4, f"a 150 ms budget answered after {elapsed:.2f} s"
    chaos(svc, "payment", {})
    status, _, body = post(svc, {**ORDER, "ref": "roomy"}, {"X-Deadline-Ms": "2000"})
    assert status == 201, body


def test_payment_drops_work_whose_deadline_passed(svc):
    """Queue charges behind a slow payment with short budgets: payment skips the ones nobody waits for."""
    chaos(svc, "payment", {"latency_factor": 10})  # 400 ms a charge, 4 at a time: the next 4 start too late
    threads = [threading.Thread(target=post, args=(svc, {**ORDER, "ref": f"q-{i}"}, {"X-Deadline-Ms": "250"}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    chaos(svc, "payment", {})
    wait_for(lambda: stats(svc, "payment")["queue_depth"] == 0, 5, "payment's queue to drain")
    assert stats(svc, "payment")["expired_dropped"] > 0, stats(svc, "payment")


def test_an_order_placed_while_shipping_is_down_ships_once_it_is_back(svc):
    chaos(svc, "shipping", {"down": True})
    status, _, order = post(svc, {**ORDER, "ref": "redeliver-me"})
    assert status == 201, order
    wait_for(lambda: stats(svc, "shipping")["calls"] >= 2, 5, "shipping to be tried again")
    assert stats(svc, "shipping")["refs"].get("redeliver-me", 0) == 0
    chaos(svc, "shipping", {})
    wait_for(lambda: stats(svc, "shipping")["refs"].get("redeliver-me") == 1, 5, "the order to ship")
    wait_for(lambda: request(svc.urls["orders"] + f"/orders/{order['order_id']}")[2]["status"] == "shipped", 5,
             "the order to say shipped")
    assert stats(svc, "shipping")["refs"]["redeliver-me"] == 1, "shipped exactly once"
