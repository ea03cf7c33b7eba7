"""loadtest.py: the instrument. Same scenarios, same pass criteria, every version.

It starts a version (or attaches to one with --url), drives it with an open-loop load (requests
leave on a fixed arrival schedule whatever the server does, wrk2/vegeta style), injects the
scenario's faults through the simulators' /chaos, reads ground truth from their /stats, and
prints latency, outcomes, ground truth, a per-second timeline and a verdict with its reasons.

Latency is measured from the *intended* send time, so a server that stalls cannot hide the
requests that were waiting to be sent (coordinated omission, Gil Tene). Pure standard library.

  python loadtest.py --target v0_1                      # the version's story
  python loadtest.py --target v0_2 --scenario spike --quick
  python loadtest.py --compare all --quick              # the lesson matrix
  python loadtest.py --list                             # scenarios and pass criteria
  python loadtest.py --calibrate                        # can the instrument be trusted?
"""

import argparse
import asyncio
import bisect
import collections
import contextlib
import errno
import functools
import gc
import glob
import html
import ipaddress
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from urllib.parse import urlsplit

# === CONFIG ===
HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_TIMEOUT_S = 5.0  # a user's patience: after this the client gives up (counted, not hidden)
MAX_IN_FLIGHT = 3000  # open loop, but bounded: requests over the cap are counted as "capped"
DEFAULT_CAPACITY_RPS = 100.0  # C, when it cannot be read from payment's /stats
SAMPLE_EVERY_S = 0.25  # ground truth and process sampling period during a run
# The event loop's timers wake in whole milliseconds (epoll_wait rounds up), so up to 1 ms late: the
# load wakes this much before a request is due and sends what is due by then, timing each request
# from its schedule or from when it really left, whichever came first (never shorter than it was).
SEND_EARLY_S = 0.001
# a second counts as recovered when nothing in it failed, <= 10% was shed and its p99 is <= this
RECOVERED_P99_MS = 500
# After the load, the drain waits for fulfilment until every acknowledged order has shipped, nothing
# has shipped for this long (v1.0's longest redelivery pause, 1 s, and the call after it), or its
# time is up.
DRAIN_IDLE_S = 1.2
# A run in which loadtest itself fell behind its schedule measured the machine, not the target.
# Measured here: a run beside other work flipped a verdict at a lag p99 of 160 ms; a run alone lags
# 2-5 ms (p99).
UNTRUSTED_LAG_MS = 50
# Its lag only ever adds to a latency it measures, so it can fail a millisecond bound alone: a
# failed "<= bound ms" check counts only if the lag p99 is under a quarter of the bound (the 4:1
# test accuracy ratio of metrology), else the run is untrusted and run once more.
TEST_ACCURACY_RATIO = 4
# Limits, checked before anything starts: a typo must not become a load that eats the machine.
# offered req/s, at any phase's peak: 4x what --calibrate measures one loop can keep
MAX_RATE_RPS = 20000
MAX_CAPACITY_RPS = 10000  # C; the built-in simulators have C = 100
MAX_DURATION_S = 600  # --duration: ten minutes is a soak, not a lesson
MAX_PLANNED_REQUESTS = 1_000_000  # a plan and its records cost ~250 bytes a request: ~250 MB
MIN_PLANNED_REQUESTS = 10  # fewer measure nothing: a p99 of 3 requests is not a figure
# a socket per request in flight, here and in the orders process it starts
OPEN_FILES_WANTED = 10240
# This API's answers are under 1 KiB: more (or a head that never ends) is a broken or hostile
# target, and the rest of it is not read: a bad answer, not an out-of-memory loadtest.
MAX_ANSWER_BYTES = 16 * 1024
# The instrument's own reads (/chaos, /stats, /metrics) are larger, and per-ref ground truth grows
# with the run: ~120 bytes a ref, so /stats?refs=1 may take CONTROL_BYTES_PER_REQUEST per request.
MAX_CONTROL_BYTES = 1024 * 1024
CONTROL_BYTES_PER_REQUEST = 300
# The report's charts: one point a second draws a 3 s --quick run as 3 points. A run is drawn in the
# coarsest of these buckets that gives it MIN_CHART_POINTS points (a --quick spike: 0.1 s, a full
# run: 1 s), from the same records by intended send time; the timeline stays one row a second.
CHART_BUCKETS_S = (1, 0.5, 0.25, 0.1)
MIN_CHART_POINTS = 20

# === ENGINE ===
# One connection per request (as the version files answer with Connection: close), each a
# non-blocking socket the event loop's reader and writer callbacks move on (Exchange): about a
# third of the CPU a request of asyncio's protocols, which took a quarter of what its streams took.

# "bad answer": an answer that broke HTTP (see BadAnswer); "capped": never sent (MAX_IN_FLIGHT)
OUTCOMES = ("ok", "shed", "4xx", "502", "504", "5xx", "timeout", "conn", "bad answer", "capped")


def outcome_of(status):
    """Classify an HTTP status into one of OUTCOMES."""
    if 200 <= status < 300:
        return "ok"
    if status in (429, 503):
        return "shed"
    if status in (502, 504):
        return str(status)
    return "4xx" if status < 500 else "5xx"


class BadAnswer(ConnectionError):
    """The target answered, but not in HTTP this instrument can trust: no status line, a
    Content-Length that is not a number, an answer over its cap (MAX_ANSWER_BYTES for the load,
    head and body), or one cut short. Its own outcome: never ok, never a traceback."""


STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?")


def parse_head(head):
    """(status, Content-Length or None) of an answer's head (without its blank line)."""
    lines = head.split(b"\r\n")
    match = STATUS_LINE.fullmatch(lines[0])
    if not match:
        raise BadAnswer(f"no HTTP status line: {bytes(lines[0][:40])!r}")
    lengths = {
        line.split(b":", 1)[1].strip()
        for line in lines[1:]
        if line[:15].lower() == b"content-length:"
    }
    if not lengths:
        return int(match[1]), None
    length = lengths.pop()
    if lengths or not length.isdigit():
        raise BadAnswer(f"Content-Length {bytes(length[:20])!r} is not one number of bytes")
    return int(match[1]), int(length)


class Answer:
    """One answer, parsed as its bytes arrive: feed() them until it says the answer is whole, then
    result() is (status, body), or raises BadAnswer for one that breaks HTTP or is over max_bytes.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.status = None
        self.body_at = None  # where the body starts, once the head has been read
        self.length = None  # its Content-Length; None: the body ends when the connection does
        self.error = None  # a BadAnswer: nothing more is read

    def feed(self, data):
        """Take the bytes that arrived: True once the answer is whole (or broken)."""
        self.buf += data
        if len(self.buf) > self.max_bytes:
            self.error = BadAnswer(f"an answer over {self.max_bytes:,} bytes")
            return True
        if self.body_at is None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return False
            try:
                self.status, self.length = parse_head(bytes(self.buf[:head_end]))
            except BadAnswer as err:
                self.error = err
                return True
            self.body_at = head_end + 4
        # all of its body is here: its time is now, not when the connection closes
        return self.length is not None and len(self.buf) - self.body_at >= self.length

    def result(self):
        """(status, body) of what came, whole or up to the connection's end; or BadAnswer."""
        if self.error:
            raise self.error
        if self.body_at is None:
            raise BadAnswer("the connection closed inside the answer's head")
        body = bytes(self.buf[self.body_at :])
        if self.length is not None and len(body) < self.length:
            raise BadAnswer(f"{len(body)} of {self.length} bytes of body came")
        return self.status, body[: self.length]


