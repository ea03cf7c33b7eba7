"""v0.5 idempotency: a retried request is done once, however often it arrives.

Adds:        an `Idempotency-Key` on every call to payment and shipping (the key the business
             logic already names), so a charge that committed and lost its answer is replayed,
             not charged again; and client keys on POST /orders (IETF draft "The
             Idempotency-Key HTTP Header Field", as Stripe does): same key and body -> the first
             answer replayed; a different body -> 422; still in flight -> 409.
Fixes:       `flaky-payment`: duplicate charges 56 -> 0 (every ref charged exactly once).
               python loadtest.py --compare v0_4,v0_5 --scenario flaky-payment
Still breaks: `retry-storm`. Retries are safe now, not polite: when payment struggles (2x
             slower, 80% of charges failing), five immediate attempts per order pile 2.86x the
             work on it in the fault window (payment's own count of busy worker slots).
               python loadtest.py --target v0_5 --scenario retry-storm
Run:         python v0_5_idempotency.py
Diff:        diff -u v0_4_timeouts.py v0_5_idempotency.py
"""

import argparse
import asyncio
import collections
import errno
import http.client
import ipaddress
import io
import itertools
import json
import os
import queue
import random
import selectors
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit

# === CONFIG ===
HOST = "127.0.0.1"
ORDERS_PORT = 8080  # payment and shipping listen on the next two ports
PAYMENT_WORKERS = 4  # payment serves 4 charges at a time...
PAYMENT_SERVICE_MS = 40  # ...40 ms each: capacity C = 4 / 0.040 = 100 charges/s
SHIPPING_WORKERS = 4
SHIPPING_SERVICE_MS = 5  # fast enough for one sequential fulfilment worker to keep up
MAX_BODY_BYTES = 64 * 1024  # larger request bodies get 413
CATALOG_CENTS = {"book": 1200, "mug": 800, "pen": 150}
MAX_QTY = 1000
SEED = 42  # all randomness comes from random.Random(SEED)
MAX_ATTEMPTS = 5  # naive: retry immediately, on any error, up to 5 times in all
ADMIT_RATE_RPS = 90  # 90% of C: random arrivals at utilisation -> 1 queue without bound
ADMIT_BURST = 10  # absorbs a short burst without shedding; small, so queueing stays small
ORDER_WORKERS = 8  # Little's law: 100 orders/s x ~50 ms each = 5 busy on average; 8 leaves headroom
# waits at most 8 / 100 per s = 80 ms when healthy; a buffer, not a parking lot
ACCEPT_QUEUE_MAX = 8
EVENTS_MAX = 30  # ~1 s of shipping even when shipping is 5x slower; past that, intake says 503
CONNECT_TIMEOUT_S = 0.1  # a loopback connect takes well under 1 ms; 100 ms means nobody is there
# healthy p99.9 72 ms (loadtest.py --probe); an admitted call may queue 200 ms
PAYMENT_TIMEOUT_S = 0.25
# healthy p99.9 7 ms (--probe); async, so it must catch a hang, not a 5x brownout
SHIPPING_TIMEOUT_S = 0.1
CALL_DEADLINE_S = 1.0  # one call with all its retries, end to end; then 504
CLIENT_READ_DEADLINE_S = 2.0  # a client gets this long to send its whole request; then we hang up
# a client key is remembered 10 min (Stripe: 24 h); a retry after that is a new order
IDEMPOTENCY_TTL_S = 600
# 10 min at 90 orders/s is 54,000 keys; when full, new keys get 503, never amnesia
IDEMPOTENCY_KEYS_MAX = 100_000

# === BUSINESS LOGIC (identical in every version) ===


class ValidationError(Exception):
    """The client sent an order we cannot accept: answered with 400."""


class DependencyError(Exception):
    """A dependency failed; `status` is our answer: 502 bad or no answer, 504 too slow.

    `retryable`: could the same call succeed if tried again;
    `retry_after_s`: the dependency's hint."""

    def __init__(self, status, detail, retryable=True, retry_after_s=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def parse_order(body):
    """Check the body of POST /orders and return its fields, or raise ValidationError."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise ValidationError("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object")
    item, qty, customer, ref = (data.get(k) for k in ("item", "qty", "customer", "ref"))
    # a dict or list is not even hashable
    if not isinstance(item, str) or item not in CATALOG_CENTS:
        raise ValidationError(f"item must be one of {sorted(CATALOG_CENTS)}")
    if type(qty) is not int or not 1 <= qty <= MAX_QTY:  # type(): True is an int in Python
        raise ValidationError(f"qty must be an integer from 1 to {MAX_QTY}")
    if not isinstance(customer, str) or not 1 <= len(customer) <= 100:
        raise ValidationError("customer must be a string of 1 to 100 characters")
    if ref is not None and (not isinstance(ref, str) or not 1 <= len(ref) <= 100):
        raise ValidationError("ref, when given, must be a string of 1 to 100 characters")
    return {"item": item, "qty": qty, "customer": customer, "ref": ref}


ORDERS = {}  # order_id -> order. One dict operation is atomic in CPython: no lock needed
# per process, from the OS and not the seeded RNG: a restarted orders process must never reuse an
# id, or payment would replay the charge it holds under "charge-<id>" for another order
ORDER_ID_PREFIX = os.urandom(3).hex()
ORDER_IDS = itertools.count(1)


def new_order_id():
    """An id no order has had, in this process or in one before it."""
    return f"ord-{ORDER_ID_PREFIX}-{next(ORDER_IDS):06d}"


def place_order(fields, order_id, store):
    """Charge, then keep the order and its OrderPlaced event in `store`; return the order or raise
    DependencyError. The caller names the order first: payment's key is made from its id."""
    ref = fields["ref"] or order_id
    amount = CATALOG_CENTS[fields["item"]] * fields["qty"]
    call_dependency(
        "payment",
        "/charge",
        {"order_id": order_id, "amount": amount, "ref": ref},
        idempotency_key=f"charge-{order_id}",
    )
    order = dict(fields, order_id=order_id, ref=ref, amount=amount, status="placed")
    store.keep(order, {"type": "OrderPlaced", "order_id": order_id, "ref": ref})
    return order


def fulfil(event, store):
    """Ship one placed order and mark it shipped in `store`, or raise DependencyError."""
    call_dependency(
        "shipping",
        "/ship",
        {"order_id": event["order_id"], "ref": event["ref"]},
        idempotency_key=f"ship-{event['order_id']}",
    )
    store.mark_shipped(event["order_id"])


class MemoryStore:
    """Where orders are kept: ORDERS, and their events on the fulfilment queue. In memory: what
    this process acknowledged dies with it."""

    def keep(self, order, event):
        ORDERS[order["order_id"]] = order
        publish(event)

    def mark_shipped(self, order_id):
        ORDERS[order_id]["status"] = "shipped"


# === RELIABILITY ===
DEPENDENCY_URLS = {}  # "payment"/"shipping" -> base URL, set in MAIN
# bounded: a slow consumer pushes back instead of hiding a backlog
EVENTS = queue.Queue(EVENTS_MAX + ORDER_WORKERS)
# admit() refuses at EVENTS_MAX; the orders already past it (one per worker at most) always
# find room, so publish() never blocks a worker on a full queue after the charge.


class TokenBucket:
    """Admit `rate_per_s` on average and bursts of up to `burst`; refuse the rest at once."""

    def __init__(self, rate_per_s, burst):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def try_take(self):
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate_per_s)
            self.last = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


