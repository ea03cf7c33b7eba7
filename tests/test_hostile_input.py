"""Hostile input, as raw bytes on a socket, against every version: orders' front door and both simulators.

Each case must get an answer with an expected status and a JSON body ({"error", "detail"} for an error),
never a traceback, a silent close or a hang; afterwards every process still serves, an order is still
charged exactly once, and nothing printed a traceback. A hang is caught by a short socket timeout.
"""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from urllib.parse import urlsplit

from conftest import request
from test_contract import answer, error_problems, order_body, raw_exchange, send_unless_shed

HANG_TIMEOUT_S = 3.0  # no answer by then is a hang; the simulators cut a stalled request off after 1 s
PROMPT_S = 1.0  # a healthy charge takes ~40 ms; a wedged worker never answers
DEPTH = 20000  # "[[[[...": deeper than Python's recursion limit


def raw_request(method, path, body=b"", headers=b"", length=None, ending=b"\r\n"):
    """The bytes of one request; `length` overrides the Content-Length (b"" leaves it out)."""
    length = str(len(body)).encode() if length is None else length
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close"]
    head += [b"Content-Length: " + length] if length != b"" else []
    head += [line for line in headers.split(b"\r\n") if line]
    return ending.join(head) + ending + ending + body


def order_json(ref):
    return json.dumps(order_body(ref=ref, qty=1)).encode()