class Exchange:
    """One request and its answer on a fresh non-blocking socket, moved on by the event loop's
    reader and writer callbacks. No transport, protocol or task of its own: asyncio's machinery
    for those cost more than half of the instrument's CPU a request, and at 10 C the instrument
    shares two cores with the orders process it measures."""

    def __init__(self, loop, family, message, max_bytes):
        self.loop = loop
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.unsent = memoryview(message)
        self.answer = Answer(max_bytes)
        self.done = loop.create_future()  # (status, body), or the error that ended it

    def connect(self, address):
        error = self.sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(error, os.strerror(error))
        self.loop.add_writer(self.fd, self.send)  # writable: connected, or failed to

    def send(self):
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:  # the connection failed: refused, unreachable
            return self.fail(OSError(error, os.strerror(error)))
        try:
            self.unsent = self.unsent[self.sock.send(self.unsent) :]
        except BlockingIOError:
            return
        except OSError:  # the server answered and closed before taking it all: read what it said
            self.unsent = self.unsent[:0]
        if not self.unsent:
            self.loop.remove_writer(self.fd)
            self.loop.add_reader(self.fd, self.receive)

    def receive(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:  # reset: what came before it is the answer, if anything came
            return self.finish() if self.answer.buf else self.fail(error)
        if not data and not self.answer.buf:  # closed, not a byte said: no answer, not a bad one
            return self.fail(ConnectionError("closed without an answer"))
        if not data or self.answer.feed(data):
            self.finish()

    def finish(self):
        """The answer is whole, or the connection ended: `done` gets what came."""
        if self.done.done():
            return
        try:
            self.done.set_result(self.answer.result())
        except BadAnswer as err:
            self.done.set_exception(err)

    def fail(self, error):
        if not self.done.done():
            self.done.set_exception(error)

    def close(self):
        self.loop.remove_writer(self.fd)
        self.loop.remove_reader(self.fd)
        self.sock.close()


@functools.lru_cache(maxsize=64)
def address_of(host, port):
    """(family, address) to connect to: looked up once, not once a request."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address


def build_request(method, host, port, path, body=None, headers=None):
    """Encode one HTTP/1.1 request with Connection: close."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: close",
        f"Content-Length: {len(data)}",
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def round_trip(host, port, message, deadline, max_bytes=MAX_ANSWER_BYTES):
    """One request on a fresh connection; raises TimeoutError at `deadline` (loop time), BadAnswer
    for an answer that breaks HTTP or is over max_bytes, OSError for a connection that failed."""
    loop = asyncio.get_running_loop()
    family, address = address_of(host, port)
    exchange = Exchange(loop, family, message, max_bytes)
    timer = loop.call_at(deadline, exchange.fail, TimeoutError())
    try:
        exchange.connect(address)
        return await exchange.done
    finally:
        timer.cancel()
        exchange.close()


async def fetch_json(url, method="GET", body=None, timeout_s=3.0, max_bytes=MAX_CONTROL_BYTES):
    """Small JSON request for control and ground truth; returns (status, obj or None)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    message = build_request(method, parts.hostname, parts.port, path, body)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    status, data = await round_trip(parts.hostname, parts.port, message, deadline, max_bytes)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode("latin-1")


# One request as the load generator saw it: when it was meant to leave (s into the run), how late
# it left (s), how long from its intended send to its answer (s), "post" or "get", its outcome
# (OUTCOMES), the HTTP status (0: none) and how many attempts a retrying client made.
Record = collections.namedtuple("Record", "intended lag latency kind outcome status attempts")
# What a client sends for one planned request: the kind it really is ("post" or "get": a GET
# planned before any order exists has nothing to read, and is sent as a POST), its attempts, and
# how long it pauses before trying again (0: at once).
Request = collections.namedtuple("Request", "kind attempts pause_s", defaults=[0.0])
# One attempt: where it goes, the HTTP request's bytes, on_answer(status, body) for an answer, and
# whether a client that got no good answer tries again.
Attempt = collections.namedtuple("Attempt", "host port message on_answer retry")


def ignore_answer(status, body):
    """on_answer of a request whose answer is only counted (its outcome), never read."""


class Load:
    """The open loop: fire requests at their intended times; record what happened to each."""

    def __init__(
        self, plan, make_request, client_timeout_s=CLIENT_TIMEOUT_S, max_in_flight=MAX_IN_FLIGHT
    ):
        self.plan = plan  # sorted list of (offset_s, kind)
        self.make_request = make_request
        self.client_timeout_s = client_timeout_s
        self.max_in_flight = max_in_flight
        self.records = []  # one Record per request, in the order they ended
        self.in_flight = 0
        self.t0 = None

    async def drive(self, on_tick=None):
        loop = asyncio.get_running_loop()
        self.t0 = self.t0 or loop.time() + 0.05
        tasks = set()
        i = 0
        n = len(self.plan)
        while i < n:
            now = loop.time()
            while i < n and self.t0 + self.plan[i][0] <= now + SEND_EARLY_S:
                offset, kind = self.plan[i]
                if self.in_flight >= self.max_in_flight:
                    self.records.append(Record(offset, 0.0, 0.0, kind, "capped", 0, 0))
                else:
                    # counted at launch, so arrivals due together respect the cap
                    self.in_flight += 1
                    task = loop.create_task(self.fire(offset, kind))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if on_tick:
                on_tick(now - self.t0)
            if i < n:
                due = self.t0 + self.plan[i][0] - SEND_EARLY_S
                await asyncio.sleep(max(0.0, due - loop.time()))
        if tasks:
            await asyncio.gather(*tasks)

    async def fire(self, offset, planned_kind):
        """One logical request, maybe several attempts (clients that retry), timed from intent."""
        loop = asyncio.get_running_loop()
        intended = self.t0 + offset
        lag = max(0.0, loop.time() - intended)
        # late, timed from its schedule (coordinated omission); early, from when it really left
        timed_from = min(intended, loop.time())
        deadline = intended + self.client_timeout_s
        status = 0
        outcome = "conn"
        attempts = 0
        try:
            request = self.make_request(planned_kind)
            for attempt in request.attempts:
                if attempts and request.pause_s:
                    await asyncio.sleep(request.pause_s)
                attempts += 1
                try:
                    status, body = await round_trip(
                        attempt.host, attempt.port, attempt.message, deadline
                    )
                    outcome = outcome_of(status)
                    attempt.on_answer(status, body)
                except TimeoutError:
                    status = 0
                    outcome = "timeout"
                except BadAnswer:
                    status = 0
                    outcome = "bad answer"
                except OSError:
                    status = 0
                    outcome = "conn"
                late = loop.time() + request.pause_s >= deadline
                if outcome in ("ok", "4xx") or not attempt.retry or late:
                    break
        finally:
            self.in_flight -= 1
        self.records.append(
            Record(offset, lag, loop.time() - timed_from, request.kind, outcome, status, attempts)
        )


# === SCENARIOS ===
# Loads are multiples of the designed capacity C (payment's workers / service time). Each phase:
# (name, seconds, seconds with --quick (0: skipped), load in C, chaos for payment, chaos for
# shipping, fault?). Checks are (figure, operator, bound): the same for every version, never tuned
# per version.


def phase(
    name,
    full_s,
    quick_s,
    load,
    payment=None,
    shipping=None,
    fault=False,
    judged=False,
    base=False,
    settle_s=0,
    crash=False,
):
    """A phase of a scenario. `judged`: its own figures (figure@name, see phase_figures) are
    measured, from `settle_s` after it begins; `base`: the healthy phase whose accepted p99 the
    judged ones are held to; `crash`: the orders process is killed (SIGKILL) as it begins, and
    started again with the same command line."""
    return {
        "name": name,
        "full_s": full_s,
        "quick_s": quick_s,
        "load": load,
        "payment": payment or {},
        "shipping": shipping or {},
        "fault": fault,
        "judged": judged,
        "base": base,
        "settle_s": settle_s,
        "crash": crash,
    }


def healthy_before(full_s, quick_s, load):
    """Healthy, before the fault. --quick skips it (0 s) unless the fault's first second would
    otherwise decide the figure: orders to read back, healthy calls in a breaker's window, a pool
    not started cold."""
    return phase("before", full_s, quick_s, load)


def healthy_after(full_s, quick_s, load):
    """Healthy again. --quick skips it (0 s) unless a check judges recovery (recovery_s: it is
    watched for this phase only, so quick is stricter, never looser) or counts the whole run."""
    return phase("after", full_s, quick_s, load)


def ramp(steps, full_s, quick_s, load, top, quick_steps):
    """A dependency that gets slowly worse: latency x1 -> x`top` in `steps` equal steps; --quick
    runs the first `quick_steps` of them."""
    factors = [1 + (top - 1) * (k + 1) / steps for k in range(steps)]
    return [
        phase(
            f"worse x{f:g}",
            full_s / steps,
            quick_s / steps if k < quick_steps else 0,
            load,
            {"latency_factor": f},
            fault=True,
        )
        for k, f in enumerate(factors)
    ]


def scenario(about, *phases, checks, decisive, **more):
    """A scenario: what it asks, its phases, its checks and the figure the matrix shows; `more`:
    get_share (the share of GETs), client_retries, figures (how derived figures are measured)."""
    return {"about": about, "phases": list(phases), "checks": checks, "decisive": decisive, **more}


def in_each_phase(names, *checks):
    """The same checks in each of the named phases, phase by phase: (figure@phase, op, bound)."""
    return [(f"{figure}@{name}", op, bound) for name in names for figure, op, bound in checks]


# The seed's promise, kept in each overload phase: nearly all of C served, the accepted as fast as
# at the version's own baseline (within 2x), the excess refused at once.
PROMISE_UNDER_OVERLOAD = [("goodput_pct", ">=", 95), ("p99_x", "<=", 2), ("shed_p99_ms", "<=", 5)]

SCENARIOS = {
    "steady": scenario(
        "0.5x capacity, healthy: the baseline every version must keep",
        phase("steady", 10, 2, 0.5),
        checks=[("error_pct", "<=", 1.0), ("p99_ms", "<=", 250)],
        decisive="p99_ms",
    ),
    "spike": scenario(
        "3x capacity for the fault window: is the excess shed fast, or does it queue?",
        healthy_before(3, 0, 0.5),
        phase("spike", 10, 2, 3.0, fault=True),
        healthy_after(8, 0, 0.5),
        checks=[
            ("timeouts", "<=", 0),
            ("p99_ms", "<=", 1000),
            ("shed_p99_ms", "<=", 100),
            ("fault_goodput_x", ">=", 0.7),
        ],
        decisive="p99_ms",
    ),
    "slow-payment": scenario(
        "0.8x capacity while payment is 3x slower: admitted work the dependency cannot serve",
        healthy_before(3, 0, 0.8),
        phase("slow", 10, 2, 0.8, {"latency_factor": 3}, fault=True),
        healthy_after(8, 0, 0.8),
        checks=[("timeouts", "<=", 0), ("p99_ms", "<=", 1000), ("shed_p99_ms", "<=", 100)],
        decisive="p99_ms",
    ),
    "slow-shipping": scenario(
        "0.8x capacity while shipping is 5x slower: does a fulfilment backlog grow unseen?",
        healthy_before(3, 0, 0.8),
        phase("slow", 15, 5, 0.8, shipping={"latency_factor": 5}, fault=True),
        healthy_after(6, 0, 0.8),
        checks=[("timeouts", "<=", 0), ("backlog_max", "<=", 100), ("lag_max_s", "<=", 2.0)],
        decisive="lag_max_s",
    ),
    "hang-payment": scenario(
        "0.5x capacity; 20% of charges never answer: do hung calls leak resources?",
        healthy_before(3, 1, 0.5),
        phase("hang", 10, 3, 0.5, {"hang_rate": 0.2}, fault=True),
        healthy_after(8, 2, 0.5),
        checks=[("goodput_pct", ">=", 95), ("p99_ms", "<=", 1000), ("held_open_after", "<=", 0)],
        decisive="goodput_pct",
    ),
    "flaky-payment": scenario(
        "0.5x capacity; charges fail, some after committing; clients retry with the same key",
        healthy_before(2, 0, 0.5),
        phase("flaky", 10, 2, 0.5, {"error_rate": 0.1, "ambiguous_rate": 0.1}, fault=True),
        healthy_after(4, 0, 0.5),
        client_retries=2,
        checks=[("duplicate_charges", "<=", 0), ("duplicate_orders", "<=", 0)],
        decisive="duplicate_charges",
    ),
    "retry-storm": scenario(
        "0.6x capacity; payment struggles (2x slower, 80% of charges fail) briefly: "
        "do retries pile on?",
        healthy_before(3, 1, 0.6),
        phase("brownout", 4, 2, 0.6, {"latency_factor": 2, "error_rate": 0.8}, fault=True),
        healthy_after(10, 2, 0.6),
        checks=[("fault_amplification", "<=", 1.2), ("recovery_s", "<=", 3)],
        decisive="fault_amplification",
    ),
    "payment-down": scenario(
        "0.5x capacity, half POST, half GET /orders/<id>; payment blackholed",
        healthy_before(3, 1, 0.5),
        phase("down", 10, 3, 0.5, {"blackhole": True}, fault=True),
        healthy_after(8, 2, 0.5),
        get_share=0.5,
        checks=[
            ("fault_post_p50_ms", "<=", 100),
            ("get_error_pct", "<=", 1.0),
            ("get_p99_ms", "<=", 250),
            ("recovery_s", "<=", 3),
        ],
        decisive="fault_post_p50_ms",
    ),
    "early-warning": scenario(
        "0.5x capacity; payment gets slowly worse: "
        "does a metric alert fire before users see errors?",
        healthy_before(3, 0, 0.5),
        *ramp(8, 16, 10, 0.5, 3, quick_steps=5),
        healthy_after(4, 0, 0.5),
        checks=[("alert_lead_s", ">=", 1.0)],
        decisive="alert_lead_s",
    ),
    "partial-failure": scenario(
        "2x capacity + payment brownout (3x) + shipping down, then healthy: everything at once",
        healthy_before(3, 0, 0.5),
        phase("partial", 8, 3, 2.0, {"latency_factor": 3}, {"down": True}, fault=True),
        healthy_after(8, 3, 0.5),
        checks=[
            ("p99_ms", "<=", 1000),
            ("timeouts", "<=", 0),
            ("duplicate_charges", "<=", 0),
            ("duplicate_orders", "<=", 0),
            ("lost_orders", "<=", 0),
            ("recovery_s", "<=", 3),
        ],
        decisive="lost_orders",
    ),
    "overload": scenario(
        "0.5x capacity, then sustained 3x and 10x: does the excess cost the accepted anything?",
        phase("baseline", 5, 1.5, 0.5, judged=True, base=True),
        phase("3C", 10, 2, 3.0, fault=True, judged=True),
        phase("10C", 10, 3, 10.0, fault=True, judged=True),
        get_share=0.2,
        checks=[
            *in_each_phase(["3C", "10C"], *PROMISE_UNDER_OVERLOAD),
            ("timeouts", "<=", 0),
            ("fault_amplification", "<=", 1.1),
        ],
        decisive="shed_p99_ms@3C",
        figures="""per phase, of the POSTs meant to leave in it: goodput_pct = successful POSTs/s
        as a % of min(POSTs offered/s, C), which is C here; p99_x = accepted p99 / the baseline
        phase's accepted p99, measured in the same run; shed_p99_ms = p99 of the 429/503 answers
        (GETs too); fault_amplification = payment's work per order sent in the overload phases.
        Decisive: shed_p99_ms@3C, how long the excess of a sustained 3x waits to hear "no": a
        refusal decided after a queue costs the accepted their places in it too""",
    ),
    "capacity-drop": scenario(
        "0.8x capacity while payment loses half its workers for a while: does the limit follow?",
        phase("before", 5, 2, 0.8, judged=True, base=True),
        phase("half", 10, 3, 0.8, {"workers": 2}, fault=True, judged=True, settle_s=1),
        phase("after", 8, 4, 0.8, judged=True, settle_s=3),
        checks=[
            *in_each_phase(["before", "half", "after"], ("goodput_pct", ">=", 90)),
            ("p99_x@half", "<=", 2),
            ("timeouts", "<=", 0),
        ],
        decisive="p99_x@half",
        figures="""per phase, of the POSTs meant to leave in it (in 'half', from 1 s after the
        drop: a limit has a second to follow it; in 'after', from 3 s after the capacity's
        return: full goodput within 3 s): capacity then = payment's capacity_rps in
        /stats while it lasts (the median of the samples; C/2 with 2 of its 4 workers);
        goodput_pct = successful POSTs/s as a % of min(POSTs offered/s, capacity then); p99_x =
        accepted p99 / what that capacity allows when healthy, which is the before phase's p99: a
        call's service time does not change with the number of workers, and a healthy limit
        follows capacity (Little's law: limit = capacity x latency), so each call waits behind as
        many calls per worker as before. A static limit sized for 4 workers keeps twice as many
        waiting per worker, and waits twice as long""",
    ),
    "crash": scenario(
        "0.5x capacity, shipping slowed so events wait; orders is killed (SIGKILL) and started "
        "again on the same data: is anything it acknowledged lost?",
        phase("before", 4, 2, 0.5, shipping={"latency_factor": 10}),
        phase("crash", 6, 3, 0.5, shipping={"latency_factor": 10}, fault=True, crash=True),
        healthy_after(6, 2, 0.5),
        client_retries=4,
        client_retry_pause_s=0.5,
        checks=[
            ("lost_acked", "<=", 0),
            ("duplicate_charges", "<=", 0),
            ("duplicate_orders", "<=", 0),
            ("orphan_charges", "<=", 0),
            ("restart_to_201_s", "<=", 1.0),
        ],
        decisive="lost_acked",
        figures="""payment, shipping and orders run as three processes (--role), so only orders
        dies; a failed client tries again with the same Idempotency-Key and body 0.5 s later, up
        to 4 times. lost_acked = orders answered 201 that never shipped or that GET /orders/<id>
        no longer finds after the drain; orphan_charges = charges for an order neither
        acknowledged nor shipped; restart_to_201_s = from the kill to the first 201 after it""",
    ),
}

# Each version's story: the scenario it fixes and the one that still breaks it.
LADDER = {
    "v0_1": ([], ["spike"]),
    "v0_2": (["spike"], ["slow-payment"]),
    "v0_3": (["slow-payment", "slow-shipping"], ["hang-payment"]),
    "v0_4": (["hang-payment"], ["flaky-payment"]),
    "v0_5": (["flaky-payment"], ["retry-storm"]),
    "v0_6": (["retry-storm"], ["payment-down"]),
    "v0_7": (["payment-down"], ["early-warning"]),
    "v0_8": (["early-warning"], ["partial-failure"]),
    "v1_0": (["partial-failure", "overload", "capacity-drop", "crash"], []),
}
# Why a version without the scenario's fix fails it: the mechanism, in one line, for the story a
# run ends with.
WHY = {
    "spike": "nothing limits what comes in, "
    "so everything past capacity waits in a queue that only grows",
    "slow-payment": "admission counts requests, not the work they hold: slow calls pile up inside",
    "slow-shipping": "an unbounded event queue hides a fulfilment backlog until it is seconds deep",
    "hang-payment": "a call without a timeout waits forever, holding a worker, until none is left",
    "flaky-payment": "a charge retried without an idempotency key is a second charge",
    "retry-storm": "immediate retries multiply the work on a dependency "
    "exactly when it has least to spare",
    "payment-down": "every order still waits out its timeouts against a dependency that is gone, "
    "holding workers",
    "early-warning": "nothing inside is visible: the first sign of trouble is a user's error",
    "partial-failure": "a shipment that fails is dropped, "
    "and nothing bounds a request's time end to end",
    "crash": "what orders acknowledged lives in its memory, and dies with it",
}

# The alert rules of prometheus/alerts.yml, mirrored here (change the two together): loadtest
# evaluates each rule on every scrape of the target's /metrics (every SAMPLE_EVERY_S), so it can say
# when the first one fired without running Prometheus. A rule reads the metrics scraped now and the
# history of payment's call counters that its rate() needs.
ALERT_WINDOW_S = 2.0  # the [2s] of the rules' rate()
# payment's call counters at one scrape: when (monotonic s), all calls, calls within 75 ms
PaymentCalls = collections.namedtuple("PaymentCalls", "t calls fast")


def payment_slow(metrics, history):
    """PaymentSlow: over 10% of payment calls slower than 75 ms in the last ALERT_WINDOW_S
    (dependency_request_duration_seconds, le="0.075": payment's healthy p99.9)."""
    now = history[-1]
    older = [h for h in history if h.t <= now.t - ALERT_WINDOW_S]
    if not older or now.calls <= older[-1].calls:
        return False
    calls = now.calls - older[-1].calls
    fast = now.fast - older[-1].fast
    return (calls - fast) / calls > 0.1


def fulfilment_stuck(metrics, history):
    """FulfilmentStuck: the oldest order waiting to ship has waited over 2 s
    (fulfilment_oldest_event_age_seconds)."""
    return metrics.get(("fulfilment_oldest_event_age_seconds", frozenset()), 0) > 2


def circuit_open(metrics, history):
    """CircuitOpen: a dependency's circuit breaker is open (circuit_breaker_state{state="open"})."""
    return any(
        name == "circuit_breaker_state" and ("state", "open") in labels and value == 1
        for (name, labels), value in metrics.items()
    )


ALERT_RULES = {
    "PaymentSlow": payment_slow,
    "FulfilmentStuck": fulfilment_stuck,
    "CircuitOpen": circuit_open,
}


def rps_per_load(scenario, capacity_rps, rate_rps=None):
    """Req/s for a load of 1.0: C, or with --rate R, R / the first phase's load (so it offers R).

    The first phase is the load before any fault (in every scenario here also its lowest), so
    --rate means what vegeta's -rate means for steady and keeps a scenario's shape otherwise."""
    return rate_rps / scenario["phases"][0]["load"] if rate_rps else capacity_rps


def phase_rates(scenario, capacity_rps, quick, duration_s=None, rate_rps=None):
    """[(phase, length s, offered req/s)]: the one place where loads become rates."""
    key = "quick_s" if quick else "full_s"
    # --duration sets the fault window's length (the whole run's without a fault)
    resized = [p for p in scenario["phases"] if p["fault"]] or scenario["phases"]
    scale = duration_s / sum(p[key] for p in resized) if duration_s else 1.0
    per_load = rps_per_load(scenario, capacity_rps, rate_rps)
    return [
        (ph, ph[key] * (scale if ph in resized else 1.0), ph["load"] * per_load)
        for ph in scenario["phases"]
    ]


def plan_problem(name, scenario, capacity_rps, quick, duration_s=None, rate_rps=None):
    """Why this scenario's plan must not run (one sentence), or None. Cheap: no plan is built."""
    rates = phase_rates(scenario, capacity_rps, quick, duration_s, rate_rps)
    if not all(
        math.isfinite(rps) and rps > 0 and math.isfinite(length) and length >= 0
        for _, length, rps in rates
    ):
        # a plan at a rate of nan, inf or <= 0 would never end: expovariate(-5) never passes the end
        return f"{name}: rates and lengths must be finite and > 0"
    peak = max(rps for _, _, rps in rates)
    if peak > MAX_RATE_RPS:
        return (
            f"{name} would offer {peak:,.0f} req/s at its peak (limit {MAX_RATE_RPS:,} req/s): "
            "lower --rate or --capacity"
        )
    count = sum(length * rps for _, length, rps in rates)
    if count < MIN_PLANNED_REQUESTS:
        return (
            f"{name} would plan ~{count:.2g} requests: too few to measure anything "
            f"(at least {MIN_PLANNED_REQUESTS}); raise --rate, --capacity or --duration"
        )
    if count > MAX_PLANNED_REQUESTS:
        return (
            f"{name} would plan ~{count:,.0f} requests (limit {MAX_PLANNED_REQUESTS:,} per run): "
            "lower --rate, --capacity or --duration"
        )
    return None


def make_plan(scenario, capacity_rps, quick, seed, duration_s=None, rate_rps=None):
    """Poisson arrivals (seeded) for every phase; returns (plan, phases with start/end/rps).

    Loads are multiples of `capacity_rps`, or with `rate_rps` scaled so the first phase offers
    it."""
    problem = plan_problem("this plan", scenario, capacity_rps, quick, duration_s, rate_rps)
    if problem:  # the CLI refuses these earlier; this guards every other caller
        raise ValueError(problem)
    rng = random.Random(seed)
    plan = []
    phases = []
    t = 0.0
    for ph, length, rate in phase_rates(scenario, capacity_rps, quick, duration_s, rate_rps):
        if length <= 0:  # --quick skips the "before" phases
            continue
        start = t
        end = t + length
        phases.append(dict(ph, start=start, end=end, rps=rate))
        t_next = start + rng.expovariate(rate)
        while t_next < end:
            kind = "get" if rng.random() < scenario.get("get_share", 0) else "post"
            plan.append((t_next, kind))
            t_next += rng.expovariate(rate)
        t = end
    return plan, phases


# === TARGETS AND RUNS ===

# Which cores the load generator and what it starts run on: None, the same ones (one core, or
# not Linux). Set once by split_cores().
CORES = {"instrument": None, "target": None}


def split_cores():
    """Keep one core for loadtest and give the others to the services it starts, where there are
    two or more (Linux): a load generator sharing cores with what it measures adds its own
    scheduling delays to the latencies it reports, which is why benchmarks pin wrk apart from
    the server (taskset). Measured at 10 C, v1.0's refusals p99: 2.4-4.4 ms apart, 4.8-6.4 ms
    sharing (docs/reference.md). Returns a one-line note, or None when it cannot."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    CORES["instrument"] = {cores[-1]}
    CORES["target"] = set(cores[:-1])
    os.sched_setaffinity(0, CORES["instrument"])
    return f"loadtest on core {cores[-1]}, the services it starts on {format_cores(cores[:-1])}"


def join_cores():
    """Undo split_cores(): back on every core it had (main() may be called in a test's process)."""
    if CORES["instrument"] is None:
        return
    os.sched_setaffinity(0, CORES["instrument"] | CORES["target"])
    CORES["instrument"] = None
    CORES["target"] = None


def format_cores(cores):
    return f"core {cores[0]}" if len(cores) == 1 else "cores " + ", ".join(map(str, cores))


@contextlib.contextmanager
def on_target_cores():
    """Processes started in here run on the services' cores (a child inherits its parent's)."""
    if CORES["target"] is None:
        yield
        return
    os.sched_setaffinity(0, CORES["target"])
    try:
        yield
    finally:
        os.sched_setaffinity(0, CORES["instrument"])


# === THE SERVICES' CORE, WATCHED ===
# With the services on cores of their own (split_cores), loadtest's lag tells when the instrument
# was late, not when the services' core was taken from them (another process, the hypervisor): a
# 10 ms stall there makes every refusal in it 10 ms late. A canary process on that core asks to
# wake every millisecond and writes how late each wake-up came. A millisecond bound fails only if
# the canary's p99 over the figure's time was under a quarter of it (TEST_ACCURACY_RATIO), as for
# loadtest's own lag, else the run is untrusted and run once more. The canary runs at the
# services' priority, so a target that burns its own core delays it too: that can turn the
# target's failure into "untrusted" (a "?", never a pass), and only beyond a quarter of the bound.
CANARY_PERIOD_S = 0.001
CANARY_SCRIPT = """
import sys, time
lines = []
while True:
    due = time.monotonic() + {period}
    time.sleep({period})
    woke = time.monotonic()
    lines.append("%.6f %.6f" % (woke, woke - due))
    if len(lines) == 50:
        sys.stdout.write("\\n".join(lines) + "\\n")
        sys.stdout.flush()
        lines.clear()
"""
CANARY_KEEP = 400_000  # wake-ups kept (~7 min): the longest run and its drain fit many times


class Canary:
    """The canary process on the services' cores, and the wake-ups it reported: (when, lag)."""

    def __init__(self):
        self.proc = None
        self.woke = []
        self.lag = []
        self.lock = threading.Lock()

    def start(self):
        script = CANARY_SCRIPT.format(period=CANARY_PERIOD_S)
        with on_target_cores():
            # its own session: a Ctrl-C is loadtest's to handle, which stops it; should loadtest
            # die unannounced, its next write finds no reader and ends it (a broken pipe)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", script],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            woke, _, lag = line.partition(" ")
            with self.lock:
                self.woke.append(float(woke))
                self.lag.append(float(lag))
                if len(self.woke) > CANARY_KEEP:
                    del self.woke[: CANARY_KEEP // 2]
                    del self.lag[: CANARY_KEEP // 2]

    def lag_p99_ms(self, start, end):
        """p99 of how late the canary woke between two time.monotonic() readings; None if it did
        not report in that time (none running, or it was stopped)."""
        with self.lock:
            first = bisect.bisect_left(self.woke, start)
            last = bisect.bisect_left(self.woke, end)
            lags = self.lag[first:last]
        return to_ms(percentile(lags, 99))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


CANARY = Canary()


class Target:
    """A running orders service: spawned from a version file (and killed with all its children)."""

    def __init__(self, name, urls, proc=None, log_path=None):
        self.name = name
        self.urls = urls
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(cls, name, command, timeout_s=20.0, stopping=None):
        """Run `command` in its own process group and wait for its READY line; SystemExit, with
        the end of its stderr, if none comes within `timeout_s` (or before `stopping` is set:
        a threading.Event, see Spawner)."""
        log = tempfile.NamedTemporaryFile("w+", prefix="loadtest-", suffix=".log", delete=False)
        with on_target_cores():
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        target = cls(name, {}, proc, log.name)
        RUNNING.append(target)
        urls = read_ready(proc, timeout_s, stopping)
        if urls is None:
            log.seek(0)
            tail = log.read()[-800:]
            target.stop()
            raise SystemExit(
                f"{' '.join(command[1:])} did not print READY within {timeout_s:.0f} s; "
                f"its stderr ends with:\n{tail}"
            )
        target.urls = urls
        return target

    @classmethod
    def spawn(cls, path, seed, stopping=None):
        """Start the version file `path` on free ports (its payment and shipping with it)."""
        return cls.start(
            version_name(path),
            [sys.executable, path, "--port", "0", "--seed", str(seed)],
            stopping=stopping,
        )

    def stop(self, at_once=False):
        """Stop the whole process group (orders, payment, shipping): SIGTERM, then SIGKILL; SIGKILL
        alone `at_once`, for a run whose ground truth has been read (a version's graceful stop,
        up to 2.5 s of shipping what is left, would measure nothing and hold up the next run)."""
        signals = (signal.SIGKILL,) if at_once else (signal.SIGTERM, signal.SIGKILL)
        for sig in signals if self.proc else ():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while self.group_alive() and time.monotonic() < deadline:
                self.proc.poll()  # reap our child, so a zombie does not count as alive
                time.sleep(0.005 if sig == signal.SIGKILL else 0.02)
        if self.proc:
            self.proc.wait()
        self._forget()

    async def stop_in_thread(self, at_once=False):
        """stop() for a coroutine: the wait for the group to exit (up to ~10 s) blocks a worker
        thread, not the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop, at_once)

    def group_alive(self):
        return group_alive(self.proc.pid)

    def _forget(self):
        """No longer ours to stop. Twice is harmless: Ctrl-C may stop one a thread is stopping."""
        with contextlib.suppress(ValueError):
            RUNNING.remove(self)
        if self.log_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log_path)

    def process_sample(self):
        """Threads, resident memory (MiB) and CPU seconds so far of the orders process, where /proc
        tells."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            with open(f"/proc/{self.proc.pid}/stat") as f:
                # after the name: utime and stime at 11 and 12
                ticks = f.read().rsplit(")", 1)[1].split()
            cpu_s = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
            return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024, cpu_s
        except (AttributeError, OSError, KeyError, ValueError, IndexError):
            return None, None, None


class SplitTarget(Target):
    """A version run as three processes (--role), so that orders alone can be killed and started
    again with the same command line: the same port, the same simulators, the same data file
    (for a version that keeps one: --data)."""

    @classmethod
    def spawn(cls, path, seed, stopping=None):
        name = version_name(path)
        helpers = [
            Target.start(
                f"{name} {role}",
                [sys.executable, path, "--role", role, "--port", "0", "--seed", str(seed + offset)],
                stopping=stopping,
            )
            for offset, role in ((1, "payment"), (2, "shipping"))
        ]
        urls = {**helpers[0].urls, **helpers[1].urls}
        scratch = tempfile.mkdtemp(prefix="loadtest-data-")
        command = [
            sys.executable,
            path,
            "--role",
            "orders",
            "--port",
            str(free_port()),
            "--payment-url",
            urls["payment"],
            "--shipping-url",
            urls["shipping"],
            "--seed",
            str(seed),
        ]
        if keeps_data(path):
            command += ["--data", os.path.join(scratch, "orders.sqlite3")]
        try:
            orders = Target.start(name, command, stopping=stopping)
        except SystemExit:
            for helper in helpers:
                helper.stop()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        RUNNING.remove(orders)  # the split target stops it, with its helpers
        target = cls(name, {**urls, **orders.urls}, orders.proc, orders.log_path)
        target.command = command
        target.helpers = helpers
        target.scratch = scratch
        RUNNING.append(target)
        return target

    def crash_and_restart(self):
        """SIGKILL the orders process, then start it again the same way; (killed, ready) times."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path)
        again = Target.start(self.name, self.command)
        RUNNING.remove(again)
        self.proc = again.proc
        self.log_path = again.log_path
        return killed, time.monotonic()

    def stop(self, at_once=False):
        super().stop(at_once)
        for helper in self.helpers:
            helper.stop(at_once)
        shutil.rmtree(self.scratch, ignore_errors=True)


def free_port():
    """A port nobody listens on now, for a process that must get the same one back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keeps_data(path):
    """Does this version keep its orders in a file (--data)?"""
    with open(path, encoding="utf-8") as f:
        return '"--data"' in f.read()


def spawn_for(path, name, seed, stopping=None):
    """The target a scenario needs: one process group, or three processes if it kills orders."""
    crashes = any(p["crash"] for p in SCENARIOS[name]["phases"])
    return (SplitTarget if crashes else Target).spawn(path, seed, stopping)


RUNNING = []  # targets to stop on any exit


READY_POLL_S = 0.1  # how soon a wait for READY notices it is no longer wanted


def read_ready(proc, timeout_s, stopping=None):
    """The URLs of a process's `READY {json}` line, waited for with a deadline; None if it exits,
    prints something else at its end, the deadline passes first or `stopping` (an Event) is set.
    Its stdout is read on (and dropped) from then on: closing the pipe could kill it, a full pipe
    would block it."""
    deadline = time.monotonic() + timeout_s
    while not (stopping and stopping.is_set()) and time.monotonic() < deadline:
        left = deadline - time.monotonic()
        if not select.select([proc.stdout], [], [], max(0.0, min(left, READY_POLL_S)))[0]:
            continue
        line = proc.stdout.readline()
        if line.startswith("READY "):
            drain = threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True)
            drain.start()
            try:
                return json.loads(line[6:])
            except ValueError:
                return None
        if not line:
            return None
    return None


class Spawner:
    """Starts the targets of a matrix, each cell's own; the next cell's while the current one
    drains, so its start-up (~0.35 s: three Python processes) overlaps a wait instead of adding to
    the run's time."""

    def __init__(self, seed):
        self.seed = seed
        self.ahead = None  # (path, the future of its Target)
        # set by close(): a target still starting in a worker thread gives up its wait for READY
        # (after Ctrl-C the interpreter's exit waits for that thread: up to 20 s otherwise)
        self.stopping = threading.Event()

    def prepare(self, cell):
        """Start the target of `cell`, (path, scenario name), now; None: there is none."""
        if cell and not self.ahead:
            loop = asyncio.get_running_loop()
            spawning = functools.partial(spawn_for, *cell, self.seed, self.stopping)
            self.ahead = (cell, loop.run_in_executor(None, spawning))

    async def take(self, path, name):
        if self.ahead and self.ahead[0] == (path, name):
            future, self.ahead = self.ahead[1], None
            return await future
        loop = asyncio.get_running_loop()
        spawning = functools.partial(spawn_for, path, name, self.seed, self.stopping)
        return await loop.run_in_executor(None, spawning)

    async def close(self):
        """Stop a target started for a cell that will not run (the last one, or after Ctrl-C)."""
        self.stopping.set()
        if self.ahead:
            future, self.ahead = self.ahead[1], None
            try:
                await (await future).stop_in_thread(at_once=True)
            except (Exception, SystemExit):
                pass  # it never started: nothing to stop, and the matrix still prints


def cpu_times():
    """(busy, total) jiffies of the whole machine, all cores, where /proc/stat tells; else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)
    except (OSError, ValueError, IndexError):
        return None


def group_alive(pgid):
    """Is a process of this group still running? Zombies do not count: some inits never reap
    them."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not os.path.isdir("/proc"):
        return True
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


VERSION_FILE = re.compile(r"v(\d+)_(\d+)_\w+\.py")  # v0_3_backpressure.py, v1_10_sharded.py


def version_name(path):
    """'./v0_3_backpressure.py' -> 'v0_3', 'v1_10_x.py' -> 'v1_10'; any other file: its name."""
    base = os.path.basename(path)
    match = VERSION_FILE.fullmatch(base)
    return f"v{match[1]}_{match[2]}" if match else base.rsplit(".", 1)[0]


def version_number(path):
    """(major, minor) of a version file, for ordering: v1_2 comes before v1_10."""
    match = VERSION_FILE.fullmatch(os.path.basename(path))
    return (int(match[1]), int(match[2]))


def find_version(name):
    """(path, None) for a file path or a name matching exactly one version (v0_3, v0.3,
    v0_3_backpressure); else (None, why). Exact, because a prefix ('v0') silently ran v0_1."""
    if os.path.isfile(name):
        return name, None
    key = (name[:-3] if name.endswith(".py") else name).replace(".", "_")
    matches = [p for p in version_files() if key in (version_name(p), os.path.basename(p)[:-3])]
    if len(matches) == 1:
        return matches[0], None
    if matches:
        return (
            None,
            f"{name!r} matches several version files ({', '.join(map(os.path.basename, matches))})",
        )
    known = ", ".join(available_versions()) or "none found"
    return None, f"no version matches {name!r}: give one of {known} (or a file path)"


def resolve_target(name):
    """A version name (v0_3, v0.3, v0_3_backpressure) or a file path -> the version file's path."""
    path, why = find_version(name)
    if why:
        raise SystemExit(why)
    return path


def version_files():
    """The version files beside loadtest.py, in version order."""
    paths = glob.glob(os.path.join(HERE, "v*_*_*.py"))
    return sorted(
        (p for p in paths if VERSION_FILE.fullmatch(os.path.basename(p))), key=version_number
    )


def available_versions():
    return [version_name(p) for p in version_files()]


async def stats(target, role, refs=False, max_bytes=MAX_CONTROL_BYTES):
    """GET /stats of a simulator, or None if there is none (attach mode) or it does not answer."""
    url = target.urls.get(role)
    if not url:
        return None
    try:
        status, obj = await fetch_json(
            url + "/stats" + ("?refs=1" if refs else ""), max_bytes=max_bytes
        )
        return obj if status == 200 and isinstance(obj, dict) else None
    except (OSError, TimeoutError):
        return None


async def set_chaos(target, role, chaos, attempts=3):
    """Set a simulator's chaos; False if it never took (a fault that did not happen voids a run)."""
    for _ in range(attempts if target.urls.get(role) else 0):
        try:
            if (await fetch_json(target.urls[role] + "/chaos", "POST", chaos))[0] == 200:
                return True
        except (OSError, TimeoutError):
            pass
    return not target.urls.get(role)


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset of (label, value)): value}; comments and junk
    skipped."""
    metrics = {}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if not head or line.startswith("#"):
            continue
        name, _, labels = head.partition("{")
        pairs = frozenset(
            tuple(p.split("=", 1))
            for p in labels.rstrip("}").replace('"', "").split(",")
            if "=" in p
        )
        try:
            metrics[name, pairs] = float(value)
        except ValueError:
            pass
    return metrics


def payment_total(metrics, name, *labels):
    """The sum of a metric's series for the payment dependency (and `labels`)."""
    wanted = {("dependency", "payment"), *labels}
    return sum(value for (n, pairs), value in metrics.items() if n == name and pairs >= wanted)


async def scrape_alerts(url, history):
    """Scrape /metrics once: the names of the ALERT_RULES firing now (in the order they are
    listed), or None if there is no /metrics to read."""
    try:
        status, text = await fetch_json(url + "/metrics")
    except (OSError, TimeoutError):
        return None
    if status != 200 or not isinstance(text, str):
        return None
    metrics = parse_metrics(text)
    calls = payment_total(metrics, "dependency_request_duration_seconds_count")
    fast = payment_total(metrics, "dependency_request_duration_seconds_bucket", ("le", "0.075"))
    history.append(PaymentCalls(time.monotonic(), calls, fast))
    return [name for name, fires in ALERT_RULES.items() if fires(metrics, history)]


# The first alert rule that fired in a run, and when (s into the run).
Alert = collections.namedtuple("Alert", "rule at_s")


class Run:
    """One scenario against one target: its plan, and everything measured while it runs (the steps
    below fill it in: the load, the chaos, the samples, the drain; summarise() reads it)."""

    def __init__(
        self, target, scenario_name, capacity_rps, quick, seed, duration_s=None, rate_rps=None
    ):
        self.target = target
        self.name = scenario_name
        self.capacity_rps = capacity_rps
        self.quick = quick
        self.scenario = SCENARIOS[scenario_name]
        self.plan, self.phases = make_plan(
            self.scenario, capacity_rps, quick, seed, duration_s, rate_rps
        )
        self.run_id = f"{scenario_name}-{seed}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.seed = seed
        self.load = None
        self.stats_before = None  # {role: the simulator's /stats} before the load
        self.stats_after = None  # {role: its /stats with per-ref counts} after the drain
        self.acked = {}  # ref -> when its 201 came (s into the run)
        self.acked_ids = {}  # ref -> the order_id its 201 named
        self.crashed_at = None  # when orders was killed (s into the run), in a crash scenario
        self.unknown = None  # refs acknowledged whose order orders no longer finds (crash only)
        self.sent = {}  # ref -> when it was sent (s into the run)
        self.samples = []
        self.problems = []  # the run did not do what the scenario says
        self.has_metrics = False  # the target serves /metrics (v0.8 on): its alerts are watched
        self.first_alert = None  # an Alert, once one has fired
        self.alert_history = []  # PaymentCalls of each scrape


async def run_scenario(
    target,
    scenario_name,
    capacity_rps,
    quick,
    seed,
    progress,
    duration_s=None,
    rate_rps=None,
    on_load_done=None,
):
    """Drive one scenario against one target and return the run's result dict.

    capacity_rps is C (checks judge goodput against it); rate_rps, if given, is what the first
    phase offers (--rate), else loads are multiples of C. on_load_done() is called when the load
    has ended, before fulfilment drains."""
    run = Run(target, scenario_name, capacity_rps, quick, seed, duration_s, rate_rps)
    loop = asyncio.get_running_loop()
    run.load = Load(run.plan, request_maker(run))
    run.stats_before = {role: await stats(target, role) for role in ("payment", "shipping")}
    for role in ("payment", "shipping"):
        await set_chaos(target, role, {})
    # what exists now lives through the run: out of the collector's way, so that a full collection
    # (milliseconds, with every request waiting on it) has only the run's new objects to walk
    gc.collect()
    gc.freeze()
    # the first request is due in 10 ms: time for the chaos and sampling tasks' first steps
    run.load.t0 = loop.time() + 0.01
    driver = asyncio.ensure_future(drive_chaos(run))
    sampling = asyncio.ensure_future(sample(run))
    try:
        await run.load.drive(tick_reporter(run, progress))
    finally:
        gc.unfreeze()
        driver.cancel()
        for role in ("payment", "shipping"):
            await set_chaos(target, role, {})
    if on_load_done:
        on_load_done()
    await drain_fulfilment(run, progress)
    sampling.cancel()
    if run.crashed_at is not None:
        run.unknown = await unknown_orders(run)
    refs_bytes = MAX_CONTROL_BYTES + CONTROL_BYTES_PER_REQUEST * len(run.plan)
    run.stats_after = {
        role: await stats(target, role, refs=True, max_bytes=refs_bytes)
        for role in ("payment", "shipping")
    }
    progress("")
    return summarise(run)


async def unknown_orders(run):
    """The refs acknowledged whose order GET /orders/<id> no longer finds (after a crash)."""
    orders = run.target.urls["orders"]
    gate = asyncio.Semaphore(4)  # a few at a time: under the smallest accept queue (v1.0: 8)

    async def found(order_id):
        async with gate:
            for _ in range(5):  # a refusal (429, 503) is "ask later", not "unknown"
                try:
                    status = (await fetch_json(f"{orders}/orders/{order_id}"))[0]
                except (OSError, TimeoutError):
                    status = 0
                if status not in (0, 429, 503):
                    return status == 200
                await asyncio.sleep(0.1)
            return False

    refs = list(run.acked_ids)
    seen = await asyncio.gather(*(found(run.acked_ids[ref]) for ref in refs))
    return {ref for ref, ok in zip(refs, seen) if not ok}


def request_maker(run):
    """What Load asks for each planned request: POST an order (with a ref and a key), or GET a
    placed one."""
    orders = urlsplit(run.target.urls["orders"])
    host = orders.hostname
    port = orders.port
    loop = asyncio.get_running_loop()
    refs = iter(range(10**9))
    ids = []
    rng = random.Random(run.seed + 1)
    retries = run.scenario.get("client_retries", 0)

    def make_request(kind):
        if kind == "get" and ids:
            message = build_request("GET", host, port, f"/orders/{rng.choice(ids)}")
            return Request("get", [Attempt(host, port, message, ignore_answer, False)])
        ref = f"{run.run_id}-{next(refs)}"
        run.sent[ref] = loop.time() - run.load.t0
        body = {
            "item": rng.choice(["book", "mug", "pen"]),
            "qty": rng.randint(1, 3),
            "customer": "load",
            "ref": ref,
        }
        message = build_request("POST", host, port, "/orders", body, {"Idempotency-Key": ref})

        def on_answer(status, data):
            if status == 201:
                run.acked.setdefault(ref, loop.time() - run.load.t0)
                try:
                    order_id = json.loads(data)["order_id"]
                except (ValueError, KeyError, TypeError):
                    return
                # an id we could not put in a request line is not read
                if isinstance(order_id, str) and order_id.isascii() and order_id.isprintable():
                    run.acked_ids[ref] = order_id
                    ids.append(order_id)

        attempts = [Attempt(host, port, message, on_answer, True)] * (1 + retries)
        return Request("post", attempts, run.scenario.get("client_retry_pause_s", 0.0))

    return make_request


async def drive_chaos(run):
    """Set each phase's faults on payment and shipping when the phase begins; kill and restart
    orders when a crash phase begins."""
    loop = asyncio.get_running_loop()
    current = {"payment": {}, "shipping": {}}
    for ph in run.phases:
        await asyncio.sleep(max(0.0, run.load.t0 + ph["start"] - loop.time()))
        if ph["crash"]:
            try:
                killed, _ = await loop.run_in_executor(None, run.target.crash_and_restart)
            except (SystemExit, OSError) as exc:
                run.problems.append(f"orders did not start again after the kill: {exc}")
                return
            run.crashed_at = killed - run.load.t0  # loop.time() is time.monotonic()
        for role in ("payment", "shipping"):
            if ph[role] != current[role]:
                if not await set_chaos(run.target, role, ph[role]):
                    run.problems.append(
                        f"could not set {role} chaos {ph[role]} at {ph['start']:.0f} s"
                    )
                current[role] = ph[role]


def busy_pct(previous, now):
    """100 x the work done between two readings (work, time), per unit of time; None without two
    readings that time separates."""
    if previous is None or now is None or previous[0] is None or now[0] is None:
        return None
    if now[1] <= previous[1]:
        return None
    return round(100 * (now[0] - previous[0]) / (now[1] - previous[1]))


async def sample(run):
    """Every SAMPLE_EVERY_S: the orders process (threads, memory, CPU), the machine's CPU, the
    simulators' queues and shipments, and the alert rules on /metrics where there is one."""
    loop = asyncio.get_running_loop()
    target = run.target
    shipped_before = (run.stats_before["shipping"] or {}).get("unique_refs")
    machine_before = cpu_times()
    orders_before = None
    try:  # /metrics exists from v0.8 on
        run.has_metrics = (await fetch_json(target.urls["orders"] + "/metrics"))[0] == 200
    except (OSError, TimeoutError):
        pass
    while True:
        t = loop.time() - run.load.t0
        pay = await stats(target, "payment")
        ship = await stats(target, "shipping")
        threads, rss, orders_cpu_s = target.process_sample()
        machine_now = cpu_times()
        run.samples.append(
            {
                "t": t,
                "threads": threads,
                "rss_mb": rss,
                "cpu_pct": busy_pct(machine_before, machine_now),  # all cores = 100
                "orders_cpu_pct": busy_pct(orders_before, (orders_cpu_s, t)),  # one core = 100
                "shipped": ship["unique_refs"] - shipped_before
                if ship and shipped_before is not None
                else None,
                "payment_queue": pay["queue_depth"] if pay else None,
                "held_open": pay["held_open"] if pay else None,
                "capacity_rps": capacity_of(pay, None) if pay else None,  # workers may change
            }
        )
        machine_before = machine_now
        orders_before = (orders_cpu_s, t)
        # watched in every scenario: a false alarm counts too
        if run.has_metrics and run.first_alert is None:
            firing = await scrape_alerts(target.urls["orders"], run.alert_history)
            if firing:
                run.first_alert = Alert(firing[0], t)
        await asyncio.sleep(SAMPLE_EVERY_S)


def tick_reporter(run, progress):
    """Load.drive's on_tick: the live progress line, at most twice a second."""
    total_s = run.phases[-1]["end"]
    shown = [0.0]

    def on_tick(t):
        if t - shown[0] < 0.5:
            return
        shown[0] = t
        progress(
            f"{run.target.name} {run.name}: {min(t, total_s):5.1f}/{total_s:.0f} s  "
            f"in flight {run.load.in_flight:5d}  done {len(run.load.records):6d}"
        )

    return on_tick


async def drain_fulfilment(run, progress):
    """Give fulfilment time to ship what was acknowledged before ground truth is read: until all
    of it has shipped, nothing more has shipped for DRAIN_IDLE_S, or 4 s (quick; else 10 s) have
    passed."""
    loop = asyncio.get_running_loop()
    before = run.stats_before["shipping"]
    deadline = loop.time() + (4 if run.quick else 10)
    shipped = None
    moved_at = loop.time()
    while loop.time() < deadline and loop.time() - moved_at < DRAIN_IDLE_S and before:
        ship = await stats(run.target, "shipping")
        if ship is None or ship["unique_refs"] - before["unique_refs"] >= len(run.acked):
            break
        if ship["unique_refs"] != shipped:
            shipped = ship["unique_refs"]
            moved_at = loop.time()
        progress(
            f"{run.target.name} {run.name}: draining fulfilment, "
            f"{len(run.acked) - ship['unique_refs'] + before['unique_refs']} orders not shipped yet"
        )
        await asyncio.sleep(0.05)


def capacity_of(payment_stats, default=DEFAULT_CAPACITY_RPS):
    """C from payment's /stats when it is a sane number, else `default`: a /stats answer must
    not be able to size a load past the limits the command line is held to."""
    value = (payment_stats or {}).get("capacity_rps")
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 < value <= MAX_CAPACITY_RPS
    ):
        return value
    return default


def make_progress(enabled):
    """A one-line live status on stderr when it is a terminal."""

    def progress(text):
        if enabled:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()

    return progress


async def run_all(args, out):
    """Every planned cell (version x scenario) in turn, on fresh processes; then the matrix, which
    is printed even after Ctrl-C for what was measured, and for one --target, the three lines of
    its story."""
    planned = plan_cells(args)  # parse_args has already refused anything this would raise on
    if args.probe:
        return [await run_probe(args, planned[0][0], out)]
    cells = [(path, name) for path, names in planned for name in names]
    progress = make_progress(sys.stderr.isatty())
    started = time.monotonic()
    results = []
    spawner = Spawner(args.seed)
    try:
        for done, (path, name) in enumerate(cells):
            following = cells[done + 1] if done + 1 < len(cells) else None
            cell_progress = progress_of_cell(progress, done, len(cells), started)
            result = await run_cell(args, path, name, cell_progress, out, spawner, following)
            if result:
                results.append(result)
    finally:  # Ctrl-C too: the matrix of what was measured
        await spawner.close()
        if results and (len(planned) > 1 or args.compare):
            print_matrix(results, out)
    if args.target and results:
        print_story(results, out, " --quick" if args.quick else "")
    return results


def progress_of_cell(progress, done, cells, started):
    """The progress line of one cell: which of how many, the time so far, an estimate of what is
    left."""

    def cell_progress(text):
        if not text:
            return progress("")
        elapsed = time.monotonic() - started
        left = f" · ~{elapsed / done * (cells - done) / 60:.0f} min left" if done else ""
        progress(f"[{done + 1}/{cells} · {elapsed / 60:.0f} min{left}] {text}")

    return cell_progress


async def run_probe(args, path, out):
    """--probe: start the version, measure its dependencies directly, stop it."""
    target = Target.spawn(path, args.seed)
    try:
        capacity = args.capacity or capacity_of(await stats(target, "payment"))
        return await probe(target, capacity, args.quick, out, args.rate)
    finally:
        await target.stop_in_thread()


async def run_cell(args, path, name, progress, out, spawner, following=None):
    """One scenario on one version (or the --url target), printed; an untrusted run is run once
    more, and the second one's verdict stands. The version of the cell `following` this one is
    started while this one drains."""
    if args.url:
        target = attached_target(args)
        faulty = any(p["payment"] or p["shipping"] for p in SCENARIOS[name]["phases"])
        if faulty and not (args.payment_url and args.shipping_url):
            out.write(f"\n== {name}: skipped: its faults need --payment-url and --shipping-url\n")
            return None
        if any(p["crash"] for p in SCENARIOS[name]["phases"]):
            out.write(f"\n== {name}: skipped: it kills orders and starts it again: use --target\n")
            return None
    for attempt in (1, 2):
        if not args.url:
            target = await spawner.take(path, name)
        try:
            result = await run_scenario_on(args, target, name, progress, spawner, following)
        finally:  # its ground truth has been read (or it failed): nothing to wait for
            if target.proc:
                await target.stop_in_thread(at_once=True)
        print_run(result, out)
        out.flush()
        if result["verdict"] != "untrusted" or attempt == 2:
            return result
        out.write("   (untrusted: running it once more)\n")


def attached_target(args):
    """The --url target, with the simulators' URLs where they were given."""
    urls = {"orders": args.url.rstrip("/")}
    for role, url in (("payment", args.payment_url), ("shipping", args.shipping_url)):
        if url:
            urls[role] = url.rstrip("/")
    return Target(urls["orders"], urls)


async def run_scenario_on(args, target, name, progress, spawner, following):
    """run_scenario with the command line's settings, C read from payment unless --capacity."""
    # C: --capacity, else what payment says. --rate, if given, sets the offered load instead.
    for role in ("payment", "shipping"):
        await set_chaos(target, role, {})  # chaos left behind (a workers knob) must not set C
    capacity = args.capacity or capacity_of(await stats(target, "payment"))
    problem = plan_problem(name, SCENARIOS[name], capacity, args.quick, args.duration, args.rate)
    if problem:  # C read from /stats can differ from the default parse_args checked with
        raise SystemExit(f"refusing to run: {problem}")
    return await run_scenario(
        target,
        name,
        capacity,
        args.quick,
        args.seed,
        progress,
        args.duration,
        rate_rps=args.rate,
        on_load_done=lambda: spawner.prepare(following),
    )


# === GROUND TRUTH AND VERDICT ===


def percentile(values, q):
    """Exact nearest-rank percentile of a list (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    # round: 99.9 * 1000 / 100 is 999.0000000000001
    rank = math.ceil(round(q * len(ordered) / 100, 9))
    return ordered[max(0, rank - 1)]


LATENCY_PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9, "max": 100}


def latency_summary(latencies_s):
    """{p50, p90, p99, p999, max} in ms (None for no latencies)."""
    return {name: to_ms(percentile(latencies_s, q)) for name, q in LATENCY_PERCENTILES.items()}


# A figure reads requests on one of three clocks, each in seconds into the run: when a request was
# meant to leave (intended_at: the schedule), when it actually left (intended_at + its lag; the
# orders sent in a fault are counted on it), and when its answer came (answered_at).


def intended_at(record):
    """When it was meant to leave (the schedule): latency, the timeline and what users asked for."""
    return record.intended


def answered_at(record):
    """When its answer came (or its client gave up): what was served while a fault lasted."""
    return record.intended + record.latency


def summarise(run):
    """Everything a run measured, the figures its checks read, and its verdict."""
    records = run.load.records
    total_s = run.phases[-1]["end"]
    window = fault_window(run.phases)
    timeline = build_timeline(records, total_s, run.phases, run.samples, run.acked)
    # orders sent during the fault, on the clock of request_maker: when each POST actually left
    fault_refs = {ref for ref, t in run.sent.items() if window and window[0] <= t < window[1]}
    truth = ground_truth(
        run.stats_before, run.stats_after, run.run_id, run.acked, fault_refs, timeline
    )
    if run.unknown is not None and "lost_orders" in truth:
        shipped = truth.pop("shipped_refs")
        truth["lost_acked"] = len({ref for ref in run.acked if ref not in shipped} | run.unknown)
    truth.pop("shipped_refs", None)
    figures = {
        **load_figures(records, total_s, run.capacity_rps),
        **fault_figures(records, window, run.capacity_rps),
        **read_figures(records, window),
        "recovery_s": recovery_time(timeline, window[1]) if window else None,
        **{name: value for name, value in truth.items() if not isinstance(value, dict)},
        **process_figures(run.samples),
        **alert_figures(run, records, total_s),
        "schedule_lag_p99_ms": schedule_lag_p99_ms(records),
        "restart_to_201_s": restart_to_201_s(run),
        **phase_figures(records, run.phases, run.capacity_rps, run.samples),
        **core_figures(run),
    }
    verdict, reasons = decide(run.scenario, figures, run.problems)
    return {
        "target": run.target.name,
        "scenario": run.name,
        "verdict": verdict,
        "reasons": reasons,
        "latency_ms": {name: figures[f"{name}_ms"] for name in LATENCY_PERCENTILES},
        "counts": outcome_counts(records),
        "ground_truth": truth,
        "recovery_s": figures["recovery_s"],
        "figures": figures,
        "decisive": run.scenario["decisive"],
        "phases": [phase_summary(p) for p in run.phases],
        "timeline": timeline,
        **chart_of(records, total_s),
    }


def phase_summary(phase):
    """A phase as the result shows it: its name, span, load and faults."""
    keys = ("name", "start", "end", "load", "rps", "payment", "shipping", "fault")
    return {key: phase[key] for key in keys}


def fault_window(phases):
    """(start, end) of the fault phases, in seconds into the run; None for a run without one."""
    faulty = [p for p in phases if p["fault"]]
    return (faulty[0]["start"], faulty[-1]["end"]) if faulty else None


def outcome_counts(records):
    """How many requests ended in each outcome, how many were sent, and how many attempts the
    POSTs took (a retrying client makes several)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in records:
        counts[r.outcome] += 1
    counts["sent"] = len(records) - counts["capped"]
    counts["attempts"] = sum(r.attempts for r in records if r.kind == "post")
    return counts


def load_figures(records, total_s, capacity_rps):
    """The whole run: offered and served rates, latency of successes, errors, shedding."""
    ok = [r for r in records if r.outcome == "ok"]
    failed = [r for r in records if r.outcome not in ("ok", "shed", "4xx")]
    shed = [r.latency for r in records if r.outcome == "shed"]
    latency = latency_summary([r.latency for r in ok])
    return {
        "offered_rps": round(len(records) / total_s, 1),
        "goodput_rps": round(len(ok) / total_s, 1),
        "capacity_rps": capacity_rps,
        **{f"{name}_ms": value for name, value in latency.items()},
        "error_pct": round(100 * len(failed) / max(1, len(records)), 2),
        "timeouts": sum(1 for r in records if r.outcome == "timeout"),
        "bad_answers": sum(1 for r in records if r.outcome == "bad answer"),
        "shed_p99_ms": to_ms(percentile(shed, 99)),
    }


def fault_figures(records, window, capacity_rps):
    """The fault window: what was served while it lasted (a multiple of C, by answer time), the
    share of requests meant to leave from its start on that succeeded, and the POST p50 of its
    second half (a breaker's first calls of an outage are not what it is judged on)."""
    if window is None:
        return {}
    start, end = window
    middle = (start + end) / 2
    served = [r for r in records if r.outcome == "ok" and start <= answered_at(r) < end]
    from_start = [r for r in records if start <= intended_at(r)]
    succeeded = sum(1 for r in from_start if r.outcome == "ok")
    late_posts = [r.latency for r in records if r.kind == "post" and middle <= intended_at(r) < end]
    return {
        "fault_goodput_x": round(len(served) / (end - start) / capacity_rps, 2),
        "goodput_pct": round(100 * succeeded / max(1, len(from_start)), 1),
        "fault_post_p50_ms": to_ms(percentile(late_posts, 50)),
    }


def read_figures(records, window):
    """GET /orders/<id>: errors and p99, from the fault's second half on (a breaker's first
    half-second of learning is not what it is for), or over the whole run without a fault."""
    since = (window[0] + window[1]) / 2 if window else 0.0
    gets = [r for r in records if r.kind == "get" and since <= intended_at(r)]
    if not gets:
        return {}
    failed = sum(1 for r in gets if r.outcome != "ok")
    return {
        "get_error_pct": round(100 * failed / len(gets), 2),
        "get_p99_ms": to_ms(percentile([r.latency for r in gets if r.outcome == "ok"], 99)),
    }


def process_figures(samples):
    """The orders process and the machine, from the samples: is capacity set by the simulators,
    not by the CPU?"""
    threads = [s["threads"] for s in samples if s["threads"]]
    rss = [s["rss_mb"] for s in samples if s["rss_mb"]]
    machine_cpu = [s["cpu_pct"] for s in samples if s["cpu_pct"] is not None]
    orders_cpu = [s["orders_cpu_pct"] for s in samples if s["orders_cpu_pct"] is not None]
    return {
        "peak_threads": max(threads) if threads else None,
        "machine_cpu_p90_pct": percentile(machine_cpu, 90),  # 100 = all cores
        "orders_cpu_p90_pct": percentile(orders_cpu, 90),  # 100 = one core
        "peak_rss_mb": round(max(rss), 1) if rss else None,
    }


def phase_figures(records, phases, capacity_rps, samples):
    """The figures of each judged phase, named figure@phase, of the requests meant to leave in it
    from its settle_s on: goodput_pct (successful POSTs/s as a % of min(POSTs offered/s, the
    capacity payment had then)), p99_x (the accepted POSTs' p99 / the base phase's: what a
    healthy system keeps at any capacity) and shed_p99_ms (p99 of its 429/503 answers, GETs
    too); for the record, goodput_rps and p99_ms (the accepted POSTs' p99)."""
    base = next((p for p in phases if p["base"]), None)
    base_p99 = percentile(accepted_latencies(in_phase(records, base)), 99) if base else None
    figures = {}
    for p in (p for p in phases if p["judged"]):
        judged = in_phase(records, p)
        length = p["end"] - p["start"] - p["settle_s"]
        posts = [r for r in judged if r.kind == "post"]
        capacity = phase_capacity(p, samples, capacity_rps)
        p99 = percentile(accepted_latencies(judged), 99)
        shed = [r.latency for r in judged if r.outcome == "shed"]
        name = p["name"]
        figures[f"goodput_pct@{name}"] = goodput_pct(posts, length, capacity)
        figures[f"p99_x@{name}"] = round(p99 / base_p99, 2) if p99 and base_p99 else None
        figures[f"shed_p99_ms@{name}"] = to_ms(percentile(shed, 99))
        # how late loadtest sent those very requests: its own error on that figure
        shed_lags = [r.lag for r in judged if r.outcome == "shed"]
        figures[f"shed_lag_p99_ms@{name}"] = to_ms(percentile(shed_lags, 99))
        served = sum(1 for r in posts if r.outcome == "ok")
        figures[f"goodput_rps@{name}"] = round(served / length, 1) if length > 0 else None
        figures[f"p99_ms@{name}"] = to_ms(p99)
    return figures


def core_figures(run):
    """How late the services' core woke the canary (p99 ms): over the load, and over each judged
    phase from its settle_s on; nothing where no canary runs (see Canary)."""
    if CANARY.proc is None:
        return {}
    t0 = run.load.t0
    figures = {"core_lag_p99_ms": CANARY.lag_p99_ms(t0, t0 + run.phases[-1]["end"])}
    for p in (p for p in run.phases if p["judged"]):
        start = t0 + p["start"] + p["settle_s"]
        figures[f"core_lag_p99_ms@{p['name']}"] = CANARY.lag_p99_ms(start, t0 + p["end"])
    return figures


def goodput_pct(posts, length_s, capacity_rps):
    """Successful POSTs/s as a % of min(POSTs offered/s, capacity); None without POSTs or time."""
    if not posts or length_s <= 0:
        return None
    served_rps = sum(1 for r in posts if r.outcome == "ok") / length_s
    return round(100 * served_rps / min(len(posts) / length_s, capacity_rps), 1)


def in_phase(records, phase):
    """The requests meant to leave in a phase, from its settle_s on."""
    start = phase["start"] + phase["settle_s"]
    return [r for r in records if start <= intended_at(r) < phase["end"]]


def accepted_latencies(records):
    """Latencies of the successful POSTs among `records`."""
    return [r.latency for r in records if r.kind == "post" and r.outcome == "ok"]


def phase_capacity(phase, samples, capacity_rps):
    """The capacity payment had in a phase: the median of what its /stats said while it lasted;
    C where nothing was sampled."""
    sampled = [
        s["capacity_rps"]
        for s in samples
        if phase["start"] <= s["t"] < phase["end"] and s.get("capacity_rps")
    ]
    return percentile(sampled, 50) if sampled else capacity_rps


def first_alert_figure(run):
    """The first alert as the figure reads: 'PaymentSlow at 3.2 s'; 'none' where /metrics was
    watched and no rule fired (no false alarm either); None (n/a) where there is no /metrics."""
    if not run.has_metrics:
        return None
    if run.first_alert is None:
        return "none"
    return f"{run.first_alert.rule} at {run.first_alert.at_s:.1f} s"


def alert_figures(run, records, total_s):
    """The first alert, and for a scenario that checks it, the warning's lead: from the first
    alert to the first error a user saw (seconds; None if no alert fired)."""
    figures = {"first_alert": first_alert_figure(run)}
    if "alert_lead_s" in checked_figures(run.scenario):
        first_error = min((intended_at(r) for r in records if r.outcome != "ok"), default=total_s)
        alert = run.first_alert
        figures["alert_lead_s"] = None if alert is None else round(first_error - alert.at_s, 2)
    return figures


def restart_to_201_s(run):
    """From the kill of orders to the first 201 after it (s); None without a crash, or (in a run
    that crashed) never."""
    if run.crashed_at is None:
        return None
    after = [t for t in run.acked.values() if t > run.crashed_at]
    return round(min(after) - run.crashed_at, 3) if after else None


def schedule_lag_p99_ms(records):
    """How late loadtest itself sent its requests (p99, ms): the instrument's own health."""
    return to_ms(percentile([r.lag for r in records if r.outcome != "capped"], 99))


def to_ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def build_timeline(records, total_s, phases, samples, acked):
    """Per-second rows by intended send time: offered, ok, shed, errors, p99, and the samples'
    threads, CPU, payment queue and fulfilment backlog and lag at that second."""
    seconds = int(math.ceil(total_s))
    timeline = [
        {"t": t, "offered": 0, "ok": 0, "shed": 0, "errors": 0, "timeouts": 0}
        for t in range(seconds)
    ]
    latencies = [[] for _ in range(seconds)]  # of the successes meant to leave in each second
    for r in records:
        t = min(int(intended_at(r)), seconds - 1)
        second = timeline[t]
        second["offered"] += 1
        if r.outcome == "ok":
            second["ok"] += 1
            latencies[t].append(r.latency)
        elif r.outcome == "shed":
            second["shed"] += 1
        elif r.outcome != "4xx":
            second["errors"] += 1
            second["timeouts"] += r.outcome == "timeout"
    ack_times = sorted(acked.values())
    for second, second_latencies in zip(timeline, latencies):
        second["p99_ms"] = to_ms(percentile(second_latencies, 99))
        second["fault"] = any(p["fault"] and p["start"] <= second["t"] < p["end"] for p in phases)
        second.update(sampled_in(second["t"], samples, ack_times))
    return timeline


def chart_bucket_s(total_s):
    """The report's bucket for a run this long: the coarsest that still gives MIN_CHART_POINTS."""
    fits = [b for b in CHART_BUCKETS_S if total_s / b >= MIN_CHART_POINTS]
    return fits[0] if fits else CHART_BUCKETS_S[-1]


def build_chart(records, total_s, bucket_s):
    """Rows of bucket_s seconds by intended send time, as the timeline's seconds are: t (its
    start), ok (successes, a count: req/s is ok / bucket_s) and p99_ms of the successes."""
    # round: 6.25 / 0.25 and 0.3 / 0.1 are a hair off whole numbers
    count = max(1, math.ceil(round(total_s / bucket_s, 6)))
    latencies = [[] for _ in range(count)]
    ok = [0] * count
    for r in records:
        if r.outcome == "ok":
            k = min(math.floor(round(intended_at(r) / bucket_s, 6)), count - 1)
            ok[k] += 1
            latencies[k].append(r.latency)
    return [
        {"t": round(k * bucket_s, 3), "ok": ok[k], "p99_ms": to_ms(percentile(latencies[k], 99))}
        for k in range(count)
    ]


def chart_of(records, total_s):
    """{"chart": {"bucket_s", "rows"}} for a run short enough to chart finer than a second, else
    {}: the report then draws the per-second timeline (as it does from an older --json)."""
    bucket_s = chart_bucket_s(total_s)
    if bucket_s >= 1:
        return {}
    return {"chart": {"bucket_s": bucket_s, "rows": build_chart(records, total_s, bucket_s)}}


def sampled_in(t, samples, ack_times):
    """What the samples of second t saw: peak threads and CPU, and at its last sample, payment's
    queue and fulfilment's backlog and lag."""
    inside = [s for s in samples if t <= s["t"] < t + 1]
    last = inside[-1] if inside else {}
    seen = {
        "threads": max((s["threads"] for s in inside if s["threads"]), default=None),
        "cpu_pct": max((s["cpu_pct"] for s in inside if s["cpu_pct"] is not None), default=None),
        "payment_queue": last.get("payment_queue"),
        "backlog": None,
        "lag_s": None,
    }
    shipped = last.get("shipped")
    if shipped is not None:
        now = last["t"]
        acked_by_now = sum(1 for t in ack_times if t <= now)
        seen["backlog"] = max(0, acked_by_now - shipped)
        # fulfilment lag: the age of the oldest acknowledged order not yet shipped (FIFO)
        seen["lag_s"] = round(now - ack_times[shipped], 2) if shipped < acked_by_now else 0.0
    return seen


def recovery_time(timeline, fault_end):
    """Seconds from the end of the fault until every later second is good; None if never."""
    start = int(math.ceil(fault_end))
    good_from = None
    for b in timeline[start:]:
        # shedding everything is not recovered
        good = (
            b["errors"] == 0
            and b["shed"] <= 0.1 * b["offered"]
            and (b["p99_ms"] is None or b["p99_ms"] <= RECOVERED_P99_MS)
        )
        if good and good_from is None:
            good_from = b["t"]
        elif not good:
            good_from = None
    return None if good_from is None else max(0, good_from - fault_end)


def mean_per_order(by_ref, refs):
    """Mean of a per-ref count over the orders that reached the dependency (None if none did)."""
    reached = [by_ref[ref] for ref in refs if ref in by_ref]
    return round(sum(reached) / len(reached), 2) if reached else None


def ground_truth(stats_before, stats_after, run_id, acked, fault_refs, timeline):
    """Duplicates, lost and orphan orders, amplification and zombie work, from the simulators'
    /stats before the load and after the drain."""
    pay = stats_after.get("payment")
    ship = stats_after.get("shipping")
    pay_before = stats_before.get("payment")
    ship_before = stats_before.get("shipping")
    truth = {}
    if pay and pay_before:
        charged = {ref: n for ref, n in pay.get("refs", {}).items() if ref.startswith(run_id)}
        truth["duplicate_charges"] = sum(1 for n in charged.values() if n > 1)
        shipped = {ref for ref in ship.get("refs", {})} if ship else set()
        # charged, for an order neither acknowledged nor shipped: money taken for nothing
        truth["orphan_charges"] = sum(
            1 for ref in charged if ref not in acked and ref not in shipped
        )
        truth["payment_calls"] = pay["calls"] - pay_before["calls"]
        calls = {ref: n for ref, n in pay.get("calls_by_ref", {}).items() if ref.startswith(run_id)}
        work = {ref: pay.get("work_by_ref", {}).get(ref, 0) for ref in calls}
        # Amplification is work: calls that took one of payment's worker slots (zombie work
        # included), per order that reached payment. Cheap refusals (a 409 "in flight", a replayed
        # answer) are calls, not work.
        truth["amplification"] = mean_per_order(work, calls)
        truth["fault_amplification"] = mean_per_order(work, fault_refs & set(calls))
        truth["calls_per_order"] = mean_per_order(calls, calls)
        truth["zombie_work"] = pay["zombie"] - pay_before["zombie"]
        truth["held_open_after"] = pay["held_open"]
        truth["payment_queue_peak"] = pay["queue_peak"]
    if ship and ship_before:
        shipped = {ref: n for ref, n in ship.get("refs", {}).items() if ref.startswith(run_id)}
        truth["duplicate_orders"] = sum(1 for n in shipped.values() if n > 1)
        truth["lost_orders"] = sum(1 for ref in acked if ref not in shipped)
        truth["shipped_refs"] = set(shipped)
        truth["zombie_work"] = truth.get("zombie_work", 0) + ship["zombie"] - ship_before["zombie"]
        backlogs = [b["backlog"] for b in timeline if b["backlog"] is not None]
        lags = [b["lag_s"] for b in timeline if b["lag_s"] is not None]
        truth["backlog_max"] = max(backlogs) if backlogs else None
        truth["lag_max_s"] = max(lags) if lags else None
    return truth


def decide(scenario, figures, problems):
    """A run's verdict and its reasons, decided here and nowhere else. 'fail' when the run did not
    do what its scenario says (a fault that was never set is never a pass) or the target broke
    HTTP (any bad answer, whatever the checks say); else 'untrusted' when loadtest fell behind its
    own schedule (a lag p99 over UNTRUSTED_LAG_MS measured the machine, not the target; run_cell
    runs it once more); else what the checks say."""
    passed, reasons = judge(scenario, figures)
    bad_answers = figures.get("bad_answers") or 0
    if bad_answers:
        problems = problems + [
            f"{bad_answers:,} bad answers: the target broke HTTP (no status line, a Content-Length "
            f"that is not a number, over {MAX_ANSWER_BYTES:,} bytes, or cut short)"
        ]
    lag_ms = figures.get("schedule_lag_p99_ms")
    lagged = lag_ms is not None and lag_ms > UNTRUSTED_LAG_MS
    if lagged:
        reasons = [
            f"loadtest ran {lag_ms:,.0f} ms behind its own schedule (p99 > "
            f"{UNTRUSTED_LAG_MS} ms): the machine was too busy to measure this target"
        ] + reasons
    coarse = failed_finer_than(scenario, figures, lag_ms)
    if coarse and not lagged:
        lagged = len(coarse) == len(failed_checks(scenario, figures))
        reasons = too_coarse(coarse) + reasons
    if problems:
        return "fail", problems + reasons
    if lagged:
        return "untrusted", reasons
    return ("pass" if passed else "fail"), reasons


def failed_checks(scenario, figures):
    """The checks a run failed, as (figure, op, bound)."""
    return [
        (figure, op, bound)
        for figure, op, bound in scenario["checks"]
        if figures.get(figure) is not None and not CHECK_OPERATORS[op](figures[figure], bound)
    ]


def failed_finer_than(scenario, figures, lag_ms):
    """The failed millisecond bounds ('shed_p99_ms@10C <= 5') too fine for what measured them,
    each with what was coarse: "loadtest" (its lag p99 over the run, or over the very requests
    the figure is of) or "core" (how late the services' core woke the canary: core_lag_ms)."""
    coarse = []
    for figure, op, bound in failed_checks(scenario, figures):
        if not figure.split("@")[0].endswith("_ms") or op != "<=":
            continue
        if max(lag_ms or 0, own_lag_ms(figure, figures)) * TEST_ACCURACY_RATIO > bound:
            coarse.append((f"{figure} {op} {bound}", "loadtest"))
        elif core_lag_ms(figure, figures) * TEST_ACCURACY_RATIO > bound:
            coarse.append((f"{figure} {op} {bound}", "core"))
    return coarse


# Why a failed bound was too fine to judge, by what was coarse (failed_finer_than)
COARSE_BECAUSE = {
    "loadtest": "loadtest sent requests late (p99 of the run's or of the figure's own)",
    "core": "loadtest found the services' core late to wake its canary (p99 of the run's or the "
    "phase's)",
}


def too_coarse(coarse):
    """One reason for each thing that was coarse, naming the bounds it could not judge."""
    reasons = []
    for source, because in COARSE_BECAUSE.items():
        checks = [check for check, by in coarse if by == source]
        if checks:
            quarter = f"by over a quarter of {', '.join(checks)}"
            reasons.append(f"{because} {quarter}: too coarse to fail it")
    return reasons


def own_lag_ms(figure, figures):
    """The lag p99 of the very requests a figure is of, where measured ('shed_p99_ms@10C': its
    shed_lag_p99_ms@10C); else 0."""
    name, at, phase = figure.partition("@")
    if name != "shed_p99_ms":
        return 0
    return figures.get("shed_lag_p99_ms" + at + phase) or 0


def core_lag_ms(figure, figures):
    """How late the services' core woke the canary (p99) in the figure's phase where it has one
    ('shed_p99_ms@10C': core_lag_p99_ms@10C), else over the run; 0 where no canary ran."""
    _, at, phase = figure.partition("@")
    in_phase = figures.get("core_lag_p99_ms" + at + phase)
    return in_phase if in_phase is not None else figures.get("core_lag_p99_ms") or 0


# What a check makes of a figure that could not be measured: whether that passes, and why.
Unmeasured = collections.namedtuple("Unmeasured", "passes why")
UNMEASURED = {
    "shed_p99_ms": Unmeasured(True, "nothing shed"),  # nothing refused: nothing slow to refuse
    "recovery_s": Unmeasured(False, "never recovered before the run ended"),
    "alert_lead_s": Unmeasured(
        False, "no alert fired (no /metrics, or none of its alert rules fired)"
    ),
    "get_p99_ms": Unmeasured(False, "no GET succeeded"),
    "goodput_pct": Unmeasured(False, "no POST was meant to leave in it"),
    "p99_x": Unmeasured(False, "no accepted POST here or in the base phase to hold it to"),
}
NOT_MEASURABLE = Unmeasured(False, "not measurable here")
CHECK_OPERATORS = {
    "<=": lambda value, bound: value <= bound,
    ">=": lambda value, bound: value >= bound,
}


def judge(scenario, figures):
    """Apply the scenario's checks: (all passed?, one reason per check)."""
    reasons = []
    passed = True
    for figure, op, bound in scenario["checks"]:
        value = figures.get(figure)
        if value is None:  # figure@phase: the figure's meaning, in that phase
            unmeasured = UNMEASURED.get(figure.split("@")[0], NOT_MEASURABLE)
            if unmeasured.passes:
                reasons.append(f"{figure}: {unmeasured.why} (ok)")
            else:
                reasons.append(f"{figure}: {unmeasured.why} (needs {op} {bound})")
            passed = passed and unmeasured.passes
        elif CHECK_OPERATORS[op](value, bound):
            reasons.append(f"{figure} = {value} {op} {bound} (ok)")
        else:
            reasons.append(f"{figure} = {value}, needs {op} {bound}")
            passed = False
    return passed, reasons


def checked_figures(scenario):
    """The figures a scenario's checks read."""
    return [figure for figure, _, _ in scenario["checks"]]


# === REPORTS ===


def show(value, unit=""):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}" if abs(value) < 100 else f"{value:,.0f}{unit}"
    return f"{value:,}{unit}"


def print_run(result, out=sys.stdout):
    """The per-run report: latency, outcomes, ground truth, timeline strip, verdict."""
    figures = result["figures"]
    counts = result["counts"]
    latency = result["latency_ms"]
    write = out.write
    about = SCENARIOS[result["scenario"]]["about"]
    write(f"\n== {result['target']} · {result['scenario']} · {about}\n")
    write(
        f"   offered {show(figures['offered_rps'])} req/s"
        f" · goodput {show(figures['goodput_rps'])} req/s"
        f" · capacity C = {show(figures['capacity_rps'])} req/s\n"
    )
    write(
        "   latency of successes (ms)   "
        + "  ".join(f"{name} {show(latency[name])}" for name in LATENCY_PERCENTILES)
        + "\n"
    )
    shown = [o for o in OUTCOMES if counts[o] or o in ("ok", "shed", "timeout")]
    write(
        "   outcomes   "
        + "  ".join(f"{o} {counts[o]}" for o in shown)
        + f"   (attempts {counts['attempts']})\n"
    )
    write(ground_truth_lines(result["ground_truth"]))
    write(process_line(result["recovery_s"], figures))
    write(phase_lines(figures))
    if figures.get("first_alert") or "alert_lead_s" in figures:  # only /metrics can raise one
        write(alert_line(figures))
    print_timeline(result["timeline"], out)
    # PASS, FAIL or UNTRUSTED
    # what failed first, then what passed (a stable sort keeps each group's order)
    reasons = sorted(result["reasons"], key=lambda reason: reason.endswith("(ok)"))
    write(f"   {result['verdict'].upper()}: " + "; ".join(reasons) + "\n")


def ground_truth_lines(truth):
    """What the simulators counted: duplicates, lost orders, zombie work, amplification."""
    if not truth:
        return "   ground truth   n/a (no simulator URLs: attach mode)\n"
    return (
        f"   ground truth   duplicate charges {show(truth.get('duplicate_charges'))}"
        f" · orphan charges {show(truth.get('orphan_charges'))}"
        f" · duplicate orders {show(truth.get('duplicate_orders'))}"
        f" · lost orders {show(truth.get('lost_orders'))}"
        f" · zombie work {show(truth.get('zombie_work'))}"
        f" · held open after {show(truth.get('held_open_after'))}\n"
        f"   payment work per order (amplification) {show(truth.get('amplification'))}x"
        f", in the fault window {show(truth.get('fault_amplification'))}x"
        f" · calls per order (409s too) {show(truth.get('calls_per_order'))}\n"
    )


def process_line(recovery_s, figures):
    """Recovery, the orders process, the machine, the instrument's own lag and, where a canary
    watched the services' core, how late that core woke it."""
    core = figures.get("core_lag_p99_ms")
    return (
        f"   recovery {show(recovery_s, ' s')}"
        f" · peak threads {show(figures['peak_threads'])}"
        f" · peak RSS {show(figures['peak_rss_mb'], ' MiB')}"
        f" · machine CPU p90 {show(figures['machine_cpu_p90_pct'], ' %')}"
        f" (orders p90 {show(figures['orders_cpu_p90_pct'], ' % of a core')})"
        f" · schedule lag p99 {show(figures['schedule_lag_p99_ms'], ' ms')}"
        + (f" (services' core {show(core, ' ms')})" if core is not None else "")
        + "\n"
    )


def phase_lines(figures):
    """The judged phases' own figures (figure@phase), one line each; nothing for other runs."""
    phases = {}
    for key, value in figures.items():
        if "@" in key:
            figure, name = key.split("@")
            phases.setdefault(name, {})[figure] = value
    return "".join(
        f"   phase {name:8s} goodput {show(seen.get('goodput_pct'), ' %')} of what it could serve"
        f"{served(seen)} · accepted p99 {show(seen.get('p99_x'), 'x')} the base phase's"
        f"{absolute(seen, 'p99_ms')} · shed p99 {show(seen.get('shed_p99_ms'), ' ms')}\n"
        for name, seen in phases.items()
    )


def served(seen):
    """' (92.5/s)': a phase's goodput in orders/s, where it was measured."""
    return f" ({show(seen['goodput_rps'])}/s)" if seen.get("goodput_rps") is not None else ""


def absolute(seen, figure):
    """' (84.3 ms)': a phase's figure in ms, where it was measured."""
    return f" ({show(seen[figure], ' ms')})" if seen.get(figure) is not None else ""


def alert_line(figures):
    """The first alert (its figure is None where there is no /metrics) and the warning's lead."""
    lead = ""
    if figures.get("alert_lead_s") is not None:
        lead_s = show(figures["alert_lead_s"], " s")
        lead = f" · warning lead {lead_s} before the first error a user saw"
    return f"   first alert {figures.get('first_alert') or 'none (no /metrics)'}{lead}\n"


def print_timeline(timeline, out):
    """One row per second; '#' marks seconds inside the fault window; cpu % is the whole
    machine's."""
    # p99 when over 1% of users gave up: n/a would hide it
    gave_up = f">{CLIENT_TIMEOUT_S * 1000:,.0f}"
    out.write(
        "    t s     offered    ok  shed  errors    p99 ms"
        "  threads  pay.queue  backlog  lag s  cpu %\n"
    )
    for second in timeline:
        p99 = gave_up if second["timeouts"] > 0.01 * second["offered"] else show(second["p99_ms"])
        out.write(
            f"   {second['t']:3d} {'#' if second['fault'] else ' '} {second['offered']:9d}"
            f" {second['ok']:5d} {second['shed']:5d} {second['errors']:7d} {p99:>9}"
            f" {show(second['threads']):>8} {show(second['payment_queue']):>10}"
            f" {show(second['backlog']):>8} {show(second['lag_s']):>6}"
            f" {show(second['cpu_pct']):>6}\n"
        )


MARKS = {"pass": "✓", "fail": "✗", "untrusted": "?"}


def matrix_cell(result):
    """A run in the matrix: its mark and its decisive figure, starred when that figure passed
    its own check and another check failed the run (the footnote names it)."""
    star = "*" if failed_elsewhere(result) else ""
    return f"{MARKS[result['verdict']]} {show(result['figures'].get(result['decisive']))}{star}"


def failed_elsewhere(result):
    """A failed run whose decisive figure passed: what failed it instead (a check, or a problem:
    its first line), else []."""
    if result["verdict"] != "fail":
        return []
    what_failed = failures(result)
    if result["decisive"] in what_failed:
        return []
    return list(what_failed.values())


def failures(result):
    """What failed a run, as {check figure, or the problem's text: its first line}; notes about
    the instrument's own lag are not failures."""
    checked = {figure for figure, _, _ in SCENARIOS[result["scenario"]]["checks"]}
    found = {}
    for reason in result.get("reasons", []):
        line = reason.splitlines()[0]
        name = line.split(" ")[0].rstrip(":")
        if line.endswith("(ok)") or line.startswith("loadtest "):
            continue
        found[name if name in checked else line] = line
    return found


def print_matrix(results, out=sys.stdout):
    """Scenarios x versions: pass/fail with the decisive figure (named once, beside the scenario),
    and a legend."""
    targets = list(dict.fromkeys(r["target"] for r in results))
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    decisive = {r["scenario"]: r["decisive"] for r in results}
    cell = {(r["scenario"], r["target"]): matrix_cell(r) for r in results}
    width = max([len(c) for c in cell.values()] + [len(t) for t in targets]) + 2
    label = (
        max([len(f"{s} ({decisive[s]})") for s in scenarios] + [len("scenario (decisive figure)")])
        + 2
    )
    out.write("\nLesson matrix\n")
    out.write(
        f"   {'scenario (decisive figure)':{label}s}"
        + "".join(f"{t:>{width}s}" for t in targets)
        + "\n"
    )
    for s in scenarios:
        out.write(
            f"   {s + ' (' + decisive[s] + ')':{label}s}"
            + "".join(f"{cell.get((s, t), '-'):>{width}s}" for t in targets)
            + "\n"
        )
    out.write(
        "   ✓ pass  ✗ fail  ? untrusted (the machine was too busy to measure)"
        "  ·  the same checks for every version: python loadtest.py --list\n"
    )
    for r in results:
        why = failed_elsewhere(r)
        more = f" (and {len(why) - 2} more)" if len(why) > 2 else ""
        if why:
            out.write(f"   * {r['target']} {r['scenario']} failed on {'; '.join(why[:2])}{more}\n")


def lesson_page(number):
    """The course's page for the version with this number on the ladder (1 for v0.1), as a path
    from the kit's folder, or None where there is none (a copy of loadtest.py alone)."""
    here = os.path.dirname(os.path.abspath(__file__))
    pages = sorted(glob.glob(os.path.join(here, "docs", "lessons", f"{number:02d}-*.md")))
    return os.path.relpath(pages[0], here) if pages else None


def print_story(results, out=sys.stdout, quick=""):
    """Three lines that end a version's run: what you saw, why, and what to do next (the course's
    next step)."""
    name = results[0]["target"]
    fixes, breaks = LADDER.get(name, ([], []))
    shown = next((r for s in breaks + fixes for r in results if r["scenario"] == s), None)
    if shown is None:
        return
    figure = shown["decisive"]
    seen = (
        "fails"
        if shown["verdict"] == "fail"
        else "passes"
        if shown["verdict"] == "pass"
        else "could not judge"
    )
    value = show(shown["figures"].get(figure))
    instead = "; ".join(failed_elsewhere(shown)[:1])  # the decisive figure passed: what failed
    also = f", but {instead}" if instead else ""
    out.write(f"\nWhat you saw: {name} {seen} {shown['scenario']} ({figure} {value}{also}).\n")
    if shown["scenario"] in breaks:
        out.write(f"Why: {WHY[shown['scenario']]}.\n")
    else:
        out.write(
            f"Why: {name} is the step that fixes it; "
            "`diff -u` it against its predecessor to see how.\n"
        )
    files = {version_name(p): os.path.basename(p) for p in version_files()}
    names = list(files)
    later = names[names.index(name) + 1 :] if name in names else []
    if later:
        lesson = lesson_page(names.index(name) + 1)
        read = f"read {lesson}, then " if lesson else ""
        out.write(
            f"Next: {read}diff -u {files[name]} {files[later[0]]}"
            f"   then   python loadtest.py --target {later[0]}{quick}\n"
        )
    else:
        lesson = lesson_page(names.index(name) + 1) if name in names else None
        read = f"read {lesson}, then " if lesson else ""
        out.write(
            f"Next: {read}python loadtest.py --compare all --scenario all --quick"
            " --report course.html   (the whole course)\n"
        )


# Okabe and Ito's palette (its yellow swapped for Tol's wine, readable on white): told apart with
# every common form of colour blindness; the last version is drawn in black.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#999999",
    "#882255",
    "#000000",
]