ADMISSION = TokenBucket(ADMIT_RATE_RPS, ADMIT_BURST)


# admit()'s "no": our status, the JSON error and its detail, headers, and a label to count it by
Refusal = collections.namedtuple("Refusal", ["status", "error", "detail", "headers", "reason"])


def admit():
    """Take a new order? None to accept it, or a Refusal."""
    if EVENTS.qsize() >= EVENTS_MAX:  # backpressure: fulfilment is behind, so stop taking orders
        detail = f"{EVENTS_MAX} orders wait to ship"
        return Refusal(503, "fulfilment backlog full", detail, {"Retry-After": "1"}, "backlog")
    if ADMISSION.try_take():
        return None
    detail = f"over {ADMIT_RATE_RPS} orders/s, retry later"
    return Refusal(503, "overloaded", detail, {"Retry-After": "1"}, "rate")  # RFC 9110


def http_post(url, payload, headers, connect_timeout_s, timeout_s):
    """POST JSON and return the decoded answer, or raise DependencyError."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout_s)
    try:
        conn.connect()
        # None: wait forever. Python applies it per socket operation
        conn.sock.settimeout(timeout_s)
        body = json.dumps(payload).encode()
        # no key: no header
        headers = {name: value for name, value in headers.items() if value is not None}
        conn.request("POST", parts.path, body, {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        data = resp.read()
    except TimeoutError:
        raise DependencyError(504, f"{url} timed out") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DependencyError(502, f"{url} failed: {exc.__class__.__name__}") from None
    finally:
        conn.close()
    # 409 still in flight, 429 and 5xx overloaded or failed; any other 4xx is final
    if resp.status >= 300:
        retryable = resp.status in (409, 429) or resp.status >= 500
        try:
            retry_after_s = parse_digits(resp.getheader("Retry-After", ""), 6)  # seconds
        except ValueError:
            retry_after_s = None  # none, or an HTTP date: ignored
        raise DependencyError(502, f"{url} answered {resp.status}", retryable, retry_after_s)
    try:
        return json.loads(data)
    except ValueError:
        raise DependencyError(502, f"{url} answered with bad JSON") from None


def call_dependency(name, path, payload, idempotency_key=None):
    """Call a dependency: timeouts on every attempt, a deadline on all of them together."""
    timeout_s = {"payment": PAYMENT_TIMEOUT_S, "shipping": SHIPPING_TIMEOUT_S}[name]
    deadline = time.monotonic() + CALL_DEADLINE_S
    # the same key on every attempt: done at most once
    headers = {"Idempotency-Key": idempotency_key}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise DependencyError(504, f"{name} gave no answer within {CALL_DEADLINE_S} s")
        try:
            return http_post(
                DEPENDENCY_URLS[name] + path,
                payload,
                headers,
                CONNECT_TIMEOUT_S,
                min(timeout_s, remaining_s),
            )
        except DependencyError:
            if attempt == MAX_ATTEMPTS:
                raise


class IdempotencyStore:
    """Client keys -> the first answer (IETF Idempotency-Key draft; Stripe replays it whole)."""

    def __init__(self, ttl_s, max_keys):
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self.clock = time.monotonic
        # key -> [fields, answer or None while in flight, created]
        self.entries = collections.OrderedDict()
        self.lock = threading.Lock()  # checking a key and reserving it must be one step

    def begin(self, key, fields):
        """Reserve `key` for this order: None to go ahead, or the answer to send instead."""
        with self.lock:
            now = self.clock()
            while self.entries and next(iter(self.entries.values()))[2] <= now - self.ttl_s:
                self.entries.popitem(last=False)  # oldest first: keys expire in the order they came
            if key not in self.entries:
                if len(self.entries) >= self.max_keys:
                    refusal = {"error": "overloaded", "detail": "too many idempotency keys"}
                    return 503, refusal, {"Retry-After": "1"}
                self.entries[key] = [fields, None, now]
                return None
            first, answer, _ = self.entries[key]
            if first != fields:
                detail = "this Idempotency-Key was sent with another body"
                return 422, {"error": "key reused", "detail": detail}, {}
            if answer is None:
                detail = "a request with this key is still in progress"
                return 409, {"error": "in flight", "detail": detail}, {}
            # a 5xx too: its charge may have committed, so doing it again could charge twice
            return answer

    def finish(self, key, answer):
        """Remember our answer to replay it; a 503 did nothing, so its key is let go for a retry."""
        with self.lock:
            if answer[0] == 503:
                self.entries.pop(key, None)
            elif key in self.entries:
                self.entries[key][1] = answer


IDEMPOTENCY = IdempotencyStore(IDEMPOTENCY_TTL_S, IDEMPOTENCY_KEYS_MAX)


def publish(event):
    """Put an event on the queue for the fulfilment worker."""
    EVENTS.put(event)


def fulfilment_worker(store):
    """Ship placed orders one at a time. Naive: a shipment that fails is dropped for good."""
    while True:
        event = EVENTS.get()
        try:
            fulfil(event, store)
        except DependencyError as exc:
            print(f"shipment of {event['order_id']} dropped: {exc.detail}", file=sys.stderr)
        except Exception as exc:  # one bad event must never stop fulfilment
            print(f"fulfilment of {event['order_id']} failed: {exc!r}", file=sys.stderr)


# === HTTP FRONT DOOR ===
# every route and the one method it allows; "/orders/{id}" stands for any one order
ROUTES = {"/orders": "POST", "/orders/{id}": "GET", "/health": "GET"}


class OrdersAPI:
    """The orders API, the routes in ROUTES: what a client of ours sees. It becomes
    OrdersHandler below, on HTTPPlumbing, which does the protocol's corners."""

    def setup(self):
        self.request, received = self.request  # the socket, and what RequestReader read
        super().setup()
        self.rfile = io.BytesIO(received)  # the whole request: no read here waits on a client

    def do_GET(self):
        route = route_of(self.path)
        if route == "/health" and DEAD_THREADS:  # a worker that died: nothing it did still happens
            return self.error(503, "unhealthy", f"background thread died: {DEAD_THREADS}")
        if route == "/health":
            return self.reply(200, {"status": "ok"})
        order_id = urlsplit(self.path).path.removeprefix("/orders/")
        if route == "/orders/{id}" and order_id in ORDERS:
            return self.reply(200, ORDERS[order_id])
        if route == "/orders/{id}":
            return self.error(404, "not found", f"no order {order_id!r}")
        self.do_other()

    def do_POST(self):
        if route_of(self.path) != "/orders":
            return self.do_other()
        # read first: closing on unread bytes sends RST and loses our answer
        body = self.read_body()
        if body is None:
            return
        try:
            fields = parse_order(body)
        except ValidationError as exc:
            return self.error(400, "invalid order", str(exc))
        keys = self.headers.get_all("Idempotency-Key")  # two are a 400: which one would we honour?
        # RFC 9110 section 5.5: no whitespace around a value
        key = None if keys is None else keys[0].strip(" \t")
        if keys is not None and (len(keys) > 1 or not 1 <= len(key) <= 255):
            return self.error(400, "invalid Idempotency-Key", "send one, of 1 to 255 characters")
        refusal = admit()  # after validation: bad input hears "400, fix it", never "503, retry"
        if refusal:
            return self.error(refusal.status, refusal.error, refusal.detail, refusal.headers)
        if key is None:
            return self.reply(*self.place(fields))
        answer = IDEMPOTENCY.begin(key, fields)  # None: a new key, reserved for us
        if answer is None:
            try:
                answer = self.place(fields)
            # if place() raised (a bug), a 503 lets the key go: never stuck in flight for good
            finally:
                IDEMPOTENCY.finish(key, answer or (503, None, None))
        self.reply(*answer)

    def place(self, fields):
        """Place the order and return our answer to it: (status, JSON object, headers)."""
        try:
            order = place_order(fields, new_order_id(), self.server.store)
        except DependencyError as exc:
            return exc.status, {"error": "payment failed", "detail": exc.detail}, {}
        answer = {k: order[k] for k in ("order_id", "status", "amount")}
        return 201, answer, {"Location": f"/orders/{order['order_id']}"}

    def error(self, status, error, detail, headers=None):
        """Send a JSON error: what went wrong, and a detail to act on."""
        self.reply(status, {"error": error, "detail": detail}, headers)

    def reply(self, status, obj, headers=None):
        """Send one JSON answer and close the connection."""
        body = json.dumps(obj).encode()
        self.close_connection = True
        try:
            self.send_response(status)
            for key, value in {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "Connection": "close",
                **(headers or {}),
            }.items():
                self.send_header(key, value)
            self.end_headers()
            # RFC 9110 section 9.3.2: no body
            self.wfile.write(b"" if self.command == "HEAD" else body)
        except OSError:
            pass  # the client has gone; nothing left to tell it