# (label, request bytes, allowed statuses, kind, half-close after sending)
# kind: "error" is a JSON {"error", "detail"}; "ok" is any JSON object; "head" has no body at all
ORDERS_CASES = [
    ("Content-Length of 5,000 digits", raw_request("POST", "/orders", b"{}", length=b"1" * 5000),
     (400, 413), "error", False),
    ("Content-Length of 10 digits with a short body", raw_request("POST", "/orders", b"{}", length=b"9" * 10),
     (400, 413), "error", False),
    ("absolute-form target with a bad host", b"GET http://[/health HTTP/1.1\r\nHost: x\r\n\r\n", (400,), "error",
     False),
    ("absolute-form target with a good host", b"GET http://x/health HTTP/1.1\r\nHost: x\r\n\r\n", (200,), "ok",
     False),
    ("an empty line before the request line (RFC 9112 section 2.2)", b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n",
     (200,), "ok", False),
    ("two different Content-Length headers", raw_request("POST", "/orders", b"{}", b"Content-Length: 3"),
     (400,), "error", False),
    ("two equal Content-Length headers", raw_request("POST", "/orders", b"{}", b"Content-Length: 2"),
     (400,), "error", False),
    ("Content-Length as a list", raw_request("POST", "/orders", b"{}", length=b"2, 2"), (400,), "error", False),
    ("Content-Length with a plus sign", raw_request("POST", "/orders", b"{}", length=b"+2"), (400,), "error", False),
    ("Content-Length with whitespace around it",
     raw_request("POST", "/orders", order_json("hostile-ows"), length=b"%d \t" % len(order_json("hostile-ows"))),
     (201,), "ok", False),
    ("HEAD (no body in the answer)", b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", (200,), "head", False),
    ("HEAD on an unknown path", b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n", (404,), "head", False),
    ("HTTP/0.9 request line", b"GET /health\r\n", (400,), "error", False),
    ("HTTP/0.9 request line, then half-close", b"GET /health\r\n", (400,), "error", True),
    ("header line without a colon", raw_request("POST", "/orders", b"{}", b"NoColonHere"), (400,), "error", False),
    ("space before a header's colon", raw_request("POST", "/orders", b"{}", b"X-Thing : 1"), (400,), "error", False),
    ("first header line folded", b"POST /orders HTTP/1.1\r\n folded\r\nContent-Length: 2\r\n\r\n{}", (400,),
     "error", False),
    ("bare LF line endings", b"GET /health HTTP/1.1\nHost: x\n\n", (200,), "ok", False),
    ("a valid order, then half-close", raw_request("POST", "/orders", order_json("hostile-half")), (201,), "ok",
     True),
    ("a valid order, then extra bytes", raw_request("POST", "/orders", order_json("hostile-extra")) + b"GARBAGE",
     (201,), "ok", False),
]


def simulator_cases(role):
    """The same hostile table for payment and shipping; `work` is the endpoint that does the work."""
    work = {"payment": "/charge", "shipping": "/ship"}[role]
    call = {"order_id": "o-1", "ref": f"hostile-{role}", **({"amount": 100} if role == "payment" else {})}
    good = json.dumps(call).encode()
    chaos = [  # every knob is checked: finite, in its range, the right type
        ("latency_factor 1e308", b'{"latency_factor": 1e308}'),
        ("latency_factor 1e400 (inf)", b'{"latency_factor": 1e400}'),
        ("latency_factor Infinity", b'{"latency_factor": Infinity}'),
        ("latency_factor -Infinity", b'{"latency_factor": -Infinity}'),
        ("latency_factor NaN", b'{"latency_factor": NaN}'),
        ("latency_factor of 400 digits", b'{"latency_factor": ' + b"9" * 400 + b"}"),
        ("latency_factor 0.5", b'{"latency_factor": 0.5}'), ("latency_factor 101", b'{"latency_factor": 101}'),
        ("latency_factor true", b'{"latency_factor": true}'),
        ("error_rate -0.1", b'{"error_rate": -0.1}'), ("error_rate 2", b'{"error_rate": 2}'),
        ("ambiguous_rate NaN", b'{"ambiguous_rate": NaN}'), ("hang_rate \"1\"", b'{"hang_rate": "1"}'),
        ("down 0.5", b'{"down": 0.5}'), ("blackhole 2", b'{"blackhole": 2}'), ("down null", b'{"down": null}'),
        ("workers 0", b'{"workers": 0}'), ("workers 65", b'{"workers": 65}'), ("workers -1", b'{"workers": -1}'),
        ("workers 2.5", b'{"workers": 2.5}'), ("workers 2.0", b'{"workers": 2.0}'),
        ("workers true", b'{"workers": true}'), ("workers \"2\"", b'{"workers": "2"}'),
        ("workers NaN", b'{"workers": NaN}'), ("workers of 400 digits", b'{"workers": ' + b"9" * 400 + b"}"),
        ("chaos a list", b"[1]"), ("chaos nested too deep", b"[" * DEPTH), ("chaos invalid UTF-8", b'{"\xff": 1}'),
    ]
    cases = [(f"POST /chaos {label}", raw_request("POST", "/chaos", body), (400,), "error", False)
             for label, body in chaos]
    bad_calls = [
        ("nested too deep", b"[" * DEPTH), ("a list", b"[1]"), ("NaN in it", good[:-1] + b', "x": NaN}'),
        ("no ref", json.dumps({k: v for k, v in call.items() if k != "ref"}).encode()),
        ("ref a list", json.dumps(dict(call, ref=["r"])).encode()),
        ("order_id a number", json.dumps(dict(call, order_id=5)).encode()),
    ]
    cases += [(f"POST {work} {label}", raw_request("POST", work, body), (400,), "error", False)
              for label, body in bad_calls]
    cases += [(f"POST {work} X-Deadline-Ms {value}", raw_request("POST", work, good, b"X-Deadline-Ms: " + value),
               (400,), "error", False) for value in (b"NaN", b"inf", b"-5", b"0", b"", b"9" * 400)]
    return cases + [
        ("a body shorter than its Content-Length, then half-close", raw_request("POST", "/chaos", b"{}", length=b"10"),
         (400,), "error", True),
        ("a body shorter than its Content-Length, held open", raw_request("POST", "/chaos", b"{}", length=b"10"),
         (400, 408), "error", False),
        ("a head that never ends, held open", b"GET /stats HTTP/1.1\r\nHost: x\r\n", (400, 408), "error", False),
        ("one header line over 64 KiB", raw_request("GET", "/stats", headers=b"X-Big: " + b"a" * 70000),
         (431,), "error", False),
        ("6,000 short header lines (over 64 KiB)", raw_request("GET", "/stats", headers=b"X-A: aaaaaaaaa\r\n" * 6000),
         (431,), "error", False),
        ("bare LF line endings", raw_request("GET", "/stats", length=b"", ending=b"\n"), (200,), "ok", False),
        ("an empty line before the request line", b"\r\n" + raw_request("GET", "/chaos", length=b""), (200,), "ok",
         False),
        ("two Content-Length headers", raw_request("POST", "/chaos", b"{}", b"Content-Length: 3"), (400,), "error",
         False),
        ("Content-Length of 5,000 digits", raw_request("POST", "/chaos", b"{}", length=b"1" * 5000), (400, 413),
         "error", False),
        ("Content-Length not a number", raw_request("POST", "/chaos", b"{}", length=b"two"), (400,), "error", False),
        ("Transfer-Encoding: chunked (a body we would misread)",
         raw_request("POST", "/chaos", b"2\r\n{}\r\n0\r\n\r\n", b"Transfer-Encoding: chunked", length=b""),
         (400,), "error", False),
        ("header line without a colon", raw_request("GET", "/stats", headers=b"NoColonHere"), (400,), "error", False),
        ("one-word request line", b"GARBAGE\r\n\r\n", (400,), "error", False),
        ("request line cut short, then half-close", b"GET /sta", (400,), "error", True),
        (f"POST {work}, then half-close (an answer, not a hang-up)", raw_request("POST", work, good), (200,), "ok",
         True),
        (f"POST {work}, then extra bytes", raw_request("POST", work, good) + b"EXTRA BYTES", (200,), "ok", False),
    ]


def check(label, got, allowed, kind):
    """Problems with one answer: an error is checked by test_contract's error_problems."""
    if kind == "error":
        return error_problems(label, got, allowed)
    status, headers, body = got
    problems = [] if status in allowed else [f"{label}: status {status}, expected {allowed}: {body!r:.200}"]
    if kind == "head" and body != b"":
        problems.append(f"{label}: a HEAD answer with a body: {body!r:.200}")
    if kind == "ok" and not isinstance(body, dict):
        problems.append(f"{label}: body is not a JSON object: {body!r:.200}")
    if "Traceback" in str(body):
        problems.append(f"{label}: a traceback in the body")
    return problems


def run_table(service, role, cases):
    """Send each case to one process; return every problem found."""
    problems = []
    for label, data, allowed, kind, half_close in cases:
        def send(svc, data=data, half_close=half_close):
            return raw_exchange(svc.urls[role], data, half_close, timeout_s=HANG_TIMEOUT_S)
        # orders may shed a case it admits (429/503 + Retry-After): that is its limit, so try again
        send_to = partial(send_unless_shed, send) if role == "orders" else send
        got, missing = answer(f"{role}: {label}", partial(send_to, service))
        problems += missing or check(f"{role}: {label}", got, allowed, kind)
    return problems


def test_hostile_bytes_get_a_json_answer_and_everything_keeps_serving(service):
    problems = run_table(service, "orders", ORDERS_CASES)
    with ThreadPoolExecutor(2) as pool:  # the two simulators side by side: their stalled cases take 1 s each
        for found in pool.map(lambda role: run_table(service, role, simulator_cases(role)), ("payment", "shipping")):
            problems += found
    assert problems == [], "\n".join(problems)

    assert request(service.urls["orders"] + "/health")[0] == 200
    for role in ("payment", "shipping"):
        status, _, stats = request(service.urls[role] + "/stats")
        assert status == 200 and isinstance(stats, dict), stats
        json.dumps(stats, allow_nan=False)  # raises ValueError if a NaN or an Infinity crept in
    status, _, body = send_unless_shed(lambda svc: request(svc.urls["orders"] + "/orders", "POST",
                                                           order_body(ref="after-hostile")), service)
    assert status == 201, body
    refs = request(service.urls["payment"] + "/stats?refs=1")[2]["refs"]
    assert refs.get("after-hostile") == 1, refs
    assert "Traceback" not in service.stderr(), service.stderr()[-3000:]


def charge_seconds(url):
    """Time one healthy call to payment's /charge (its status must be 200)."""
    started = time.monotonic()
    status, _, body = request(url + "/charge", "POST", {"order_id": "o", "amount": 1, "ref": f"prompt-{started}"},
                              timeout_s=HANG_TIMEOUT_S)
    assert status == 200, body
    return time.monotonic() - started


def test_no_chaos_value_wedges_payment(service):
    payment = service.urls["payment"]
    for value in (b"1e308", b"Infinity", b"9" * 400):
        got = raw_exchange(payment, raw_request("POST", "/chaos", b'{"latency_factor": %s}' % value),
                           timeout_s=HANG_TIMEOUT_S)
        assert error_problems(f"latency_factor {value[:20]!r}", got, (400,)) == []
    assert request(payment + "/chaos")[::2] == (200, {}), "a refused chaos request changed the settings"
    assert charge_seconds(payment) < PROMPT_S
    assert request(payment + "/chaos", "POST", {"latency_factor": 5, "error_rate": 0.5})[0] == 200
    assert request(payment + "/chaos", "POST", {})[::2] == (200, {})
    assert charge_seconds(payment) < PROMPT_S, "payment is still slow after chaos was healed"
    assert "Traceback" not in service.stderr(), service.stderr()[-3000:]


def test_a_refused_call_does_not_reserve_its_idempotency_key(service):
    for role, work in (("payment", "/charge"), ("shipping", "/ship")):
        url = service.urls[role]
        call = {"order_id": "o-k", "ref": "ref-k", **({"amount": 100} if role == "payment" else {})}
        key = {"Idempotency-Key": "key-1"}
        refused = [request(url + work, "POST", body, dict(key, **headers))[0] for body, headers in (
            (b"{not json", {}), ([call], {}), (dict(call, ref=None), {}),
            (call, {"X-Deadline-Ms": "NaN"}), (call, {"X-Deadline-Ms": "-1"}))]
        assert refused == [400] * 5, f"{role}: {refused}"
        for attempt in ("first", "replayed"):
            got = request(url + work, "POST", call, key)[::2]
            assert got == (200, {"ref": "ref-k", "status": "committed"}), f"{role} {attempt}: {got}"
        stats = request(url + "/stats?refs=1")[2]
        assert stats["refs"] == {"ref-k": 1} and stats["replayed"] == 1, f"{role}: {stats}"


def test_half_close_is_answered_and_a_real_close_is_zombie_work(service):
    """EOF after the request is no hang-up; a caller that closed is found out when its answer bounces."""
    payment = service.urls["payment"]
    parts = urlsplit(payment)
    assert request(payment + "/chaos", "POST", {"latency_factor": 5})[0] == 200  # 200 ms per charge

    def send_charge(ref):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=HANG_TIMEOUT_S)
        sock.sendall(raw_request("POST", "/charge", json.dumps({"order_id": "o", "amount": 1, "ref": ref}).encode()))
        return sock

    gone = [send_charge(f"gone-{i}") for i in range(2)]
    half = send_charge("half")
    half.shutdown(socket.SHUT_WR)
    for sock in gone:
        sock.close()  # a caller that timed out: FIN, just like the half-close, until an answer arrives
    with half:
        answer = b""
        while chunk := half.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"committed"' in answer, answer
    deadline = time.monotonic() + 5
    while True:  # poll a condition: the abandoned charges finish after the half-closed one, then bounce
        stats = request(payment + "/stats")[2]
        if stats["zombie"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a pause between polls, not a synchronisation
    assert (stats["commits"], stats["zombie"], stats["held_open"]) == (3, 2, 0), stats


def test_the_workers_knob_changes_capacity_and_back(service):
    """payment's `workers` knob: 1 slot serves charges one after another, {} restores all 4."""
    payment = service.urls["payment"]
    assert request(payment + "/stats")[2]["capacity_rps"] == 100
    assert request(payment + "/chaos", "POST", {"workers": 1})[::2] == (200, {"workers": 1})
    assert request(payment + "/stats")[2]["capacity_rps"] == 25

    def four_charges_s():
        threads = [threading.Thread(target=charge_seconds, args=(payment,)) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_TIMEOUT_S)
        return time.monotonic() - started

    one_slot_s = four_charges_s()  # 4 x 40 ms in a row
    assert request(payment + "/chaos", "POST", {})[::2] == (200, {})
    four_slots_s = four_charges_s()  # 40 ms side by side
    assert one_slot_s >= 0.15 and four_slots_s < one_slot_s / 2, (one_slot_s, four_slots_s)