def nice_ceiling(value):
    """The axis top: the first of 1, 2, 2.5, 5 x 10^k at or above value."""
    scale = 10 ** math.floor(math.log10(max(value, 1e-9)))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= value)


def svg_chart(lines, fault, title, unit, width=720, height=230, t_end=None):
    """One line chart: seconds into the run across (to t_end, else half a second past the last
    point), `unit` up, one line per (label, colour, [(t, value)]), the fault window (start, end)
    shaded, a legend; plain SVG, no script."""
    left = 58
    right = 14
    top_pad = 40
    bottom = 36
    if t_end is None:
        t_end = max([t for _, _, points in lines for t, _ in points] + [1.0]) + 0.5
    top = nice_ceiling(
        max([v for _, _, points in lines for _, v in points if v is not None] + [1.0])
    )
    x = lambda t: left + (width - left - right) * t / t_end  # noqa: E731
    y = lambda v: top_pad + (height - top_pad - bottom) * (1 - v / top)  # noqa: E731
    out = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>'
    ]
    if fault:
        out.append(
            f'<rect x="{x(fault[0]):.1f}" y="{top_pad}" width="{x(fault[1]) - x(fault[0]):.1f}" '
            f'height="{height - top_pad - bottom}" fill="#fbe3e3"/><text x="{x(fault[0]) + 4:.1f}" '
            f'y="{top_pad + 12}" class="tick">fault</text>'
        )
    for k in range(5):  # value gridlines and ticks
        v = top * k / 4
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            'stroke="#e3e3e3"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" class="tick" text-anchor="end">'
            f"{v:,.4g}</text>"
        )
    out.append(time_ticks(t_end, x, height - bottom + 15))
    middle = (top_pad + height - bottom) / 2
    out.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" class="axis" '
        'text-anchor="middle">seconds into the run</text>'
        f'<text x="12" y="{middle:.0f}" class="axis" '
        f'text-anchor="middle" transform="rotate(-90 12 {middle:.0f})">'
        f"{html.escape(unit)}</text>"
    )
    out.append(svg_lines(lines, x, y, left))
    return "".join(out) + "</svg>"