class HTTPPlumbing(BaseHTTPRequestHandler):
    """Protocol plumbing, nothing about orders, the same in every version (a test holds it so):
    the RFC 9110 and 9112 corners http.server misses, and its refusals JSON errors (self.error)."""

    server_version = "orders"
    # headers and body in one packet: no 40 ms Nagle/delayed-ACK stall
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"  # as all our answers say; and only 1.1 may send 100 Continue

    def parse_request(self):
        """http.server's parser, plus the RFC 9112 corners it misses; a refusal is a JSON 400."""
        # section 2.2: skip an empty line before the request line
        if self.raw_requestline in (b"\r\n", b"\n"):
            self.raw_requestline = self.rfile.readline(65537)
        # HTTP/0.9 "GET /path": the stdlib would wait for headers
        if len(self.raw_requestline.split()) == 2:
            # send_error needs them; the stdlib has not set them yet
            self.requestline = ""
            self.command = None
            return self.send_error(400, "HTTP/0.9 is not supported: send HTTP/1.0 or HTTP/1.1")
        if not super().parse_request():
            return False
        # a line with no colon: the stdlib reads it, and all after it, as the body
        if self.headers.defects:
            return self.error(400, "malformed header", "each header line is Name: value")
        try:
            urlsplit(self.path)  # an absolute-form target with a bad host raises: http://[/health
        except ValueError:
            return self.error(400, "bad request", "malformed request target")
        return True

    def do_HEAD(self):
        # GET's answer without its body (RFC 9110 section 9.3.2): reply() leaves it out
        self.do_GET()

    def do_other(self):
        """Unknown path: 404. Known path, wrong method: 405 with Allow."""
        route = route_of(self.path)
        if route is None:
            return self.error(404, "not found", f"no such path {self.path!r}")
        allow = ROUTES[route]
        self.error(405, "method not allowed", f"{route} allows {allow}", {"Allow": allow})

    def __getattr__(self, name):
        """Any other method (PUT, DELETE, BREW...) is routed to do_other, never a 501."""
        if name.startswith("do_"):
            return self.do_other
        raise AttributeError(name)

    def read_body(self):
        """Read the request body, or answer 411/400/413 and return None."""
        # two of them are a 400 (RFC 9112 section 6.3); OWS around one is fine
        lengths = self.headers.get_all("Content-Length")
        if lengths is None:
            return self.error(411, "length required", "send a Content-Length header")
        try:
            length = parse_digits(", ".join(v.strip(" \t") for v in lengths), 20)
        except ValueError:
            return self.error(400, "bad request", "send one Content-Length: a non-negative integer")
        if length > MAX_BODY_BYTES:
            return self.error(413, "body too large", f"at most {MAX_BODY_BYTES} bytes")
        expect = self.headers.get("Expect", "").lower()  # the client waits ~1 s for it
        if expect == "100-continue" and self.request_version == "HTTP/1.1":
            super().handle_expect_100()
        body = self.rfile.read(length)
        if len(body) == length:
            return body
        self.error(400, "bad request", "body shorter than Content-Length")

    def handle_expect_100(self):
        """Expect: 100-continue: read_body sends it once it wants the body; a refusal is final."""
        return True

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (bad request line, huge headers) as JSON too."""
        self.request_version = "HTTP/1.0"  # a garbled request line leaves HTTP/0.9: no status line
        self.error(code, HTTPStatus(code).phrase, message or explain or "")

    def log_message(self, format, *args):
        pass  # no access log: at hundreds of requests/s it would cost more than the work


def route_of(target):
    """The route a request target names, origin-form (/orders) or absolute-form alike, or None."""
    try:
        path = urlsplit(target).path  # http://host/orders is /orders too (RFC 9112 section 3.2.2)
    except ValueError:  # a bad host in absolute-form: http://[/health
        return None
    if path.startswith("/orders/") and path.count("/") == 2 and path != "/orders/":
        return "/orders/{id}"
    return path if path in ROUTES else None


def parse_digits(text, max_digits):
    """A number in ASCII digits only, at most max_digits of them, or ValueError: the one parser
    for every number we are sent. int() alone takes " 5", "+5", "5_0" and Arabic digits;
    str.isdigit() alone takes "²", which int() refuses."""
    if not (text.isascii() and text.isdigit() and len(text) <= max_digits):
        raise ValueError(f"{text[:20]!r} is not a number of at most {max_digits} digits")
    return int(text)


class OrdersHandler(OrdersAPI, HTTPPlumbing):
    """What OrdersServer runs for each connection: the orders API on the plumbing."""


class PendingRequest:
    """The bytes of one request read so far: whole yet?"""

    def __init__(self, client_address):
        self.client_address = client_address
        self.data = b""
        self.deadline = time.monotonic() + CLIENT_READ_DEADLINE_S
        self.continued = False  # "100 Continue" sent

    def head_end(self):
        """Where the body starts, or -1 while the head is still coming."""
        for blank in (b"\r\n\r\n", b"\n\n"):
            end = self.data.find(blank)
            if end >= 0:
                return end + len(blank)
        return -1

    def whole(self):
        """Read enough for a worker? Anything odd goes on at once: the handler answers it."""
        line, newline, _ = self.data.lstrip(b"\r\n").partition(b"\n")
        if newline and len(line.split()) != 3:
            return True  # not METHOD TARGET HTTP/1.x (HTTP/0.9 has two words)
        end = self.head_end()
        if end < 0:
            return len(self.data) > MAX_BODY_BYTES  # a head this long: the handler says 431
        lengths = []
        for header in self.data[:end].split(b"\n")[1:]:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                lengths.append(value.strip())
        try:
            length = parse_digits(b", ".join(lengths).decode("latin-1"), 9)
        except ValueError:
            return True  # no length, or none to wait for: the handler says which
        if length > MAX_BODY_BYTES or self.expects_continue() and not self.is_order():
            return True  # refused unread: the handler answers 413, 404 or 405, and no 100
        return len(self.data) - end >= length

    def is_order(self):
        """POST /orders? Words split as whole() splits them (a tab separates them too)."""
        words = self.data.lstrip(b"\r\n").split(b"\n", 1)[0].split()
        if len(words) != 3:
            return False
        return words[0] == b"POST" and route_of(words[1].decode("latin-1")) == "/orders"

    def expects_continue(self):
        """Expect: 100-continue in HTTP/1.1: the client waits for our word to send the body."""
        head = self.data[: self.head_end()].lower()
        request_line = head.lstrip(b"\r\n").split(b"\n")[0]
        return request_line.rstrip().endswith(b"http/1.1") and b"expect: 100-continue" in head

    def for_worker(self):
        """The request as a worker reads it: an expectation already met is not passed on."""
        if not self.continued:
            return self.data
        end = self.head_end()
        lines = self.data[:end].split(b"\n")
        kept = [line for line in lines if not line.lower().startswith(b"expect:")]
        return b"\n".join(kept) + self.data[end:]


class RequestReader:
    """Read each request whole before any worker sees it, as nginx does: a slow or idle client
    costs a socket and a few bytes, never a worker. One thread, one selector; a request not
    whole within CLIENT_READ_DEADLINE_S is answered 408."""

    def __init__(self, server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.pending = {}  # socket -> PendingRequest, oldest first (dicts keep their order)
        self.arrived = queue.SimpleQueue()  # new connections, from the accepting thread
        self.wakeup, self.waker = socket.socketpair()
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        threading.Thread(target=self.run, daemon=True).start()

    def add(self, sock, client_address):
        """From the accepting thread: read this connection's request."""
        self.arrived.put((sock, client_address))
        self.waker.send(b"!")

    def run(self):
        while True:
            for key, _ in self.selector.select(timeout=0.05):
                if key.fileobj is self.wakeup:
                    self.take_arrived()
                else:
                    self.read(key.fileobj)
            self.time_out_late()

    def take_arrived(self):
        self.wakeup.recv(4096)
        while not self.arrived.empty():
            sock, client_address = self.arrived.get()
            sock.setblocking(False)
            self.pending[sock] = PendingRequest(client_address)
            self.selector.register(sock, selectors.EVENT_READ)

    def read(self, sock):
        request = self.pending[sock]
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""  # reset: the handler finds the request cut short
        request.data += chunk
        if chunk and not request.whole():
            if request.head_end() >= 0 and request.expects_continue() and not request.continued:
                request.continued = True  # RFC 9110 section 10.1.1: we want the body
                send_now(sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self.forget(sock)
        sock.setblocking(True)
        self.server.dispatch(sock, request.client_address, request.for_worker())

    def time_out_late(self):
        """408 to requests not whole in time; the oldest come first: stop at the first in time."""
        now = time.monotonic()
        late = []
        for sock, request in self.pending.items():
            if now < request.deadline:
                break
            late.append(sock)
        for sock in late:
            self.forget(sock)
            detail = f"send the whole request within {CLIENT_READ_DEADLINE_S} s"
            send_now(sock, answer_bytes(408, {"error": "request timeout", "detail": detail}))
            self.server.shutdown_request(sock)

    def forget(self, sock):
        self.selector.unregister(sock)
        del self.pending[sock]


def answer_bytes(status, obj, headers=""):
    """A whole JSON answer as bytes, for the threads that answer without a handler."""
    body = json.dumps(obj).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"{headers}Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def send_now(sock, data):
    """A few bytes into an empty send buffer: never blocks, and a client gone is no error."""
    try:
        sock.send(data)
    except OSError:
        pass


class OrdersServer(HTTPServer):
    """A fixed pool of ORDER_WORKERS threads behind a bounded queue of accepted connections."""

    # the default 5 drops SYNs under a burst: a dropped SYN is resent after 1 s
    request_queue_size = 1024
    open_connections = 0  # accepted and not yet closed: a graceful stop waits for them
    open_connections_lock = threading.Lock()
    overloaded = json.dumps(
        {"error": "overloaded", "detail": "all workers busy, retry later"}
    ).encode()

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.accepted = queue.Queue(ACCEPT_QUEUE_MAX)
        self.reader = RequestReader(self)
        for _ in range(ORDER_WORKERS):
            threading.Thread(target=self.work, daemon=True).start()

    def process_request(self, request, client_address):
        """serve_forever calls this for every new connection: RequestReader reads it first."""
        self.reader.add(request, client_address)

    def dispatch(self, request, client_address, received):
        """A request read whole: queue it for a worker, or shed it if the queue is full."""
        try:
            self.accepted.put_nowait((request, client_address, received))
        except queue.Full:
            self.shed(request)

    def work(self):
        """One pool thread: serve queued connections one after another, forever."""
        while True:
            request, client_address, received = self.accepted.get()
            try:
                self.finish_request((request, received), client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def shed(self, request):
        """Answer 503 from the reader's thread, in microseconds, without taking a worker."""
        request.setblocking(False)
        try:
            # drain what has arrived: closing on unread bytes sends RST
            request.recv(MAX_BODY_BYTES)
        except OSError:
            pass
        try:
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(self.overloaded), self.overloaded)
            )
        except OSError:
            pass
        self.shutdown_request(request)

    def verify_request(self, request, client_address):  # every connection we accept: count it
        with self.open_connections_lock:
            self.open_connections += 1
        return True

    def shutdown_request(self, request):  # done with it, answered or shed: uncount it, once
        # closed already (fileno -1), uncounted already: a Ctrl-C that lands in process_request
        # right after the handler's thread started has socketserver close it under that thread
        counted = request.fileno() != -1
        super().shutdown_request(request)
        if counted:
            with self.open_connections_lock:
                self.open_connections -= 1

    def handle_error(self, request, client_address):
        print(f"error serving {client_address}: {sys.exc_info()[1]!r}", file=sys.stderr)


