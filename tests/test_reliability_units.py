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

    def fulfil(event):
        if failures_left[0]:
            failures_left[0] -= 1
            raise module.DependencyError(502, "shipping is down")
        shipped.set()

    monkeypatch.setattr(module, "fulfil", fulfil)
    monkeypatch.setattr(module.time, "sleep", lambda seconds: None)  # the pauses, not their length
    threading.Thread(target=module.fulfilment_worker, daemon=True).start()
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