def svg_lines(lines, x, y, left):
    """Each (label, colour, points) as a polyline, and its entry in the legend above the chart."""
    out = []
    for i, (label, colour, points) in enumerate(lines):
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points if v is not None)
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2.2" points="{path}"/>'
            f'<rect x="{left + 8 + 66 * i}" y="22" width="12" height="4" fill="{colour}"/>'
            f'<text x="{left + 24 + 66 * i}" y="28" class="tick">{html.escape(label)}</text>'
        )
    return "".join(out)


def time_ticks(t_end, x, y):
    """The time axis' ticks: about ten, whatever the run's length (half seconds on a short one)."""
    steps = (0.5, 1, 2, 5, 10)
    step = next((step for step in steps if t_end <= 10 * step), 10 * math.ceil(t_end / 100))
    ticks = [k * step for k in range(int(round(t_end / step, 6)) + 1)]
    return "".join(
        f'<text x="{x(t):.1f}" y="{y}" class="tick" text-anchor="middle">{t:g}</text>'
        for t in ticks
    )


REPORT_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;"
    "color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px} "
    "th,td{padding:.25em .5em;border:1px solid #ddd;"
    "text-align:left;font-variant-numeric:tabular-nums;white-space:nowrap} "
    "td.pass{background:#e6f4ea}"
    "td.fail{background:#fde8e8} td.untrusted{background:#fff4d6} "
    "svg{display:block;margin:.6em 0}"
    "svg .title{font:600 13px system-ui,sans-serif} "
    "svg .tick{font:11px system-ui,sans-serif;fill:#444}"
    "svg .axis{font:12px system-ui,sans-serif;fill:#444} .pass{color:#1e7b34} "
    ".fail{color:#b3261e}"
    ".untrusted{color:#8a5a00} section{margin-top:2.2em} "
    "summary{cursor:pointer;margin:.2em 0}"
)