# === WORLD: SIMULATED DEPENDENCIES (identical in every version) ===
# Payment and shipping are one asyncio simulator: `workers` slots of `service_ms` each behind
# an unbounded FIFO, like a naive real dependency. It finishes work whose caller has gone.
CHAOS_KNOBS = {
    "latency_factor": (1, 100),
    "error_rate": (0, 1),
    "ambiguous_rate": (0, 1),
    "hang_rate": (0, 1),
    # knob -> its range; blackhole and down are 0/1 switches
    "blackhole": (0, 1),
    "down": (0, 1),
    "workers": (1, 64),  # worker slots in service: capacity changes, quietly (an integer)
}
# our callers send a request in one write: a trickle or a short body is cut off
REQUEST_READ_S = 1.0
# a worker slot's next call starts when the last one was due to end, not when the event loop got
# round to it, up to this late: on a busy core, wake-ups a millisecond or two late would cost
# payment 3-5 % of its capacity (96 of 100 calls/s measured at 10 C), and capacity is the world's
# given, never the host's
CATCH_UP_S = 0.01


class BadRequest(Exception):
    """A request we refuse: args are (status, detail), and the detail is ours, never Python's."""


class Dependency:
    """A simulated dependency with finite capacity, chaos control and ground truth."""

    def __init__(self, name, workers, service_ms, seed):
        self.name = name
        self.workers = workers
        self.service_s = service_ms / 1000
        self.rng = random.Random(seed)
        self.chaos = {}
        self.stats = collections.Counter()
        self.commits = collections.Counter()  # ref -> times committed: duplicates show here
        # ref -> calls received, cheap refusals (409, replay) included
        self.calls = collections.Counter()
        # ref -> calls that took a worker slot: the real work done
        self.worked = collections.Counter()
        self.answers = {}  # Idempotency-Key -> [request body, answer (None while in flight)]
        self.busy = 0  # worker slots serving a call
        self.freed = collections.deque()  # when each free slot was due to fall free, oldest first
        self.slot_freed = asyncio.Event()  # set when a call ends or the workers knob changes

    async def handle(self, reader, writer):
        """Serve one connection: one request, one answer, close."""
        try:
            method, path, query, headers, body = await asyncio.wait_for(
                read_request(reader, writer), REQUEST_READ_S
            )
            if (method, path) == ("POST", "/chaos"):
                await respond(
                    writer, 200, self.set_chaos(json.loads(body or b"{}", parse_constant=int))
                )
            elif (method, path) == ("GET", "/chaos"):
                await respond(writer, 200, self.chaos)
            elif (method, path) == ("GET", "/stats"):
                await respond(writer, 200, self.snapshot(with_refs="refs=1" in query))
            elif (method, path) == ("POST", {"payment": "/charge", "shipping": "/ship"}[self.name]):
                # int("NaN") fails
                await self.serve(reader, writer, headers, json.loads(body, parse_constant=int))
            else:
                await respond(writer, 404, {"error": "not found", "detail": f"{method} {path}"})
        except BadRequest as exc:
            status, detail = exc.args
            await respond(
                writer, status, {"error": HTTPStatus(status).phrase.lower(), "detail": detail}
            )
        # from json.loads: NaN and Infinity are not JSON; "[[[[..." too deep
        except (ValueError, RecursionError):
            await respond(writer, 400, {"error": "bad request", "detail": "body is not valid JSON"})
        except asyncio.LimitOverrunError:  # the head, or one line of it, over 64 KiB
            await respond(
                writer, 431, {"error": "request header fields too large", "detail": "over 64 KiB"}
            )
        # EOF inside the head or the body (a half-close still hears why)
        except asyncio.IncompleteReadError:
            await respond(
                writer, 400, {"error": "bad request", "detail": "the request ended early"}
            )
        except asyncio.TimeoutError:  # before OSError: TimeoutError is one from Python 3.11 on
            await respond(
                writer,
                408,
                {"error": "request timeout", "detail": f"send it in {REQUEST_READ_S} s"},
            )
        except OSError:
            pass  # the caller went away mid-request
        # a bug costs one connection, never the simulator, and prints no traceback
        except Exception as exc:
            print(f"{self.name}: cannot serve a request: {exc!r}", file=sys.stderr)
        finally:
            writer.close()

    def set_chaos(self, chaos):
        """Replace the chaos settings ({} heals); refuse unknown knobs and values out of range."""
        if not isinstance(chaos, dict):
            raise BadRequest(400, "chaos is a JSON object")
        # a latency_factor of 1e308 would wedge every worker for good
        for knob, value in chaos.items():
            low, high = CHAOS_KNOBS.get(knob, (1, 0))  # an unknown knob: an empty range
            if knob in ("blackhole", "down"):
                valid = value in (0, 1)
            elif knob == "workers":
                valid = type(value) is int and low <= value <= high  # type(): True is an int
            else:
                valid = type(value) in (int, float) and low <= value <= high  # NaN is in no range
            if not valid:
                raise BadRequest(
                    400,
                    "chaos knobs: latency_factor 1 to 100; error_rate, ambiguous_rate, "
                    "hang_rate 0 to 1; blackhole, down true or false; workers an integer 1 to 64",
                )
        self.chaos = {knob: value for knob, value in chaos.items() if value}
        self.slot_freed.set()  # more slots, maybe: dispatch looks again
        return self.chaos

    def slots(self):
        """Worker slots in service now: the workers knob if set, else the built-in count."""
        return self.chaos.get("workers", self.workers)

    async def serve(self, reader, writer, headers, payload):
        """One call: check it, then chaos, then Idempotency-Key, then the FIFO and a worker slot."""
        fields = {
            "order_id": str,
            "ref": str,
            **({"amount": int} if self.name == "payment" else {}),
        }
        if not isinstance(payload, dict) or any(
            type(payload.get(k)) is not t for k, t in fields.items()
        ):
            raise BadRequest(
                400,
                "a JSON object of " + ", ".join(f"{k} ({t.__name__})" for k, t in fields.items()),
            )
        budget_ms = headers.get("x-deadline-ms")  # relative, like gRPC's grpc-timeout
        try:  # up to 8 digits, as grpc-timeout's
            deadline_s = None if budget_ms is None else parse_digits(budget_ms, 8) / 1000
        except ValueError:
            deadline_s = 0
        if deadline_s == 0:
            raise BadRequest(400, "X-Deadline-Ms is a positive whole number of milliseconds")
        self.stats["calls"] += 1  # only now: a refused call must never reserve its Idempotency-Key
        self.calls[str(payload["ref"])] += 1
        key = headers.get("idempotency-key")
        chaos = self.chaos
        if chaos.get("down"):
            return writer.transport.abort()  # reset at once, as fast as a refused connect
        if chaos.get("blackhole") or self.rng.random() < chaos.get("hang_rate", 0):
            return await self.hold_open(reader)
        if key in self.answers:  # as real payment APIs do: replay, 409 in flight, 422 misuse
            first, answer = self.answers[key]
            status = 422 if first != payload else 409 if answer is None else 200
            if status == 200:
                self.stats["replayed"] += 1
            return await respond(writer, status, answer or {"error": HTTPStatus(status).phrase})
        if key:
            self.answers[key] = [payload, None]
        job = {
            "ref": str(payload["ref"]),
            "key": key,
            "gone": False,
            "eof": False,
            "committed": False,
            "deadline": time.monotonic() + deadline_s if deadline_s else None,
            "queued_at": time.monotonic(),
            "done": asyncio.get_running_loop().create_future(),
        }
        watcher = asyncio.ensure_future(self.watch_caller(reader, job))
        self.queue.put_nowait(job)
        self.stats["queue_peak"] = max(self.stats["queue_peak"], self.queue.qsize())
        status, answer = await job["done"]
        watcher.cancel()
        if status is None or job["gone"]:
            # ambiguous: committed, and then the answer is lost (or nobody is there)
            writer.transport.abort()
        else:
            await respond(writer, status, answer)
            # a half-close or a hang-up: only our answer tells them apart (see watch_caller)
            if job["eof"]:
                # time for the reset to come back; on loopback it is there at once
                await asyncio.sleep(0.05)
                # closed by the transport if the write failed
                sock = writer.get_extra_info("socket")
                job["gone"] = writer.is_closing() or bool(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                )
        if job["gone"] and job["committed"]:
            self.stats["zombie"] += 1  # work finished for a caller that had gone

    async def watch_caller(self, reader, job):
        """Notice a caller that resets while its call waits; bytes after the request are ignored."""
        # EOF is no hang-up: a caller that half-closes (SHUT_WR) still waits, and TCP shows that
        # just like a close. So the call goes on and is answered; a caller that had closed
        # resets at our answer (serve).
        try:
            while await reader.read(1024):
                pass
            job["eof"] = True
        except OSError:  # ConnectionResetError
            job["gone"] = True

    async def hold_open(self, reader):
        """Hang: never answer; hold the connection until the caller closes it."""
        self.stats["hung"] += 1
        self.stats["held_open"] += 1
        # until EOF: with no answer to write, a close and a half-close look alike, and both release
        # it
        try:
            while await reader.read(1024):
                pass
        finally:
            self.stats["held_open"] -= 1

    async def dispatch(self):
        """Start the queued calls in FIFO order, each as soon as a worker slot is free."""
        while True:
            while self.busy >= self.slots():  # every slot busy, or taken out of service
                self.slot_freed.clear()
                await self.slot_freed.wait()
            job = await self.queue.get()
            self.busy += 1
            asyncio.ensure_future(self.work(job))

    async def work(self, job):
        """One call in a worker slot: spend the service time, commit, answer."""
        end = time.monotonic()
        try:
            # a slot with no schedule yet (or a new one) starts now
            slot_free_at = self.freed.popleft() if self.freed else time.monotonic()
            begin = max(job["queued_at"], slot_free_at, time.monotonic() - CATCH_UP_S)
            end = begin
            if job["deadline"] and time.monotonic() > job["deadline"]:
                self.stats["expired_dropped"] += 1  # nobody can use the answer: skip the work
                self.answers.pop(job["key"], None)
                job["done"].set_result((504, {"error": "deadline exceeded"}))
                return
            self.stats["in_flight"] += 1
            self.stats["worked"] += 1
            self.worked[job["ref"]] += 1
            end = begin + self.service_s * self.chaos.get("latency_factor", 1)
            await asyncio.sleep(end - time.monotonic())
            self.stats["in_flight"] -= 1
            roll = self.rng.random()
            error_rate = self.chaos.get("error_rate", 0)
            if roll < error_rate:
                self.stats["failed"] += 1
                self.answers.pop(job["key"], None)
                job["done"].set_result((500, {"error": "injected failure, nothing committed"}))
                return
            self.commits[job["ref"]] += 1
            self.stats["commits"] += 1
            job["committed"] = True  # zombie work if serve() finds its caller gone
            answer = {"ref": job["ref"], "status": "committed"}
            if job["key"]:
                self.answers[job["key"]][1] = answer
            if roll < error_rate + self.chaos.get("ambiguous_rate", 0):
                self.stats["ambiguous"] += 1
                answer = self.rng.choice([(500, {"error": "failed after commit"}), (None, None)])
                job["done"].set_result(answer)
            else:
                job["done"].set_result((200, answer))
        except Exception as exc:  # a bug costs one call, never a slot of capacity
            print(f"{self.name}: a call failed in a worker: {exc!r}", file=sys.stderr)
            if not job["done"].done():
                job["done"].set_result((500, {"error": "internal error"}))
        finally:
            self.freed.append(end)
            self.busy -= 1
            # a slot the workers knob took out of service takes its schedule with it: an old one
            # left here would start every later call up to CATCH_UP_S early (65 calls/s on 2 slots)
            while len(self.freed) > max(0, self.slots() - self.busy):
                self.freed.popleft()
            self.slot_freed.set()

    def snapshot(self, with_refs):
        """Ground truth: what really happened here, whatever the callers believe."""
        snap = {
            "name": self.name,
            "capacity_rps": self.slots() / self.service_s,
            "chaos": self.chaos,
            "queue_depth": self.queue.qsize(),
            "unique_refs": len(self.commits),
            "duplicates": sum(1 for n in self.commits.values() if n > 1),
        }
        for key in (
            "calls",
            "worked",
            "commits",
            "replayed",
            "failed",
            "ambiguous",
            "hung",
            "held_open",
            "in_flight",
            "queue_peak",
            "zombie",
            "expired_dropped",
        ):
            snap[key] = self.stats[key]
        if with_refs:  # per ref: commits, calls (cheap ones too) and calls that took a worker slot
            snap.update(
                refs=dict(self.commits),
                calls_by_ref=dict(self.calls),
                work_by_ref=dict(self.worked),
            )
        return snap

    async def run(self, host, port):
        """Listen and serve until our parent process is gone (so no orphan outlives it)."""
        self.queue = asyncio.Queue()  # unbounded: a naive dependency never says no
        dispatcher = asyncio.ensure_future(self.dispatch())
        server = await asyncio.start_server(self.handle, host, port, backlog=4096)
        announce({self.name: base_url(host, server.sockets[0].getsockname()[1])})
        parent = os.getppid()
        async with server:
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
        dispatcher.cancel()


