"""Idempotency, from v0.5 on: the IETF Idempotency-Key draft's answers, and one order per key however it arrives.

Same key and body -> the first answer replayed; another body -> 422; still in flight -> 409; twenty
identical POSTs at once -> one order, one charge. Expiry and the store's bound are tested on the
class itself with a fake clock (nobody waits ten minutes).
"""
import json
import socket
import threading
from urllib.parse import urlsplit

import pytest
from conftest import VERSIONS, Service, load_version, request, service_fixture, version_id, versions_from

LATER = versions_from("v0_5")
ORDER = {"item": "mug", "qty": 1, "customer": "ada"}


def post(svc, key, body, timeout_s=10.0):
    return request(svc.urls["orders"] + "/orders", "POST", body, {"Idempotency-Key": key}, timeout_s)


def charges(svc, ref):
    """How many times payment committed `ref` (ground truth)."""
    _, _, stats = request(svc.urls["payment"] + "/stats?refs=1")
    return stats["refs"].get(ref, 0)


def not_shed(send):
    """Send until the answer is not a shed (503/429 from admission or a full pool)."""
    for _ in range(50):
        got = send()
        if got[0] not in (429, 503):
            return got
    raise AssertionError(f"still shed: {got}")


svc = service_fixture(LATER)


def test_same_key_same_body_replays_the_first_answer(svc):
    body = dict(ORDER, ref="idem-replay")
    first = not_shed(lambda: post(svc, "k-replay", body))
    again = not_shed(lambda: post(svc, "k-replay", body))
    assert first[0] == 201 and again[0] == 201
    assert again[2] == first[2], "the replay must be the first answer, status and body"
    assert charges(svc, "idem-replay") == 1


def test_same_key_other_body_is_422(svc):
    not_shed(lambda: post(svc, "k-misuse", dict(ORDER, ref="idem-misuse")))
    status, _, body = not_shed(lambda: post(svc, "k-misuse", dict(ORDER, ref="idem-misuse", qty=2)))
    assert status == 422 and body["error"] and body["detail"]


def test_bad_key_is_400(svc):
    status, _, body = post(svc, "k" * 256, dict(ORDER, ref="idem-long"))
    assert status == 400 and "Idempotency-Key" in body["error"]
    order = json.dumps(dict(ORDER, ref="idem-two")).encode()
    raw = (b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k-1\r\nIdempotency-Key: k-2\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(order), order))
    parts = urlsplit(svc.urls["orders"])
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b"".join(iter(lambda: sock.recv(4096), b""))  # to the close: headers and body may come apart
    assert answer.startswith(b"HTTP/1.1 400") and b"Idempotency-Key" in answer, "two keys: which one? a 400"


def test_whitespace_around_a_key_is_not_part_of_it(svc):
    body = dict(ORDER, ref="idem-ws")
    first = not_shed(lambda: post(svc, "ws-key", body))
    assert first[0] == 201, first
    assert not_shed(lambda: post(svc, "ws-key \t", body))[2] == first[2], "the same key: the first answer replayed"


def test_twenty_identical_posts_at_once_make_one_order_and_one_charge(svc):
    """In flight -> 409; done -> the replay. Never a second order, never a second charge."""
    request(svc.urls["payment"] + "/chaos", "POST", {"latency_factor": 5})  # 200 ms charges: they overlap
    body, answers, start = dict(ORDER, ref="idem-twenty"), [], threading.Barrier(20)

    def client():
        start.wait()
        try:
            answers.append(post(svc, "k-twenty", body))
        except OSError:  # shed by a full pool before our body was read: a refusal, not an order
            answers.append((0, {}, None))

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    request(svc.urls["payment"] + "/chaos", "POST", {})
    statuses = sorted(a[0] for a in answers)
    assert len(answers) == 20 and set(statuses) <= {0, 201, 409, 503}, statuses
    assert 409 in statuses, f"some of the twenty should have found the first still in flight: {statuses}"
    order_ids = {a[2]["order_id"] for a in answers if a[0] == 201}
    assert len(order_ids) == 1, f"one key, one order: {order_ids}"
    assert charges(svc, "idem-twenty") == 1
    late = not_shed(lambda: post(svc, "k-twenty", body))  # once done, every retry is the replay
    assert late[0] == 201 and late[2]["order_id"] in order_ids


@pytest.mark.parametrize("path", LATER, ids=version_id)
def test_keys_expire_and_the_store_is_bounded(path):
    store_class = load_version(path).IdempotencyStore
    store, now = store_class(ttl_s=10, max_keys=2), [100.0]
    store.clock = lambda: now[0]
    done = (201, {"order_id": "ord-1"}, {})
    assert store.begin("a", {"x": 1}) is None
    assert store.begin("a", {"x": 1})[0] == 409  # in flight
    store.finish("a", done)
    assert store.begin("a", {"x": 1}) == done
    assert store.begin("a", {"x": 2})[0] == 422
    assert store.begin("b", {"x": 1}) is None
    status, _, headers = store.begin("c", {"x": 1})  # full: refuse a new key rather than forget an old one
    assert status == 503 and "Retry-After" in headers
    assert store.begin("a", {"x": 1}) == done  # the old keys are all still honoured
    now[0] += 10  # both expire: a key is remembered ttl_s
    assert store.begin("c", {"x": 1}) is None
    assert store.begin("a", {"x": 1}) is None, "an expired key is a new order"


@pytest.mark.parametrize("path", LATER, ids=version_id)
def test_a_503_lets_its_key_go(path):
    """503 means nothing was done (a breaker open, a bug in place()): the client's retry with the key must proceed."""
    store = load_version(path).IdempotencyStore(ttl_s=10, max_keys=10)
    assert store.begin("k", {"x": 1}) is None
    store.finish("k", (503, {"error": "payment failed"}, {"Retry-After": "1"}))
    assert store.begin("k", {"x": 1}) is None, "the retry is a fresh start, not a replayed 503"
    assert store.begin("k", {"x": 1})[0] == 409


def test_versions_before_v0_5_ignore_keys():
    """The lesson's other side: v0.4 takes a retried key as a new order (flaky-payment shows the cost)."""
    path = next(p for p in VERSIONS if version_id(p) == "v0_4")
    with_keys = Service(path)
    try:
        a = not_shed(lambda: post(with_keys, "k-old", dict(ORDER, ref="idem-old")))
        b = not_shed(lambda: post(with_keys, "k-old", dict(ORDER, ref="idem-old")))
        assert a[0] == b[0] == 201 and a[2]["order_id"] != b[2]["order_id"]
        assert charges(with_keys, "idem-old") == 2
    finally:
        with_keys.stop()