def write_report(results, path):
    """One self-contained HTML file: the matrix, then per scenario p99 and goodput over time, one
    line per version, and each run's verdict with its reasons. Inline SVG and CSS, no script,
    nothing fetched."""
    targets = list(dict.fromkeys(r["target"] for r in results))
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(targets)}
    result_of = {(r["scenario"], r["target"]): r for r in results}
    head = "".join(f"<th>{html.escape(t)}</th>" for t in targets)
    rows = [report_row([result_of.get((s, t)) for t in targets]) for s in scenarios]
    sections = [
        report_section([result_of[s, t] for t in targets if (s, t) in result_of], colour)
        for s in scenarios
    ]
    page = (
        "<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>Failure-first playground: load test report</title><style>{REPORT_STYLE}</style>"
        "<h1>Failure-first playground: load test report</h1>"
        "<p>✓ pass, ✗ fail, ? untrusted (the machine was too busy to measure), "
        "with each scenario's decisive figure; * it passed, another check failed the run "
        "(hover, or open the run below). "
        "The fault window is shaded red; latency is measured from each request's intended send "
        "time.</p>"
        f"<table><tr><th>scenario</th>{head}</tr>{''.join(rows)}</table>" + "".join(sections)
    )
    write_output("--report", path, lambda f: f.write(page))


