"""The contract every version keeps (the API in the README), run against each version file as real processes.

API, bad input (never a 5xx, a hang or a traceback), the simulators' chaos and ground-truth endpoints,
and the process rules: clean shutdown on SIGTERM/SIGINT, no orphans after SIGKILL, one role alone.
Nothing here sleeps to synchronise: every wait polls a condition against a deadline.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from http.client import HTTPException
from urllib.parse import urlsplit

import pytest
from conftest import Service, group_members, read_ready, request, version_id

ORDER = {"item": "book", "qty": 2, "customer": "ada", "ref": "r1"}
JSON_HEADERS = {"Content-Type": "application/json"}
SHIP_TIMEOUT_S = 15.0  # generous: the machine is shared with load tests
SHED_TIMEOUT_S = 10.0  # how long a case may keep being shed (429/503 + Retry-After) before it counts as wrong
RAW_TIMEOUT_S = 5.0  # a raw-socket exchange with no answer by then counts as a hang
ORPHAN_TIMEOUT_S = 6.0  # children of a SIGKILLed orders process must go on their own within ~5 s
STATS_KEYS = {"calls", "commits", "duplicates", "held_open", "queue_depth", "queue_peak", "zombie", "capacity_rps"}


# === HELPERS ===


def header(headers, name):
    """A response header by name, whatever its case; None when absent."""
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def poll(fetch, done, timeout_s, what):
    """Call fetch() until done(value) holds; return that value, or fail with the last one seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last seen: {value!r}")
        time.sleep(0.05)  # a short pause between polls, not a synchronisation


def order_body(**changes):
    """The valid order with some fields changed; a value of None removes that field."""
    body = dict(ORDER, **changes)
    return {k: v for k, v in body.items() if v is not None}


def answer_complete(answer):
    """True once a raw answer holds its headers and its whole Content-Length body."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False  # no length given: read until the server closes


def raw_exchange(url, data, shutdown_write=False, timeout_s=RAW_TIMEOUT_S):
    """Send raw bytes to url's host and port; return (status or None, headers, body) of the answer.

    status is None when the answer has no HTTP status line. A silent server raises TimeoutError."""
    parts = urlsplit(url)
    answer = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading everything: read what it said
        while not answer_complete(answer):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"HTTP/"):
        return None, {}, parse_json(answer)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, parse_json(body)


def parse_json(raw):
    """raw decoded as JSON, or raw itself when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def error_problems(label, got, allowed, allow_method=None):
    """What is wrong with an error answer: its status, its JSON shape, its content type, a traceback."""
    status, headers, body = got
    text = body.decode("latin-1") if isinstance(body, bytes) else json.dumps(body)
    problems = []
    if status is None and not text:
        problems.append("the connection was closed with no answer at all")
    elif status is None:
        problems.append(f"no HTTP status line (an HTTP/0.9-style bare body): {text[:200]!r}")
    elif status not in allowed or status >= 500:
        problems.append(f"status {status}, expected {allowed}")
    if "Traceback" in text:
        problems.append("a traceback in the body")
    if not (isinstance(body, dict) and "error" in body and "detail" in body):
        problems.append(f"body is not JSON with 'error' and 'detail': {text[:200]!r}")
    if status is not None and not (header(headers, "Content-Type") or "").startswith("application/json"):
        problems.append(f"Content-Type {header(headers, 'Content-Type')!r}, expected application/json")
    if allow_method and allow_method not in (header(headers, "Allow") or ""):
        problems.append(f"Allow header {header(headers, 'Allow')!r} should list {allow_method}")
    return [f"{label}: {p}" for p in problems]


def shed(got):
    """True for a load-shedding refusal (429/503 with Retry-After): the contract allows it, so try again."""
    return got[0] in (429, 503) and header(got[1], "Retry-After") is not None


def send_unless_shed(send, service, timeout_s=SHED_TIMEOUT_S):
    """Send a case; while the version sheds it (its admission limit, not the input), send it again."""
    return poll(lambda: send(service), lambda got: not shed(got), timeout_s, "an answer that is not a shed")


def answer(label, send):
    """(the answer to send(), []), or (None, [the one problem: there was no answer])."""
    try:
        return send(), []
    except TimeoutError:
        return None, [f"{label}: no answer in time: the server hangs"]
    except (OSError, HTTPException, AssertionError) as exc:  # AssertionError: still shed at the deadline
        return None, [f"{label}: no answer: {exc!r:.300}"]


