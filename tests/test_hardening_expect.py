"""`Expect: 100-continue` (RFC 9110 section 10.1.1), in every version, as raw bytes on a socket.

A client that sends it (curl does for large bodies, or when told to) waits for `100 Continue`
before it sends the body, ~1 s by default when none comes. orders answers `100 Continue` at once
when it wants the body, a final status when it refuses without reading it, and ignores the header
in an HTTP/1.0 request. Every answer states HTTP/1.1, like the shed 503 and the simulators.
"""
import json
import socket
import time
from urllib.parse import urlsplit

from conftest import request
from test_contract import JSON_HEADERS, order_body

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PROMPT_S = 0.3  # the acceptance bound: curl -H 'Expect: 100-continue' places an order within it
BODY = json.dumps(order_body(ref="expect", qty=1)).encode()
BODY10 = json.dumps(order_body(ref="expect-1.0", qty=1)).encode()


def head(target, length, version=b"HTTP/1.1", method=b"POST"):
    return (method + b" " + target + b" " + version + b"\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: "
            + str(length).encode() + b"\r\n\r\n")


# (label, request head, body sent only after a 100 Continue (None: at once with the head),
#  whether a 100 Continue must come first, the final status)
CASES = [
    ("an order: 100 Continue at once, then the body", head(b"/orders", len(BODY)), BODY, True, 201),
    ("an unknown path: a final 404, no 100", head(b"/nope", len(BODY)), BODY, False, 404),
    ("GET-only path: a final 405, no 100", head(b"/health", len(BODY)), BODY, False, 405),
    ("a body too large: a final 413, no 100", head(b"/orders", 70_000), b"x" * 70_000, False, 413),
    ("HTTP/1.0: the header is ignored, the body comes at once",
     head(b"/orders", len(BODY10), b"HTTP/1.0") + BODY10, None, False, 201),
]


def exchange(url, data, body_after_continue):
    """Send the head; send the body once 100 Continue comes (never waiting for it more than
    PROMPT_S); return (everything read up to the close, seconds to the first byte)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(data)
        answer = sock.recv(65536)
        first_byte_s = time.monotonic() - started
        if body_after_continue is not None and answer == CONTINUE:
            sock.sendall(body_after_continue)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, first_byte_s


def test_expect_100_continue(service):
    problems = []
    for label, data, body, wants_continue, final in CASES:
        answer, first_byte_s = exchange(service.urls["orders"], data, body)
        statuses = [line.split(b" ")[:2] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/")]
        want = ([[b"HTTP/1.1", b"100"]] if wants_continue else []) + [[b"HTTP/1.1", str(final).encode()]]
        if statuses != want:
            problems.append(f"{label}: status lines {statuses}, expected {want}; {answer[:300]!r}")
        if first_byte_s > PROMPT_S:
            problems.append(f"{label}: first byte after {first_byte_s:.2f} s")
    assert problems == [], "\n".join(problems)


def test_every_answer_says_http_1_1(service):
    """The shed 503 said HTTP/1.1 and every other answer HTTP/1.0."""
    problems = []
    for data in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health HTTP/1.0\r\n\r\n",
                 b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"DELETE /orders HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /health\r\n", b"GARBAGE\r\n\r\n"):
        answer, _ = exchange(service.urls["orders"], data, None)
        if not answer.startswith(b"HTTP/1.1 "):
            problems.append(f"{data!r}: {answer[:60]!r}")
    assert problems == [], "\n".join(problems)
    assert request(service.urls["orders"] + "/orders", "POST", order_body(ref="after-expect"), JSON_HEADERS)[0] == 201