async def read_request(reader, writer):
    """Read one HTTP/1.x request: (method, path, query, headers, body), or raise BadRequest."""
    lines = []
    size = 0
    # up to the empty line; a bare LF ends a line too (RFC 9112 section 2.2)
    while not lines or lines[-1]:
        # a line over 64 KiB: LimitOverrunError
        line = (await reader.readuntil(b"\n")).decode("latin-1")
        size += len(line)
        if size > MAX_BODY_BYTES:
            raise asyncio.LimitOverrunError("request head over 64 KiB", size)
        if lines or line.strip("\r\n"):  # an empty line before the request line is skipped (ibid.)
            lines.append(line.rstrip("\r\n"))
    words = lines[0].split(" ")
    headers = {}
    if len(words) != 3:
        raise BadRequest(400, "the request line is: METHOD TARGET HTTP/1.1")
    for name, colon, value in (line.partition(":") for line in lines[1:-1]):
        # RFC 9112 section 5.1: no whitespace before the colon
        if not colon or name != name.strip():
            raise BadRequest(400, "malformed header line")
        # which one frames the body?
        if name.lower() == "content-length" and name.lower() in headers:
            raise BadRequest(400, "more than one Content-Length")
        headers[name.lower()] = value.strip()
    try:
        length = parse_digits(headers.get("content-length", "0"), 20)
    except ValueError:
        length = -1  # a chunked body is refused alike: we read no Transfer-Encoding
    if "transfer-encoding" in headers or length < 0:
        raise BadRequest(400, "frame the body with a Content-Length: a non-negative integer")
    if length > MAX_BODY_BYTES:
        raise BadRequest(413, f"a body of at most {MAX_BODY_BYTES} bytes")
    if words[0] == "POST" and "content-length" not in headers:
        raise BadRequest(411, "send a Content-Length header")  # as orders does: no guessing
    if headers.get("expect", "").lower() == "100-continue" and length:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the caller waits for it to send the body
    path, _, query = words[1].partition("?")
    return words[0], path, query, headers, await reader.readexactly(length)