def report_row(results):
    """The matrix row of one scenario: a cell per target (None: not run there)."""
    scenario = next(r for r in results if r)
    cells = "".join(
        f'<td class="{r["verdict"]}" title="{html.escape("; ".join(failed_elsewhere(r)))}">'
        f"{matrix_cell(r)}</td>"
        if r
        else '<td class="">–</td>'
        for r in results
    )
    name = html.escape(scenario["scenario"])
    return f"<tr><th>{name} <small>{html.escape(scenario['decisive'])}</small></th>{cells}</tr>"


def chart_points(result):
    """(bucket_s, rows) a report draws a run from: its "chart" (finer than a second, a short
    run), else its per-second timeline (a long run, or the --json of an older loadtest)."""
    chart = result.get("chart")
    if chart:
        return chart["bucket_s"], chart["rows"]
    return 1, result["timeline"]


def per_bucket(buckets):
    """How a chart's title says its buckets: "per second", "per 0.1 s"."""
    return "per " + " or ".join("second" if b == 1 else f"{b:g} s" for b in sorted(set(buckets)))


def report_section(results, colour):
    """One scenario: p99 and goodput over time (per second, finer on a short run), a line per
    target, and each run's verdict."""
    first = results[0]
    if first.get("phases"):
        fault = fault_window(first["phases"])
        t_end = first["phases"][-1]["end"]
    else:
        faulty = [second["t"] for second in first["timeline"] if second["fault"]]
        fault = (min(faulty), max(faulty) + 1) if faulty else None
        t_end = None
    drawn = {r["target"]: chart_points(r) for r in results}

    def lines(field, per_s=False):
        """(target, colour, points) at each bucket's middle; a count per_s is made req/s."""
        drawn_lines = []
        for r in results:
            bucket, rows = drawn[r["target"]]
            points = [(b["t"] + bucket / 2, b[field]) for b in rows]
            if per_s:
                points = [(t, None if v is None else v / bucket) for t, v in points]
            drawn_lines.append((r["target"], colour[r["target"]], points))
        return drawn_lines

    buckets = [bucket for bucket, _ in drawn.values()]
    p99_title = f"p99 latency of successful requests, {per_bucket(buckets)}"
    ok_title = "goodput: successful requests per second"
    if per_bucket(buckets) != "per second":
        ok_title += f", counted {per_bucket(buckets)}"

    verdicts = "".join(
        f'<details><summary><b>{html.escape(r["target"])}</b> <span class="{r["verdict"]}">'
        f'{r["verdict"].upper()}</span> · {html.escape(r["decisive"])} '
        f'{show(r["figures"].get(r["decisive"]))}</summary><ul>'
        + "".join(f"<li>{html.escape(reason)}</li>" for reason in r["reasons"])
        + "</ul></details>"
        for r in results
    )
    about = SCENARIOS[first["scenario"]]["about"]
    about += "" if about.endswith("?") else "."
    return (
        f'<section><h2>{html.escape(first["scenario"])}</h2><p>{html.escape(about)} '
        f'Decisive figure: <code>{html.escape(first["decisive"])}</code>.</p>'
        + svg_chart(lines("p99_ms"), fault, p99_title, "ms", t_end=t_end)
        + svg_chart(lines("ok", per_s=True), fault, ok_title, "req/s", t_end=t_end)
        + verdicts
        + "</section>"
    )


