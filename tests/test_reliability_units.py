"""The reliability mechanisms as units, in-process: each version file imported as a module.

No load and no simulators here: fakes stand in for the dependencies, so each test says exactly
which rule it checks and runs in milliseconds.
"""

import http.client
import json
import socket
import threading

import pytest
from conftest import VERSIONS, load_version, version_id, versions_from


@pytest.fixture(params=VERSIONS, ids=version_id)
def orders_server(request):
    """One version's orders front door on a free port, in this process; stopped afterwards."""
    module = load_version(request.param)
    server = module.OrdersServer(("127.0.0.1", 0), module.OrdersHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield module, server.server_address[1]
    server.shutdown()
    server.server_close()


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_background_thread_that_dies_makes_health_fail(orders_server):
    module, port = orders_server
    assert get(port, "/health") == (200, {"status": "ok"})

    def broken_worker():
        raise RuntimeError("a bug")

    hook = threading.excepthook
    threading.excepthook = module.thread_died
    try:
        worker = threading.Thread(target=broken_worker, name="fulfilment", daemon=True)
        worker.start()
        worker.join(5)
    finally:
        threading.excepthook = hook
    assert module.DEAD_THREADS == ["fulfilment"]
    status, body = get(port, "/health")
    assert status == 503 and body["error"] == "unhealthy", body
    assert "fulfilment" in body["detail"], body


@pytest.mark.parametrize("path", versions_from("v0_6"), ids=version_id)
def test_full_jitter_stays_within_its_cap_at_any_attempt(path):
    """2.0 ** 1024 overflows a float: a long outage must not make the backoff raise."""
    module = load_version(path)
    for attempt in (0, 1, 5, 1023, 1024, 10**6):
        pause_s = module.full_jitter_s(attempt, 0.05, 1.0)
        assert 0 <= pause_s <= 1.0, (attempt, pause_s)
    assert max(module.full_jitter_s(1, 0.05, 1.0) for _ in range(200)) <= 0.1


@pytest.mark.parametrize("path", versions_from("v1_0"), ids=version_id)
def test_redelivery_survives_a_thousand_failed_shipments(path, monkeypatch):
    """Two tries a second for 8.5 minutes of shipping outage: the 1,024th pause once raised
    OverflowError inside the worker, fulfilment died silently and the door closed for good."""
    module = load_version(path)
    failures_left = [1100]
    shipped = threading.Event()

    def fulfil(event, store):
        if failures_left[0]:
            failures_left[0] -= 1
            raise module.DependencyError(502, "shipping is down")
        shipped.set()

    monkeypatch.setattr(module, "fulfil", fulfil)
    monkeypatch.setattr(module.time, "sleep", lambda seconds: None)  # the pauses, not their length
    threading.Thread(target=module.fulfilment_worker, args=(None,), daemon=True).start()
    module.publish({"type": "OrderPlaced", "order_id": "ord-1", "ref": "r-1"})
    assert shipped.wait(30), f"fulfilment stopped with {failures_left[0]} failures to go"


@pytest.mark.parametrize("path", versions_from("v1_0"), ids=version_id)
def test_the_oldest_event_age_counts_the_event_being_redelivered(path):
    """The stuck event is the one fulfilment holds, not one still in the queue."""
    module = load_version(path)
    module.DELIVERING["ord-stuck"] = module.time.monotonic() - 5
    age = module.gauges()[("fulfilment_oldest_event_age_seconds", ())]
    assert age >= 5, age


@pytest.mark.parametrize("path", versions_from("v0_8"), ids=version_id)
def test_the_accept_queue_gauge_never_reads_below_zero(path):
    """A pool thread may take a connection the moment it is queued: count it before the put."""
    module = load_version(path)
    gauge = ("queue_depth", (("queue", "accept"),))
    seen = []

    class Spy(module.queue.Queue):
        def put_nowait(self, item):
            seen.append(module.METRICS.values[gauge])
            super().put_nowait(item)

    server = module.OrdersServer(("127.0.0.1", 0), module.OrdersHandler)
    try:
        server.accepted = Spy(1)
        server.dispatch(socket.socket(), ("127.0.0.1", 1), b"GET /health HTTP/1.1\r\n\r\n")
        assert seen == [1], "counted after the put: a worker's -1 could come first"
    finally:
        server.server_close()


@pytest.fixture
def limit():
    """v1.0's GradientLimit, 8 to start, within 1 and 24, latency tolerated to 1.2x no-load,
    headroom 2, no-load creep 1% a call."""
    module = load_version(versions_from("v1_0")[0])
    return module.GradientLimit(8, 1, 24, 1.2, 2, 0.01)


def fill(limit):
    """Orders in progress up to the limit: the limit is in use (no learning while it is idle)."""
    while limit.try_acquire():
        pass


def round_trips(limit, count, workers, service_s=0.040):
    """A fake payment with `workers` slots and the limit full, one round trip at a time: a call
    waits its turn behind the others, so it takes service_s x (in progress / workers), never less
    than service_s."""
    for _ in range(count):
        while limit.in_flight:
            limit.release()
        fill(limit)
        for _ in range(int(limit.limit)):
            limit.observe(service_s * max(1.0, limit.in_flight / workers))


def test_the_limit_grows_while_latency_stays_flat(limit):
    round_trips(limit, 30, workers=64)
    assert limit.limit >= 20, limit.limit


def test_a_limit_nobody_uses_learns_nothing(limit):
    for _ in range(200):
        limit.observe(0.040)  # one call at a time: no evidence that more would help
    assert limit.limit == 8


def test_the_limit_follows_capacity_down_and_back_up(limit):
    limit.observe(0.040)  # one call queued behind nobody: the floor
    round_trips(limit, 20, workers=4)
    assert 6 <= limit.limit <= 8, f"4 x 1.2 served + headroom 2: {limit.limit}"
    round_trips(limit, 6, workers=2)  # payment lost half its workers
    assert 3.5 <= limit.limit <= 5.5, f"2 x 1.2 + 2, within 6 round trips: {limit.limit}"
    round_trips(limit, 6, workers=4)  # and got them back
    assert 6 <= limit.limit <= 8, f"back within 6 round trips: {limit.limit}"


def test_the_limit_stays_within_its_bounds(limit):
    round_trips(limit, 100, workers=64)
    assert limit.limit == 24
    round_trips(limit, 100, workers=0.01)  # everything queues, forever
    assert 1 <= limit.limit <= 2.1, "next to nothing served, and the headroom"
    floored = type(limit)(8, 6, 24, 1.2, 2, 0.01)
    floored.observe(0.040)
    round_trips(floored, 100, workers=0.01)
    assert 6 <= floored.limit < 6.01


def test_a_payment_slower_for_everyone_is_a_new_normal_not_a_queue(limit):
    limit.observe(0.040)
    for _ in range(300):
        limit.observe(0.080)  # 2x slower, while the limit is idle: no-load latency follows it
    assert limit.no_load_s == 0.080
    round_trips(limit, 10, workers=4, service_s=0.080)
    assert limit.limit >= 5, f"not squeezed as if 0.040 were still the floor: {limit.limit}"


def test_under_load_the_floor_stays_put(limit):
    limit.observe(0.040)
    round_trips(limit, 50, workers=2)  # every call queued: no call shows the floor again
    assert limit.no_load_s == 0.040


def test_an_answer_that_did_no_work_is_not_a_latency(limit):
    """Payment replays a key it knows at once: taken as its speed, every real call would look
    queued behind 40 others and the limit would sit at its floor for good (measured: 18 orders/s)."""
    limit.observe(0.040)
    limit.observe(0.001)
    assert limit.no_load_s == 0.040
    round_trips(limit, 20, workers=4)
    assert limit.limit >= 5


def test_a_burst_that_drains_is_not_a_standing_queue(limit):
    """A busy payment queues calls now and then (at 80 % of its capacity, half of them wait); a
    round trip in which one call still found it free is no reason to refuse anyone (CoDel)."""
    limit.observe(0.040)
    for _ in range(20):
        fill(limit)
        calls = int(limit.limit)
        for k in range(calls):
            limit.observe(0.042 if k == calls // 2 else 0.120)
    assert limit.limit >= 20, f"grew as if nobody waited: {limit.limit}"


def test_a_queue_every_call_waits_in_shrinks_the_limit(limit):
    limit.observe(0.040)
    round_trips(limit, 3, workers=2)  # even the quickest call of a round trip waited its turn
    assert limit.limit < 6.5, f"2 workers x 1.2 + headroom 2, within 3 round trips: {limit.limit}"


def test_a_call_that_timed_out_is_a_latency_too(monkeypatch):
    """Otherwise a payment too slow for every call to finish teaches the limit nothing, and it
    keeps sending the calls that time out (simulated: 584 timeouts in 9 s after a capacity drop)."""
    module = load_version(versions_from("v1_0")[0])
    seen = []
    monkeypatch.setattr(module.LIMIT, "observe", lambda rtt_s, answered: seen.append(answered))
    monkeypatch.setitem(module.DEPENDENCY_URLS, "payment", "http://127.0.0.1:9")

    def times_out(*args):
        raise module.DependencyError(504, "payment gave no answer in time", retryable=False)

    monkeypatch.setattr(module, "http_post", times_out)
    with pytest.raises(module.DependencyError):
        module.call_dependency("payment", "/charge", {}, idempotency_key="k")
    assert seen == [False], "a latency, never the floor"


def test_a_payment_down_at_start_does_not_set_the_floor(limit):
    """Found by trying: a first call refused in 0.3 ms (payment down) taken as payment's speed made
    every healthy 40 ms call look queued, and the limit sat at ~1.5 for the life of the process."""
    limit.observe(0.0003, answered=False)
    assert limit.no_load_s == float("inf")
    limit.observe(0.040)
    round_trips(limit, 20, workers=4)
    assert limit.limit >= 5, limit.limit


def test_the_limit_refuses_past_it_and_frees_a_place_on_release(limit):
    taken = sum(1 for _ in range(20) if limit.try_acquire())
    assert taken == 8 and not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()