async def respond(writer, status, obj):
    """Write one JSON answer in a single write (no Nagle stall); a caller gone is no error."""
    body = json.dumps(obj).encode()
    writer.write(
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    try:
        await writer.drain()
    except OSError:
        pass  # reset by the caller: nobody is left to tell


# === MAIN ===


def announce(urls):
    """Print the machine-readable READY line and a short banner for humans, in one write."""
    banner = ""  # one write: a reader that closes the pipe after READY must not kill us
    if "orders" in urls:
        banner = (
            f"\n{__doc__.splitlines()[0]}\n"
            f"  orders    {urls['orders']}   "
            + ", ".join(f"{method} {route}" for route, method in ROUTES.items())
            + "\n"
            f"  payment   {urls['payment']}   chaos: POST /chaos, ground truth: GET /stats\n"
            f"  shipping  {urls['shipping']}   (the same)\nTry:\n"
            f"  curl -si {urls['orders']}/orders"
            f" -d '{{\"item\": \"book\", \"qty\": 1, \"customer\": \"ada\"}}'\n"
            f"  curl -s {urls['payment']}/chaos -d '{{\"latency_factor\": 5}}'"
            "   # brownout; '{}' heals\n"
            "Ctrl-C stops all three processes."
        )
    print("READY " + json.dumps(urls) + banner, flush=True)


DEAD_THREADS = []  # background threads that died; /health fails while any is listed


def thread_died(args):
    """threading.excepthook: a background thread that dies is reported, and /health fails."""
    DEAD_THREADS.append(args.thread.name)
    print(f"{args.thread.name} died: {args.exc_value!r}", file=sys.stderr)


# Ctrl-C, SIGTERM: time to finish the requests in progress (healthy: ~50 ms) and ship the queue
# (5 ms a shipment); short, so Ctrl-C stays prompt. gunicorn and Kubernetes give 30 s
STOP_GRACE_S = 2.0
# nothing shipped for this long: shipping is down or gone, and waiting on saves nothing
STOP_STALL_S = 0.5


def unshipped_orders():
    """Orders we acknowledged with a 201 that have not shipped (yet, or ever)."""
    return sum(1 for order in list(ORDERS.values()) if order["status"] != "shipped")


def stop_gracefully(server):
    """Stop taking connections, finish those taken, give fulfilment STOP_GRACE_S, say what is left.

    A second Ctrl-C (a KeyboardInterrupt in here) stops at once."""
    server.timeout = 0
    # what the kernel accepted for us already is ours to answer: closing the listening socket
    # would reset it
    for _ in range(server.request_queue_size):
        if not select.select([server.socket], [], [], 0)[0]:
            break
        server.handle_request()
    server.socket.close()  # from here on a new connection is refused, at once
    try:  # from the first line on: a second Ctrl-C, however soon, still gets the last line
        sys.stderr.write(
            f"stopping: {server.open_connections} requests in progress, {unshipped_orders()} "
            f"orders to ship; waiting up to {STOP_GRACE_S} s (Ctrl-C again stops at once)\n"
        )
        deadline = time.monotonic() + STOP_GRACE_S
        # polling: the request threads and the fulfilment worker run on meanwhile
        while time.monotonic() < deadline and server.open_connections:
            time.sleep(0.05)  # requests first: each one may still place an order
        left = unshipped_orders()
        shipped_at = time.monotonic()
        while time.monotonic() < min(deadline, shipped_at + STOP_STALL_S) and left:
            time.sleep(0.05)
            if unshipped_orders() < left:
                left = unshipped_orders()
                shipped_at = time.monotonic()
    finally:
        if server.open_connections:
            sys.stderr.write(f"{server.open_connections} connections cut off unanswered\n")
        sys.stderr.write(
            f"{unshipped_orders()} acknowledged orders not shipped: they lived in memory\n"
        )


def exit_with_parent(parent):
    """Stop, like Ctrl-C, once whoever started us is gone: a `kill -9` of it must not orphan us."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def start_child(role, host, port, seed, allow_remote):
    """Start payment or shipping as a child process; return it and the URL from its READY line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--role",
            role,
            "--host",
            host,
            "--port",
            str(port),
            "--seed",
            str(seed),
            "--child",
            *(["--allow-remote"] if allow_remote else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()

    def read_lines():  # keep reading for the child's whole life: a full pipe would block it
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:  # a child that died: say so now
        try:
            return proc, json.loads(lines.get(timeout=0.1).split(" ", 1)[1])[role]
        except queue.Empty:
            continue
        except (IndexError, ValueError, KeyError):
            break
    proc.kill()
    raise SystemExit(f"{role} did not start (exit code {proc.wait()})")


def base_url(host, port):
    """http://host:port, an IPv6 address in brackets: http://[::1]:8081."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host):
    """True if every address `host` names is a loopback one (a name may have several)."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # no such name: gaierror is an OSError
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in found)


def port_number(text):
    """--port: 0 (free ports for all), or a port; main checks the room for payment and shipping."""
    try:
        port = parse_digits(text, 5)
    except ValueError:
        port = 65536
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 0 to 65535")
    return port


def http_url(text):
    """--payment-url, --shipping-url: checked now, or every order would fail later."""
    try:
        parts = urlsplit(text)
        if parts.scheme == "http" and parts.hostname and parts.port:
            return text.rstrip("/")
    except ValueError:  # a port out of range
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not an http://host:port URL")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Ctrl-C stops all it started."
    )
    parser.add_argument(
        "--host", default=HOST, help="address to bind (default %(default)s: loopback only)"
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --host be an address other machines reach: nothing here has authentication",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        help=f"orders port (default {ORDERS_PORT}; payment and shipping "
        "take the next two); 0 picks free ports for all",
    )
    parser.add_argument(
        "--role", choices=["orders", "payment", "shipping"], help="run only this piece"
    )
    parser.add_argument(
        "--payment-url", type=http_url, help="use this payment instead of starting one"
    )
    parser.add_argument(
        "--shipping-url", type=http_url, help="use this shipping instead of starting one"
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help="seed of the simulators' chaos (default %(default)s)"
    )
    # orders starts payment and shipping with it; not for people
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threading.excepthook = thread_died
    # /chaos and /stats have no authentication: exposing them must be a decision, not a default
    if not is_loopback(args.host) and not args.allow_remote:
        parser.error(
            f"--host {args.host!r} is not loopback: other machines could reach /chaos and /stats; "
            "--allow-remote if you mean it"
        )
    if args.role in (None, "orders") and (args.port or 0) > 65533:
        parser.error(f"--port {args.port}: payment and shipping take the next two; at most 65533")
    if args.role == "orders" and args.port == 0 and None in (args.payment_url, args.shipping_url):
        parser.error(
            "--role orders --port 0 cannot guess where payment and shipping are: "
            "give --payment-url and --shipping-url"
        )
    if not is_loopback(args.host) and not args.child:
        print(
            f"warning: --allow-remote: whoever reaches {args.host} may place orders, and set chaos "
            "and read ground truth on payment and shipping (/chaos, /stats)",
            file=sys.stderr,
        )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops us like Ctrl-C
    # even if started ignoring it (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # a pile-up holds thousands of sockets: lift the soft fd limit where the OS lets us
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 10240)), hard))
    except (ImportError, ValueError, OSError):
        pass
    port = ORDERS_PORT if args.port is None else args.port
    urls = {"payment": args.payment_url, "shipping": args.shipping_url}
    children = []
    try:
        if args.role in ("payment", "shipping"):
            workers, service_ms = {
                "payment": (PAYMENT_WORKERS, PAYMENT_SERVICE_MS),
                "shipping": (SHIPPING_WORKERS, SHIPPING_SERVICE_MS),
            }[args.role]
            port += {"payment": 1, "shipping": 2}[args.role] if args.port is None else 0
            # a simulator has nothing to save: stop at once, quietly
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: os._exit(0))
            # orders' child: a Ctrl-C at the terminal reaches its whole process group, but orders
            # still needs us for its graceful stop, and stops us itself (SIGTERM) once it is done
            if args.child:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            return asyncio.run(
                Dependency(args.role, workers, service_ms, args.seed).run(args.host, port)
            )
        for offset, role in ((1, "payment"), (2, "shipping")):
            if urls[role] is None and args.role == "orders":
                urls[role] = base_url(args.host, port + offset)
            elif urls[role] is None:
                child_port = 0 if port == 0 else port + offset  # 0: let the OS pick a free port
                child, urls[role] = start_child(
                    role, args.host, child_port, args.seed + offset, args.allow_remote
                )
                children.append(child)
        DEPENDENCY_URLS.update(urls)
        # TCPServer binds IPv4 unless told: an IPv6 address (::1) needs an IPv6 socket
        OrdersServer.address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with OrdersServer((args.host, port), OrdersHandler) as server:
            server.store = MemoryStore()
            threading.Thread(target=fulfilment_worker, args=(server.store,), daemon=True).start()
            announce({"orders": base_url(args.host, server.server_address[1]), **urls})
            threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
            try:
                server.serve_forever()
            except KeyboardInterrupt:  # the first Ctrl-C or SIGTERM stops gracefully
                stop_gracefully(server)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE  # another copy still running, most often
        raise SystemExit(
            f"cannot serve: {exc}"
            + ("; stop the other one, or --port 0 picks free ports" if taken else "")
        ) from None
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=5)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: at once
                child.kill()


if __name__ == "__main__":
    main()
