"""Header and target corners (RFC 9110, RFC 9112) at orders' front door, as raw bytes, per version.

Optional whitespace is not part of a field value on either side; a header that must be one is a
400 when sent twice; a request id is printable ASCII or ours; an absolute-form target is the same
route as its path, for the answer and for /metrics alike; `/orders/` is no order, whatever the
method.
"""
import json
import re
from urllib.parse import urlsplit

from conftest import service_fixture, version_id, versions_from
from test_contract import order_body, raw_exchange, send_unless_shed


def post(target, ref, extra=b""):
    body = json.dumps(order_body(ref=ref, qty=1)).encode()
    return (b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


COMPACT = json.dumps(order_body(ref="tabs", qty=1), separators=(",", ":")).encode()


def bare(method, target):
    return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


# (label, first version, request bytes ({origin}: the orders URL's host:port), status, the raw
#  answer must match this regex (or None))
CASES = [
    ("two X-Deadline-Ms: which one? a 400", "v1_0",
     post(b"/orders", "dl-two", b"X-Deadline-Ms: 5000\r\nX-Deadline-Ms: 1\r\n"), 400, None),
    ("X-Deadline-Ms with whitespace after it", "v1_0", post(b"/orders", "dl-ows", b"X-Deadline-Ms: 900 \t\r\n"),
     201, None),
    ("X-Deadline-Ms with whitespace before it", "v1_0", post(b"/orders", "dl-ows2", b"X-Deadline-Ms:\t 900\r\n"),
     201, None),
    ("X-Request-Id with whitespace after it", "v0_8", post(b"/orders", "id-ows", b"X-Request-Id: abc-1 \t\r\n"),
     201, rb"\r\nX-Request-Id: abc-1\r\n"),
    ("X-Request-Id with non-ASCII bytes is replaced by ours", "v0_8",
     post(b"/orders", "id-utf8", b"X-Request-Id: caf\xc3\xa9\r\n"), 201, rb"\r\nX-Request-Id: [0-9a-f]{16}\r\n"),
    ("absolute-form POST /orders", "v0_1", post(b"http://{origin}/orders", "absolute"), 201, None),
    ("absolute-form GET /health", "v0_1", bare(b"GET", b"http://{origin}/health"), 200, None),
    ("absolute-form GET an unknown order", "v0_1", bare(b"GET", b"http://{origin}/orders/nope"), 404, None),
    ("POST /orders/ (no id)", "v0_1", post(b"/orders/", "slash"), 404, None),
    ("GET /orders/ (no id)", "v0_1", bare(b"GET", b"/orders/"), 404, None),
    ("DELETE /orders/ (no id)", "v0_1", bare(b"DELETE", b"/orders/"), 404, None),
    ("POST /orders/<id>: GET only", "v0_1", post(b"/orders/ord-1", "post-id"), 405, rb"\r\nAllow: GET\r\n"),
    ("GET /orders/a/b", "v0_1", bare(b"GET", b"/orders/a/b"), 404, None),
    # words apart by tabs, and an Expect: the reader's "is it an order?" once split on spaces
    # only, raised, and took the reader's thread with it for good (found by a breaker session)
    ("POST\t/orders\tHTTP/1.1, one space in all (in Expect: 100-continue): 100, then the 201", "v0_4",
     b"POST\t/orders\tHTTP/1.1\r\nHost:x\r\nConnection:close\r\nContent-Type:application/json\r\n"
     b"Expect: 100-continue\r\nContent-Length:" + str(len(COMPACT)).encode() + b"\r\n\r\n" + COMPACT, 100, None),
]


def posts_to_orders(metrics_text):
    found = re.search(r'http_requests_total\{endpoint="/orders",method="POST",status="2xx"\} (\d+)', metrics_text)
    return int(found.group(1)) if found else 0


def test_header_and_target_corners(service, version_path):
    url = service.urls["orders"]
    origin = urlsplit(url).netloc.encode()
    problems = []
    for label, first, data, want, pattern in CASES:
        if version_id(version_path) < first:
            continue
        data = data.replace(b"{origin}", origin)
        status, headers, body = send_unless_shed(lambda svc, data=data: raw_exchange(url, data), service)
        head = "".join(f"\r\n{k}: {v}" for k, v in headers.items()) + "\r\n"
        if status != want:
            problems.append(f"{label}: {status}, expected {want}: {body!r:.200}")
        elif pattern and not re.search(pattern.decode(), head):
            problems.append(f"{label}: headers {head!r} do not match {pattern!r}")
    assert problems == [], "\n".join(problems)
    assert raw_exchange(url, bare(b"GET", b"/health"))[0] == 200, "a background thread died"


observed = service_fixture(versions_from("v0_8"))


def test_an_absolute_form_order_counts_as_posts_to_orders(observed):
    service = observed
    url = service.urls["orders"]
    before = posts_to_orders(raw_exchange(url, bare(b"GET", b"/metrics"))[2].decode())
    target = b"http://" + urlsplit(url).netloc.encode() + b"/orders"
    status, _, body = send_unless_shed(lambda svc: raw_exchange(url, post(target, "absolute-metrics")), service)
    assert status == 201, body
    after = posts_to_orders(raw_exchange(url, bare(b"GET", b"/metrics"))[2].decode())
    assert after == before + 1, (before, after)