def run_cases(service, cases):
    """Send each case to orders; return every problem found (an empty list when all is well).

    Cases go out one after another, faster than an admission limit (v0.2's token bucket) may allow:
    a 429/503 with Retry-After is that limit, not an answer about the input, so the case is sent again."""
    problems = []
    for label, send, allowed, allow_method in cases:
        got, missing = answer(label, partial(send_unless_shed, send, service))
        problems += missing or error_problems(label, got, allowed, allow_method)
    return problems


def http(method, path, body=None, headers=None):
    """A case sender: one request to orders through conftest's request()."""
    return lambda svc: request(svc.urls["orders"] + path, method, body, headers)


def raw(data, shutdown_write=False):
    """A case sender: raw bytes to orders over a socket."""
    return lambda svc: raw_exchange(svc.urls["orders"], data, shutdown_write)


def post_order(body):
    """A case sender: POST /orders with this body (a dict is sent as JSON)."""
    return http("POST", "/orders", body, JSON_HEADERS)


FOUR_XX = range(400, 500)

BAD_BODIES = [  # (label, sender, allowed statuses, method the Allow header must list)
    ("not JSON", post_order(b"{not json"), (400,), None),
    ("empty body", post_order(b""), (400,), None),
    ("invalid UTF-8", post_order(b'\xff\xfe{"item": "book"}'), (400,), None),
    ("JSON array", post_order(b"[1]"), (400,), None),
    ("JSON string", post_order(b'"x"'), (400,), None),
    ("JSON null", post_order(b"null"), (400,), None),
    ("JSON number", post_order(b"2"), (400,), None),
    ("empty object", post_order({}), (400,), None),
    ("missing item", post_order(order_body(item=None)), (400,), None),
    ("missing qty", post_order(order_body(qty=None)), (400,), None),
    ("missing customer", post_order(order_body(customer=None)), (400,), None),
    ("qty true (bool is an int in Python)", post_order(order_body(qty=True)), (400,), None),
    ("qty 0", post_order(order_body(qty=0)), (400,), None),
    ("qty -1", post_order(order_body(qty=-1)), (400,), None),
    ("qty 1.5", post_order(order_body(qty=1.5)), (400,), None),
    ("qty 2.0", post_order(order_body(qty=2.0)), (400,), None),
    ("qty '2'", post_order(order_body(qty="2")), (400,), None),
    ("qty null", post_order(b'{"item": "book", "qty": null, "customer": "ada"}'), (400,), None),
    ("qty with 5000 digits", post_order(b'{"item": "book", "qty": ' + b"1" * 5000 + b', "customer": "ada"}'),
     (400,), None),
    ("qty NaN", post_order(b'{"item": "book", "qty": NaN, "customer": "ada"}'), (400,), None),
    ("item unknown", post_order(order_body(item="car")), (400,), None),
    ("item not a string", post_order(order_body(item=5)), (400,), None),
    ("customer empty", post_order(order_body(customer="")), (400,), None),
    ("customer not a string", post_order(order_body(customer=5)), (400,), None),
    ("ref not a string", post_order(order_body(ref=5)), (400,), None),
    ("item an object (unhashable)", post_order(order_body(item={"a": 1})), (400,), None),
    ("item a list (unhashable)", post_order(order_body(item=["book"])), (400,), None),
    ("item null", post_order(b'{"item": null, "qty": 1, "customer": "ada"}'), (400,), None),
    ("qty an object", post_order(order_body(qty={"n": 1})), (400,), None),
    ("qty a list", post_order(order_body(qty=[1])), (400,), None),
    ("customer an object", post_order(order_body(customer={"name": "ada"})), (400,), None),
    ("customer a list", post_order(order_body(customer=["ada"])), (400,), None),
    ("customer 101 characters", post_order(order_body(customer="a" * 101)), (400,), None),
    ("ref an object", post_order(order_body(ref={"r": 1})), (400,), None),
    ("ref a list", post_order(order_body(ref=["r1"])), (400,), None),
    ("ref true", post_order(order_body(ref=True)), (400,), None),
    ("ref empty", post_order(order_body(ref="")), (400,), None),
    ("deeply nested array", post_order(b"[" * 50000), (400,), None),
    ("deeply nested object", post_order(b'{"a": ' * 10000), (400,), None),
]