# === CALIBRATE ===
# Built-in responders, each in its own process so they do not share the instrument's CPU.


async def responder(kind, host, port):
    """'trivial' answers at once; 'stall' answers at once except 1 s of every 5 s (a GC pause)."""
    loop = asyncio.get_running_loop()
    body = b'{"status": "ok"}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    t0 = loop.time()

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            phase = (loop.time() - t0) % 5.0
            if kind == "stall" and phase >= 4.0:  # stalled: everyone waits until the stall ends
                loop.call_later(5.0 - phase, self.reply)
            else:
                self.reply()

        def reply(self):
            self.transport.write(answer)
            self.transport.close()

    server = await loop.create_server(Answer, host, port, backlog=4096)
    print(
        "READY " + json.dumps({"orders": f"http://{host}:{server.sockets[0].getsockname()[1]}"}),
        flush=True,
    )
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(0.5)


def spawn_responder(kind):
    """A built-in responder (see responder()) in its own process."""
    command = [sys.executable, os.path.abspath(__file__), "--responder", kind]
    return Target.start(f"{kind} responder", command, timeout_s=10.0)


async def constant_load(url, rate, seconds):
    """Constant-rate open loop against a responder: achieved share, lag p99, CPU per request,
    latencies."""
    parts = urlsplit(url)
    request = build_request("GET", parts.hostname, parts.port, "/")
    n = int(rate * seconds)
    plan = [(i / rate, "get") for i in range(n)]
    attempt = Attempt(parts.hostname, parts.port, request, ignore_answer, False)
    load = Load(plan, lambda kind: Request(kind, [attempt]))
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    await load.drive()
    cpu = time.process_time() - cpu0
    ok = [r for r in load.records if r.outcome == "ok"]
    on_time = sum(1 for r in load.records if r.outcome == "ok" and r.lag <= 0.002)
    return {
        "rate": rate,
        "sent": n,
        "ok": len(ok),
        "on_time_pct": round(100 * on_time / n, 1),
        "ok_pct": round(100 * len(ok) / n, 1),
        "lag_p99_ms": to_ms(percentile([r.lag for r in load.records], 99)),
        "cpu_us_per_request": round(cpu / n * 1e6),
        "wall_s": round(time.monotonic() - wall0, 2),
        "latency_ms": latency_summary([r.latency for r in ok]),
    }


async def calibrate(quick, out):
    """Measure the instrument: max sustainable rate, scheduler lag, and the coordinated-omission
    test."""
    results = {"trivial": await calibrate_rates(quick, out), "stall": None}
    good = [r for r in results["trivial"] if r["ok_pct"] >= 99 and (r["lag_p99_ms"] or 0) <= 2]
    results["max_sustainable_rps"] = max((r["rate"] for r in good), default=0)
    out.write(
        f"   -> sustains {results['max_sustainable_rps']} req/s"
        " with >= 99% of its schedule, lag p99 <= 2 ms\n"
    )
    results["stall"] = await calibrate_stall(out)
    return results


async def calibrate_rates(quick, out):
    """Rising constant rates against the trivial responder, until one is not kept."""
    measured = []
    trivial = spawn_responder("trivial")
    try:
        out.write(
            "Calibrating against a trivial responder (its own process), constant-rate open loop:\n"
        )
        out.write(
            "    rate/s   sent    ok %   within 2 ms of schedule %"
            "   lag p99 ms   CPU µs/req   p99 ms\n"
        )
        for rate in (500, 1000, 2000, 3000, 4000, 5000):
            r = await constant_load(trivial.urls["orders"], rate, 2.0 if quick else 4.0)
            measured.append(r)
            out.write(
                f"   {rate:7d} {r['sent']:6d} {r['ok_pct']:7.1f} {r['on_time_pct']:24.1f} "
                f"{show(r['lag_p99_ms']):>14} {r['cpu_us_per_request']:12d}"
                f" {show(r['latency_ms']['p99']):>8}\n"
            )
            out.flush()
            if r["ok_pct"] < 99 or (r["lag_p99_ms"] or 0) > 2:
                break
    finally:
        await trivial.stop_in_thread()
    return measured


async def calibrate_stall(out):
    """Coordinated omission: does a 1 s stall show up in p99, as it must?"""
    stall = spawn_responder("stall")
    try:
        out.write(
            "\nCoordinated-omission test: 200 req/s against a responder that stalls 1 s every 5 s\n"
        )
        measured = await constant_load(stall.urls["orders"], 200, 10.0)
        latency = measured["latency_ms"]
        out.write(
            f"   p50 {show(latency['p50'])} ms  p90 {show(latency['p90'])} ms"
            f"  p99 {show(latency['p99'])} ms  max {show(latency['max'])} ms"
            "   (truth: 20% of requests wait 0-1 s, so p99 ~950 ms)\n"
        )
        return measured
    finally:
        await stall.stop_in_thread()


async def probe(target, capacity_rps, quick, out, rate_rps=None):
    """A dependency's healthy latency, measured directly: where v0.4's timeouts come from."""
    results = {}
    pay = urlsplit(target.urls["payment"])
    ship = urlsplit(target.urls["shipping"])
    plan, phases = make_plan(
        {"phases": [phase("probe", 10, 4, 0.5)]}, capacity_rps, quick, 3, rate_rps=rate_rps
    )
    refs = iter(range(10**9))

    def call(url, path):
        body = {"order_id": "probe", "amount": 1, "ref": f"probe-{next(refs)}"}
        return url.hostname, url.port, build_request("POST", url.hostname, url.port, path, body)

    load = Load(
        plan, lambda kind: Request(kind, [Attempt(*call(pay, "/charge"), ignore_answer, False)])
    )
    await load.drive()
    results["payment"] = latency_summary([r.latency for r in load.records if r.outcome == "ok"])
    latencies = await one_caller(lambda: call(ship, "/ship"), 300 if quick else 1000)
    results["shipping"] = latency_summary(latencies)
    out.write(f"Healthy latency of {target.name}'s dependencies, called directly (ms):\n")
    out.write(
        f"   payment  POST /charge  open loop at {show(phases[0]['rps'])} req/s"
        f" ({len(load.records)} calls)   "
        + "  ".join(f"{k} {show(v)}" for k, v in results["payment"].items())
        + "\n"
    )
    out.write(
        f"   shipping POST /ship    one caller in sequence ({len(latencies)} calls)   "
        + "  ".join(f"{k} {show(v)}" for k, v in results["shipping"].items())
        + "\n"
    )
    return results


async def one_caller(make_call, calls):
    """Latencies (s) of `calls` requests made one after the other, as the fulfilment worker calls;
    only answers with 200 count."""
    loop = asyncio.get_running_loop()
    latencies = []
    for _ in range(calls):
        start = loop.time()
        status, _ = await round_trip(*make_call(), start + 5)
        if status == 200:
            latencies.append(loop.time() - start)
    return latencies


# === MAIN ===
# Everything a command line can get wrong is refused in parse_args, before a process is started
# or a byte is sent: one line on stderr, exit code 2 (argparse's convention for usage errors).


def check_loopback(url, allow_remote):
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise SystemExit(
            f"refusing to load {host!r}: not a loopback address "
            "(pass --allow-remote if you mean it)"
        )


def url_problem(url):
    """Why `url` cannot be a target URL (one sentence), or None. Only plain http: the engine speaks
    HTTP/1.1 over TCP itself, and an unparsable URL used to surface as a misleading loopback
    refusal."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as err:
        return f"{url!r} is malformed ({err})"
    # '127.0.0.1:8080' parses as a path, 'localhost:8080' as scheme 'localhost'
    if not parts.netloc:
        return f"{url!r} has no http:// in front (did you mean http://{url}?)"
    if parts.scheme != "http":
        return f"{url!r}: only http:// URLs are supported, not {parts.scheme}://"
    if not parts.hostname:
        return f"{url!r} has no host"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to"
    return None


def with_port(url):
    """The URL with its port spelled out (80 by default): the engine connects to
    urlsplit(url).port."""
    parts = urlsplit(url)
    if parts.port is not None:
        return url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts._replace(netloc=f"{host}:80").geturl()


def number_problem(flag, value, limit, unit):
    """Why a --rate/--capacity/--duration value is refused, or None (None: not given)."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:  # nan, inf, 0 and negatives: no load can mean that
        return f"{flag} must be a finite number > 0, not {value:g}"
    if value > limit:
        return f"{flag} {value:g} is over the limit of {limit:,} {unit}"
    return None


def output_problem(flag, path):
    """Why `path` cannot be written (one sentence), or None: found out before the run, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory"
    if not os.path.isdir(folder):
        return f"{flag} {path}: directory {folder} does not exist"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{flag} {path}: file is not writable"
    if not os.path.exists(path) and not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: directory {folder} is not writable"
    return None


def plan_cells(args):
    """What to run: [(version file, or None with --url, [scenario names])]. ValueError says what is
    wrong."""
    if args.url:
        paths = [None]
    else:
        names = (
            [args.target]
            if args.target
            else available_versions()
            if args.compare == "all"
            else [t.strip() for t in args.compare.split(",")]
        )
        paths = []
        # all of them before the first run: a typo in the last must not cost the others
        for name in names:
            path, why = find_version(name)
            if why:
                raise ValueError(why)
            paths.append(path)
    planned = []
    for path in paths:
        if args.scenario:
            scenarios = (
                list(SCENARIOS)
                if args.scenario == "all"
                else [s.strip() for s in args.scenario.split(",")]
            )
        else:
            fixes, breaks = LADDER.get(version_name(path) if path else "", ([], []))
            scenarios = ["steady"] + fixes + breaks
        unknown = [n for n in scenarios if n not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenario {', '.join(unknown)}; see --list")
        planned.append((path, scenarios))
    return planned


def raise_open_files_limit(wanted=OPEN_FILES_WANTED):
    """Raise the soft open-files limit toward `wanted` (the versions it starts inherit it).
    Returns a one-line note when it stays below, else None."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    # RLIM_INFINITY is -1: min() would pick it
    goal = wanted if hard == unlimited else min(hard, wanted)
    if soft != unlimited and soft < goal:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (goal, hard))
            soft = goal
        except (ValueError, OSError):
            pass
    if soft != unlimited and soft < wanted:
        return (
            f"note: open-files limit is {soft} (wanted {wanted}; hard limit "
            f"{'unlimited' if hard == unlimited else hard}): a heavy load may count 'conn' errors "
            "that are this machine's, not the target's"
        )
    return None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong), not the whole usage block above
    it."""

    def error(self, message):
        self.exit(
            2, f"{self.prog}: error: {message}{'' if 'see --' in message else ' (see --help)'}\n"
        )


LIMITS_HELP = (
    "limits, refused before anything starts (exit code 2): "
    f"--rate <= {MAX_RATE_RPS:,} req/s, also at\n"
    f"any phase's peak; --capacity <= {MAX_CAPACITY_RPS:,} req/s; "
    f"--duration <= {MAX_DURATION_S} s; "
    f"<= {MAX_PLANNED_REQUESTS:,} planned requests\nper run; all finite and > 0. A bad --url, "
    "--target, --scenario or --json/--report path too."
)
EXIT_CODES_HELP = (
    "exit codes: 0 the runs completed (with --exit-code: and all passed); 1 a verdict failed\n"
    "(--exit-code); 2 a bad command line, or --json/--report could not be written; 3 a run was\n"
    "untrusted and none failed (--exit-code); 130 interrupted (Ctrl-C, SIGTERM)."
)


def parse_args(argv):
    """The command line, every part of it checked (see refuse_bad_args) before anything starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.responder:
        return args  # a child of --calibrate: its parent checked everything
    if not (args.target or args.compare or args.url or args.list or args.calibrate):
        parser.error("say what to test: --target v0_1 (or --compare, --url, --list, --calibrate)")
    refuse_bad_args(parser, args)
    return args


def build_parser():
    """The options: what to test, then how, then the attach mode's and the hidden ones."""
    versions = ", ".join(available_versions()) or "none found"
    parser = OneLineParser(
        description="The failure-first playground's load tester: "
        "same scenarios, same pass criteria, every version.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"versions here: {versions}\nscenarios: {', '.join(SCENARIOS)}\n{LIMITS_HELP}\n"
        f"{EXIT_CODES_HELP}\n\n" + __doc__.split("\n\n")[-1],
    )
    add_what_options(parser.add_mutually_exclusive_group())
    add_how_options(parser)
    return parser


def add_what_options(what):
    """What to test: one of --target, --compare, --url, --list, --calibrate."""
    what.add_argument(
        "--target",
        help="version to test: v0_3, v0.3, v0_3_backpressure or a file (an exact match); "
        "started on free ports, stopped after",
    )
    what.add_argument(
        "--compare", help="several versions (v0_1,v0_2) or 'all': prints the lesson matrix"
    )
    what.add_argument(
        "--url",
        help="attach to a running orders service (http://127.0.0.1:PORT) instead of "
        "starting one; loopback only, unless --allow-remote",
    )
    what.add_argument(
        "--list", action="store_true", help="list the scenarios with their pass criteria"
    )
    what.add_argument("--calibrate", action="store_true", help="measure the instrument itself")


def add_how_options(parser):
    """How to test it: scenarios, lengths, rates, outputs."""
    parser.add_argument(
        "--scenario", help="NAME[,NAME] or 'all' (default: steady + the version's story)"
    )
    parser.add_argument("--quick", action="store_true", help="short phases (for tests and CI)")
    parser.add_argument(
        "--share-cores",
        action="store_true",
        help="run loadtest on the same cores as the services it starts (by default, on a machine "
        "with two or more, it keeps one core to itself: see what sharing costs at 10 C)",
    )
    add_output_options(parser)
    add_rate_options(parser)


def add_output_options(parser):
    """What is written besides the terminal's report, and what the exit code says."""
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--report", metavar="FILE.html", help="also write a self-contained HTML report (SVG charts)"
    )
    parser.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when any verdict is a fail, 3 when a run was untrusted (the machine was too "
        "busy to measure) and none failed, 0 when all passed. Without it the exit code is 0 "
        "whenever the runs completed: a version's story fails a scenario by design (like k6's "
        "thresholds or Locust's --exit-code-on-error, for CI)",
    )


def add_rate_options(parser):
    """How much load, for how long, from which seed."""
    parser.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="offered requests/s, as vegeta's -rate and wrk2's -R "
        "mean it: steady offers R; a scenario with phases is scaled so its first phase (the load "
        "before the fault, its lowest; --quick may skip it) offers R, the others keep their "
        "ratio to it "
        "(default: loads are multiples of --capacity)",
    )
    parser.add_argument(
        "--capacity",
        type=float,
        metavar="C",
        help="capacity C (req/s) scenario loads are "
        "multiples of and goodput is judged against (default: read from payment's /stats, else "
        f"{DEFAULT_CAPACITY_RPS:g})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds of the fault window (or of the whole steady run)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of arrivals, payloads and chaos (default 1)"
    )
    add_attach_options(parser)


def add_attach_options(parser):
    """The attach mode's URLs, --probe, --allow-remote, and the calibration's hidden child."""
    parser.add_argument(
        "--payment-url", help="with --url: payment simulator, for faults and ground truth"
    )
    parser.add_argument(
        "--shipping-url", help="with --url: shipping simulator, for faults and ground truth"
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="with --target: measure its dependencies' healthy "
        "latency directly (where timeouts come from)",
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --url (never by default)"
    )
    parser.add_argument("--responder", choices=["trivial", "stall"], help=argparse.SUPPRESS)


def refuse_bad_args(parser, args):
    """Every number, file, URL, target and plan size, checked before anything starts."""
    for problem in (
        number_problem("--rate", args.rate, MAX_RATE_RPS, "req/s"),
        number_problem("--capacity", args.capacity, MAX_CAPACITY_RPS, "req/s"),
        number_problem("--duration", args.duration, MAX_DURATION_S, "s"),
        args.json and output_problem("--json", args.json),
        args.report and output_problem("--report", args.report),
    ):
        if problem:
            parser.error(problem)
    if args.probe and not args.target:
        parser.error("--probe needs --target (it starts the version to reach its dependencies)")
    refuse_bad_urls(parser, args)
    if args.list or args.calibrate:
        return
    try:
        planned = plan_cells(args)
    except ValueError as err:
        parser.error(str(err))
    capacity = args.capacity or DEFAULT_CAPACITY_RPS  # C from /stats is checked again once read
    for name in dict.fromkeys(n for _, scenarios in planned for n in scenarios):
        problem = plan_problem(
            name, SCENARIOS[name], capacity, args.quick, args.duration, args.rate
        )
        if problem:
            parser.error(problem)


def refuse_bad_urls(parser, args):
    """--url and the simulators' URLs: well formed, loopback (unless --allow-remote), port
    spelled out."""
    for flag, url in (
        ("--url", args.url),
        ("--payment-url", args.payment_url),
        ("--shipping-url", args.shipping_url),
    ):
        if url is None:
            continue
        if flag != "--url" and not args.url:
            parser.error(f"{flag} only makes sense with --url")
        problem = url_problem(url)
        if problem:
            parser.error(f"{flag} {problem}")
        try:
            check_loopback(url, args.allow_remote)
        except SystemExit as refused:
            parser.error(str(refused))
        setattr(args, flag[2:].replace("-", "_"), with_port(url))


def print_list(out):
    out.write(
        "Scenarios (loads in multiples of capacity C; "
        "phases: full length/with --quick, '-' skipped):\n"
    )
    for name, sc in SCENARIOS.items():
        out.write(f"\n  {name}: {sc['about']}\n    phases: ")
        quick = [f"{p['quick_s']:g}s" if p["quick_s"] else "-" for p in sc["phases"]]
        out.write(
            " -> ".join(
                f"{p['name']} {p['full_s']:g}s/{q} @{p['load']}C"
                + (" [fault]" if p["fault"] else "")
                for p, q in zip(sc["phases"], quick, strict=True)
            )
            + "\n"
        )
        out.write(
            "    pass when: "
            + ", ".join(f"{f} {op} {b}" for f, op, b in sc["checks"])
            + f"   (decisive: {sc['decisive']})\n"
        )
        if "figures" in sc:
            about_figures = " ".join(sc["figures"].split())  # one paragraph, however it is typed
            out.write(
                textwrap.fill(
                    about_figures, 96, initial_indent="    figures: ", subsequent_indent="      "
                )
                + "\n"
            )


class OutputError(Exception):
    """A --json or --report file could not be written (a full disk, say): one line, exit code 2."""


def write_output(flag, path, write):
    """Write a --json or --report file with write(file); OutputError, in one line, if it fails."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            write(f)
    except OSError as err:
        raise OutputError(
            f"{os.path.basename(sys.argv[0]) or 'loadtest.py'}: error: {flag} {path}: "
            f"could not write: {err.strerror or err} (the results are printed above)"
        ) from None


def save_results(args, results, out):
    """--json and --report, once the runs are over."""
    if args.json:
        write_output("--json", args.json, lambda f: json.dump({"runs": results}, f, indent=1))
    if args.report:
        write_report(results, args.report)
        out.write(f"\nreport written to {args.report}\n")


def exit_status(results):
    """--exit-code: 1 when any verdict is a fail, else 3 when a run was untrusted, else 0."""
    verdicts = {result.get("verdict") for result in results}
    if "fail" in verdicts:
        return 1
    if "untrusted" in verdicts:
        return 3
    return 0


def run_responder(kind):
    """--responder: a child of --calibrate, serving until its parent goes or Ctrl-C."""
    try:
        return asyncio.run(responder(kind, "127.0.0.1", 0))
    except KeyboardInterrupt:
        return 0


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    # Ctrl-C is Ctrl-C even when started ignoring SIGINT (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    note = raise_open_files_limit()
    if note and not (args.responder or args.list):  # said once, by the process that drives the load
        sys.stderr.write(note + "\n")
    out = sys.stdout
    try:
        if args.responder:
            return run_responder(args.responder)
        if args.list:
            print_list(out)
            return 0
        # attached (--url), loadtest starts nothing to keep apart from
        starts_services = not (args.share_cores or args.url)
        cores = split_cores() if starts_services else None
        if cores:
            out.write(cores + "\n")
        if cores and not args.calibrate:
            CANARY.start()
        if args.calibrate:
            results = asyncio.run(calibrate(args.quick, out))
            if args.json:
                calibration = {"calibration": results}
                write_output("--json", args.json, lambda f: json.dump(calibration, f, indent=1))
            return 0
        results = asyncio.run(run_all(args, out))
        if not args.probe:
            save_results(args, results, out)
        # Without --exit-code, 0: the run completed and its verdicts are in the output (a naive
        # version is meant to fail its story's scenario).
        return exit_status(results) if args.exit_code else 0
    except OutputError as err:
        out.flush()
        sys.stderr.write(f"{err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: stopping everything this run started\n")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    finally:
        for target in list(RUNNING):
            target.stop()
        CANARY.stop()
        join_cores()


if __name__ == "__main__":
    sys.exit(main())