BAD_FRAMING = [
    ("body > 64 KiB", post_order(b"x" * 70000), (413,), None),
    ("no Content-Length", raw(b"POST /orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), FOUR_XX, None),
    ("Content-Length abc", raw(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                               b"Connection: close\r\n\r\n{}"), (400,), None),
    ("Content-Length -1", raw(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"
                              b"Connection: close\r\n\r\n{}"), (400,), None),
    # U+00B2 in latin-1: str.isdigit() says yes, int() says no
    ("Content-Length superscript two", raw(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n"
                                           b"Connection: close\r\n\r\n{}"), (400,), None),
    ("Content-Length 100, 10 bytes sent, then EOF",
     raw(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789",
         shutdown_write=True), (400,), None),
]

BAD_PATHS_AND_METHODS = [
    ("GET unknown path", http("GET", "/nope"), (404,), None),
    ("POST unknown path", http("POST", "/nope", ORDER, JSON_HEADERS), (404,), None),
    ("GET /orders/a/b", http("GET", "/orders/a/b"), (404,), None),
    ("GET /orders", http("GET", "/orders"), (405,), "POST"),
    ("DELETE /orders", http("DELETE", "/orders"), (405,), "POST"),
    ("PUT /orders", http("PUT", "/orders", ORDER, JSON_HEADERS), (405,), "POST"),
    ("POST /health", http("POST", "/health", {}, JSON_HEADERS), (405,), "GET"),
    ("POST /orders/<id>", http("POST", "/orders/ord-000001", {}, JSON_HEADERS), (405,), "GET"),
    ("DELETE /orders/<id>", http("DELETE", "/orders/ord-000001"), (405,), "GET"),
    ("BREW /orders (unknown method, not 501)", http("BREW", "/orders"), FOUR_XX, None),
]

GARBAGE_REQUEST_LINES = [
    ("one-word request line", raw(b"GARBAGE\r\n\r\n"), FOUR_XX, None),
    ("four-word request line", raw(b"GET /orders HTTP/1.1 extra\r\nHost: x\r\n\r\n"), FOUR_XX, None),
    ("TLS ClientHello bytes", raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"), FOUR_XX, None),
]


# === API ===


def test_place_get_and_ship_an_order(service):
    assert all(url.startswith("http://127.0.0.1:") for url in service.urls.values()), service.urls
    status, headers, body = request(service.urls["orders"] + "/orders", "POST", ORDER, JSON_HEADERS)
    assert status == 201, body
    assert (header(headers, "Content-Type") or "").startswith("application/json"), headers
    assert body["status"] == "placed" and body["amount"] == 2400 and body["order_id"], body
    order_id = body["order_id"]
    assert header(headers, "Location") == f"/orders/{order_id}", headers

    status, _, got = request(service.urls["orders"] + f"/orders/{order_id}")
    assert status == 200 and got["order_id"] == order_id and got["status"] in ("placed", "shipped"), got
    poll(lambda: request(service.urls["orders"] + f"/orders/{order_id}"),
         lambda r: r[0] == 200 and r[2].get("status") == "shipped", SHIP_TIMEOUT_S, f"{order_id} to be shipped")


def test_health(service):
    status, _, body = request(service.urls["orders"] + "/health")
    assert status == 200, body


def test_head_is_get_without_a_body(service):
    """RFC 9110 section 9.3.2: HEAD wherever GET works, the same status and headers, no body."""
    # raw bytes: http.client never reads a body after HEAD, so it could not see one that should not be there
    status, headers, body = raw_exchange(service.urls["orders"], b"HEAD /health HTTP/1.1\r\nHost: x\r\n"
                                         b"Connection: close\r\n\r\n")  # read to the close: all that was sent
    get_status, get_headers, _ = request(service.urls["orders"] + "/health")
    assert status == get_status == 200 and body == b"", (status, body)
    assert header(headers, "Content-Type") == header(get_headers, "Content-Type")
    assert int(header(headers, "Content-Length")) > 0  # the length a GET's body would have


def test_unknown_order_is_404_json(service):
    got = request(service.urls["orders"] + "/orders/unknown")
    assert error_problems("GET /orders/unknown", got, (404,)) == []


# === BAD INPUT: a 4xx JSON error, never a 5xx, a hang or a traceback ===


@pytest.mark.parametrize("cases", [BAD_BODIES, BAD_FRAMING, BAD_PATHS_AND_METHODS, GARBAGE_REQUEST_LINES],
                         ids=["bad-bodies-400", "bad-framing-4xx", "unknown-paths-404-wrong-methods-405-allow",
                              "garbage-request-lines-4xx"])
def test_bad_input_is_a_4xx_json_error(service, cases):
    problems = run_cases(service, cases)
    assert problems == [], "\n".join(problems)


def test_keeps_serving_after_all_bad_input(service):
    run_cases(service, BAD_BODIES + BAD_FRAMING + BAD_PATHS_AND_METHODS + GARBAGE_REQUEST_LINES)
    assert service.proc.poll() is None, "orders exited after bad input"
    status, _, body = send_unless_shed(post_order(order_body(ref="after-bad")), service)
    assert status == 201, body
    assert request(service.urls["orders"] + "/health")[0] == 200
    assert "Traceback" not in service.stderr(), service.stderr()[-2000:]


# === SIMULATORS: chaos control and ground truth ===


@pytest.mark.parametrize("role", ["payment", "shipping"])
def test_simulator_stats(service, role):
    status, _, stats = request(service.urls[role] + "/stats")
    assert status == 200 and isinstance(stats, dict), stats
    assert STATS_KEYS <= stats.keys(), f"missing {STATS_KEYS - stats.keys()}"
    status, _, stats = request(service.urls[role] + "/stats?refs=1")
    assert status == 200 and isinstance(stats.get("refs"), dict), stats


@pytest.mark.parametrize("role", ["payment", "shipping"])
def test_simulator_chaos_set_read_reset_refuse(service, role):
    chaos = service.urls[role] + "/chaos"
    assert request(chaos, "POST", {"latency_factor": 2}, JSON_HEADERS)[::2] == (200, {"latency_factor": 2})
    assert request(chaos)[::2] == (200, {"latency_factor": 2})
    assert request(chaos, "POST", {}, JSON_HEADERS)[::2] == (200, {})
    assert request(chaos)[::2] == (200, {})
    problems = []
    for label, body in (("non-number knob", {"latency_factor": "x"}), ("unknown knob", {"nope": 1}),
                        ("not JSON", b"{nope"), ("not an object", [1])):
        status, _, answer = request(chaos, "POST", body, JSON_HEADERS)
        if status != 400 or not isinstance(answer, dict) or "error" not in answer:
            problems.append(f"{label}: {status} {answer!r}")
    assert problems == [], "\n".join(problems)
    assert request(chaos)[::2] == (200, {}), "a refused chaos request changed the settings"


def test_payment_ground_truth_counts_the_ref(service):
    status, _, body = request(service.urls["orders"] + "/orders", "POST", order_body(ref="r-x"), JSON_HEADERS)
    assert status == 201, body
    status, _, stats = request(service.urls["payment"] + "/stats?refs=1")
    assert status == 200 and stats["refs"].get("r-x") == 1, stats
    poll(lambda: request(service.urls["shipping"] + "/stats?refs=1")[2],
         lambda s: isinstance(s, dict) and s.get("refs", {}).get("r-x") == 1, SHIP_TIMEOUT_S, "r-x shipped once")


# === PROCESSES ===


def test_help(version_path):
    proc = subprocess.run([sys.executable, version_path, "--help"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--host", "--port", "--role", "--payment-url", "--shipping-url"):
        assert flag in proc.stdout, f"--help does not mention {flag}"


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "65535"], ["--port", "-1"], ["--port", "abc"],
                                  ["--payment-url", "notaurl"], ["--shipping-url", "http://127.0.0.1:99999"]],
                         ids=lambda a: " ".join(a))
def test_bad_flags_are_refused_before_anything_starts(version_path, args):
    """A port with no room for payment and shipping, or a URL no order could reach: usage error, exit 2."""
    proc = subprocess.run([sys.executable, version_path, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert args[0] in proc.stderr and proc.stdout == ""


def test_a_taken_port_is_one_clear_line(version_path):
    """Another copy still running: say so and how to get free ports, never a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, version_path, "--role", "orders", "--port", str(port),
                               "--payment-url", "http://127.0.0.1:9", "--shipping-url", "http://127.0.0.1:9"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "in use" in proc.stderr and "--port 0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_orders_stops_all_three(version_path, sig):
    svc = Service(version_path)
    try:
        if os.path.isdir("/proc"):  # without it, group_members cannot list the group
            assert len(group_members(svc.proc.pid)) == 3, "orders, payment and shipping share one process group"
        os.kill(svc.proc.pid, sig)  # the orders process only: it must stop its own children
        assert svc.wait_group_gone(10), f"still running after {sig.name}: {group_members(svc.proc.pid)}"
        assert "Traceback" not in svc.stderr(), svc.stderr()[-2000:]
    finally:
        svc.stop()


def test_children_exit_when_orders_is_killed(version_path):
    svc = Service(version_path)
    try:
        if os.path.isdir("/proc"):  # without it, group_members cannot list the group
            assert len(group_members(svc.proc.pid)) == 3, "orders, payment and shipping share one process group"
        os.kill(svc.proc.pid, signal.SIGKILL)  # no chance to clean up: the children must notice
        assert svc.wait_group_gone(ORPHAN_TIMEOUT_S), f"orphans left: {group_members(svc.proc.pid)}"
    finally:
        svc.stop()


def start_role(version_path, role, timeout_s=20.0):
    """Start one simulator alone in its own session; return (process, its URL from the READY line)."""
    proc = subprocess.Popen([sys.executable, version_path, "--role", role, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    lines = []
    urls = read_ready(proc, timeout_s, lines) or {}
    if role in urls:
        return proc, urls[role]
    stop_role(proc)
    raise AssertionError(f"--role {role}: no READY line with a {role} URL within {timeout_s} s; output: {lines}")


def stop_role(proc):
    """Kill the process group of a simulator started by start_role, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    proc.stdout.close()


@pytest.mark.parametrize("role", ["payment", "shipping"])
def test_role_alone_prints_ready_and_serves(version_path, role):
    proc, url = start_role(version_path, role)
    try:
        assert url.startswith("http://127.0.0.1:"), url
        status, _, stats = request(url + "/stats")
        assert status == 200 and stats.get("name") == role, stats
    finally:
        stop_role(proc)


def test_orders_alone_uses_given_dependencies(version_path):
    payment, payment_url = start_role(version_path, "payment")
    try:
        shipping, shipping_url = start_role(version_path, "shipping")
        try:
            svc = Service(version_path, "--role", "orders", "--payment-url", payment_url,
                          "--shipping-url", shipping_url)
            try:
                assert svc.urls["payment"] == payment_url and svc.urls["shipping"] == shipping_url, svc.urls
                status, _, body = request(svc.urls["orders"] + "/orders", "POST", order_body(ref="alone"),
                                          JSON_HEADERS)
                assert status == 201, body
                assert request(payment_url + "/stats?refs=1")[2]["refs"].get("alone") == 1
                poll(lambda: request(shipping_url + "/stats?refs=1")[2],
                     lambda s: isinstance(s, dict) and s.get("refs", {}).get("alone") == 1, SHIP_TIMEOUT_S,
                     "the order to reach the given shipping")
            finally:
                svc.stop()
        finally:
            stop_role(shipping)
    finally:
        stop_role(payment)


def test_a_trickling_client_cannot_pin_a_worker(service, version_path):
    """From v0.4 on: the whole request must arrive within a deadline, however slowly bytes trickle in."""
    if version_id(version_path) < "v0_4":
        pytest.skip("client read deadlines arrive in v0.4")
    parts = urlsplit(service.urls["orders"])
    request = b'POST /orders HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"item": "book", "qty": 1'
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        answer = b""
        try:
            for byte in request:  # one byte every 0.3 s: each read is quick, the request never ends
                sock.sendall(bytes([byte]))
                time.sleep(0.3)  # the client's pace (the behaviour under test), not synchronisation
                if time.monotonic() - started > 6:
                    break
        except OSError:
            pass  # cut off: the server closed its end
        try:  # what the server said before it closed, up to the close
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):  # a server that never closes fails on elapsed below
            pass
    elapsed = time.monotonic() - started
    assert elapsed < 6, f"a trickling client held a worker for {elapsed:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), f"expected a close (or a 408), got {answer[:80]!r}"
