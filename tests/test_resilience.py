"""Resilience, from v0.6 on, tested on the pieces themselves: fast, with a fake clock, no version running.

The circuit breaker (v0.7, resilience4j's semantics): it opens at failure_rate of at least min_calls, counts
slow calls (and calls still in flight past slow_call_s) as bad, fails fast for open_s, then lets `probes`
calls decide. The retry budget (v0.6, gRPC retry throttling): a failure costs 1, a success earns
token_ratio, no retries at half empty. The retry policy of call_dependency against a stub dependency on
an ephemeral loopback port: what is retried, how often, with which key, after which pause.
"""
import functools
import json
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import VERSIONS, load_version, version_id

RETRYING = [p for p in VERSIONS if version_id(p) >= "v0_6"]
BREAKING = [p for p in VERSIONS if version_id(p) >= "v0_7"]
PAYLOAD = {"order_id": "ord-000001", "amount": 800, "ref": "res-1"}


@functools.lru_cache(maxsize=None)
def module(path):
    """One import per version: the tests replace what they use (monkeypatch puts it back)."""
    return load_version(path)


class Clock:
    """A fake time.monotonic: moves only when told to."""

    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# === CIRCUIT BREAKER ===


def make_breaker(path, **overrides):
    args = dict(window_calls=10, min_calls=4, failure_rate=0.5, slow_call_s=1.0, open_s=5.0, probes=2)
    args.update(overrides)
    breaker, clock = module(path).CircuitBreaker(**args), Clock()
    breaker.clock = clock
    return breaker, clock


def call(breaker, clock, success=True, duration_s=0.0):
    """One call through the breaker, which must let it through, taking duration_s of fake time."""
    ticket = breaker.allow()
    assert ticket is not None, f"refused in state {breaker.state}"
    clock.advance(duration_s)
    breaker.record(ticket, success)


def trip(breaker, clock):
    """Open a closed breaker with min_calls failures; returns the time it opened."""
    for _ in range(breaker.min_calls):
        call(breaker, clock, success=False)
    assert breaker.state == "open" and breaker.allow() is None
    return clock()


def half_open(breaker, clock):
    """Trip the breaker and wait out open_s: the next allow() is the first probe."""
    trip(breaker, clock)
    clock.advance(breaker.open_s)


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_opens_at_failure_rate_of_at_least_min_calls(path):
    breaker, clock = make_breaker(path)
    for success in (True, False, True):
        call(breaker, clock, success)
    assert breaker.state == "closed", "3 calls are fewer than min_calls: no verdict yet"
    call(breaker, clock, success=False)  # 2 bad of 4 = failure_rate
    assert breaker.state == "open"
    assert breaker.allow() is None


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_stays_closed_below_failure_rate_and_judges_only_the_window(path):
    breaker, clock = make_breaker(path, window_calls=4)
    for success in (False, True, True, True, True, False):  # the window ends True, True, True, False: 1 of 4
        call(breaker, clock, success)
    assert breaker.state == "closed"
    call(breaker, clock, success=False)  # 3 of 7 overall, but 2 of the last 4
    assert breaker.state == "open"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_fewer_than_min_calls_never_open_it(path):
    breaker, clock = make_breaker(path)
    for _ in range(breaker.min_calls - 1):
        call(breaker, clock, success=False)  # 100% failed, but only 3 calls
    assert breaker.state == "closed"
    assert breaker.allow() is not None


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_slow_successes_count_as_bad(path):
    quick, quick_clock = make_breaker(path)
    slow, slow_clock = make_breaker(path)
    for _ in range(4):
        call(quick, quick_clock, success=True, duration_s=0.875)
        call(slow, slow_clock, success=True, duration_s=1.0)  # duration >= slow_call_s: bad though it succeeded
    assert quick.state == "closed"
    assert slow.state == "open" and slow.allow() is None


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_calls_hanging_in_flight_open_it(path):
    """Not one call ends, so nothing is recorded: they count as slow once in flight past slow_call_s."""
    breaker, clock = make_breaker(path)
    hung = [breaker.allow() for _ in range(breaker.min_calls)]
    assert None not in hung
    clock.advance(0.875)
    assert breaker.allow() is not None, "not slow yet"
    clock.advance(0.125)
    assert breaker.allow() is None, "4 calls in flight for slow_call_s: judged at allow() time"
    assert breaker.state == "open"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_open_fails_fast_until_open_s_has_passed(path):
    breaker, clock = make_breaker(path)
    trip(breaker, clock)
    for _ in range(3):
        clock.advance(1.5)  # 4.5 s of the 5 (binary fractions: the fake clock adds up exactly)
        assert breaker.allow() is None
    clock.advance(0.5)
    assert breaker.allow() is not None
    assert breaker.state == "half-open"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_half_open_admits_exactly_probes_calls_while_they_are_in_flight(path):
    breaker, clock = make_breaker(path, probes=3)
    half_open(breaker, clock)
    probes = [breaker.allow() for _ in range(3)]
    assert None not in probes and len(set(map(id, probes))) == 3
    assert breaker.allow() is None, "a 4th call while 3 probes are in flight"
    clock.advance(breaker.open_s - 0.125)
    assert breaker.allow() is None
    assert breaker.state == "half-open"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_all_probes_succeeding_close_it_and_forget_the_outage(path):
    breaker, clock = make_breaker(path)
    half_open(breaker, clock)  # 4 failures in the window
    probes = [breaker.allow(), breaker.allow()]
    clock.advance(0.1)
    breaker.record(probes[0], success=True)
    assert breaker.state == "half-open", "one probe of two is no verdict"
    breaker.record(probes[1], success=True)
    assert breaker.state == "closed"
    for _ in range(breaker.min_calls - 1):  # with the 4 old failures still counted, the first would reopen it
        call(breaker, clock, success=False)
    assert breaker.state == "closed", "closing starts a new window"
    call(breaker, clock, success=False)
    assert breaker.state == "open"


@pytest.mark.parametrize("bad_probe", [dict(success=False, duration_s=0.125), dict(success=True, duration_s=1.0)],
                         ids=["failed", "slow"])
@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_one_bad_probe_opens_it_again(path, bad_probe):
    breaker, clock = make_breaker(path)
    half_open(breaker, clock)
    good, bad = breaker.allow(), breaker.allow()
    clock.advance(0.125)
    breaker.record(good, success=True)
    clock.advance(bad_probe["duration_s"] - 0.125)
    breaker.record(bad, success=bad_probe["success"])
    assert breaker.state == "open"
    assert breaker.allow() is None
    clock.advance(breaker.open_s - 0.125)
    assert breaker.allow() is None, "a fresh open_s from the bad probe"
    clock.advance(0.125)
    assert breaker.allow() is not None and breaker.state == "half-open"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_probes_that_never_end_cannot_hold_it_half_open(path):
    breaker, clock = make_breaker(path)
    half_open(breaker, clock)
    hung = [breaker.allow(), breaker.allow()]  # never recorded
    assert None not in hung
    clock.advance(breaker.open_s - 0.125)
    assert breaker.allow() is None and breaker.state == "half-open"
    clock.advance(0.125)
    assert breaker.allow() is None, "half-open for open_s without a verdict: open again"
    assert breaker.state == "open"
    clock.advance(breaker.open_s - 0.125)
    assert breaker.allow() is None
    clock.advance(0.125)
    probes = [breaker.allow(), breaker.allow()]  # the hung probes no longer take the slots
    assert None not in probes and breaker.state == "half-open"
    assert breaker.allow() is None
    for probe in probes:
        breaker.record(probe, success=True)
    assert breaker.state == "closed"


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_probes_that_arrive_slowly_still_close_it(path):
    """Light traffic: one probe now, the next long after open_s. Half-open waits for its verdict."""
    breaker, clock = make_breaker(path)
    half_open(breaker, clock)
    call(breaker, clock, success=True)
    clock.advance(3 * breaker.open_s)
    call(breaker, clock, success=True)
    assert breaker.state == "closed"


# === RETRY BUDGET ===


@pytest.mark.parametrize("path", RETRYING, ids=version_id)
def test_retry_budget_starts_full_and_is_capped(path):
    budget = module(path).RetryBudget(10, 0.5)
    assert budget.tokens == 10
    assert budget.record(success=True) is True
    assert budget.tokens == 10, "successes never fill it past max_tokens"


@pytest.mark.parametrize("path", RETRYING, ids=version_id)
def test_retry_budget_failures_cost_one_and_successes_earn_token_ratio(path):
    budget = module(path).RetryBudget(10, 0.5)
    for tokens in (9, 8, 7, 6):
        assert budget.record(success=False) is True
        assert budget.tokens == tokens
    assert budget.record(success=False) is False, "5 of 10 tokens is half empty: no retry"
    assert budget.tokens == 5
    assert budget.record(success=True) is True and budget.tokens == pytest.approx(5.5)


@pytest.mark.parametrize("path", RETRYING, ids=version_id)
def test_retry_budget_a_run_of_failures_stops_retries_and_successes_restore_them(path):
    budget = module(path).RetryBudget(10, 0.5)
    allowed = [budget.record(success=False) for _ in range(20)]
    assert allowed == [True] * 4 + [False] * 16
    assert budget.tokens == 0, "never below empty"
    allowed = [budget.record(success=True) for _ in range(11)]  # 11 x 0.5 = 5.5 > 5
    assert allowed == [False] * 10 + [True]


# === RETRY POLICY: call_dependency against a stub dependency ===


class Stub:
    """A dependency on 127.0.0.1: answers POSTs from a script (the last answer repeats), records each call."""

    def __init__(self):
        self.answers = [(200, {})]  # (status, headers)
        self.calls = []  # {"path", "key", "body"}
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub.lock:
                    stub.calls.append({"path": self.path, "key": self.headers.get("Idempotency-Key"),
                                       "body": json.loads(body)})
                    status, headers = stub.answers[min(len(stub.calls), len(stub.answers)) - 1]
                data = json.dumps({"ok": True} if status < 300 else {"error": f"stub {status}"}).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def keys(self):
        return [c["key"] for c in self.calls]


@pytest.fixture
def stub():
    server = Stub()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(5)


def wire(mod, stub, monkeypatch):
    """The version's module wired to the stub, with a fresh retry budget (and breaker), and sleeps recorded.

    Backoff pauses are recorded, not slept (the module's `time` is a stand-in with the real monotonic clock),
    so a Retry-After of seconds costs nothing. Timeout and deadline are roomy so a busy machine is not a 504."""
    pauses = []
    fake_time = types.SimpleNamespace(monotonic=time.monotonic, time=time.time, sleep=pauses.append)
    monkeypatch.setattr(mod, "time", fake_time)
    monkeypatch.setattr(mod, "PAYMENT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(mod, "CALL_DEADLINE_S", 5.0)
    monkeypatch.setitem(mod.DEPENDENCY_URLS, "payment", stub.url)
    monkeypatch.setitem(mod.RETRY_BUDGETS, "payment", mod.RetryBudget(mod.RETRY_TOKENS_MAX, mod.RETRY_TOKEN_RATIO))
    if hasattr(mod, "BREAKERS"):
        monkeypatch.setitem(mod.BREAKERS, "payment", mod.CircuitBreaker(
            mod.BREAKER_WINDOW_CALLS, mod.BREAKER_MIN_CALLS, mod.BREAKER_FAILURE_RATE, mod.BREAKER_SLOW_CALL_S,
            mod.BREAKER_OPEN_S, mod.BREAKER_PROBES))
    return types.SimpleNamespace(mod=mod, stub=stub, pauses=pauses)


@pytest.fixture(params=RETRYING, ids=version_id)
def dep(request, stub, monkeypatch):
    return wire(module(request.param), stub, monkeypatch)


def charge(dep, key="charge-ord-000001"):
    return dep.mod.call_dependency("payment", "/charge", PAYLOAD, idempotency_key=key)


def test_a_400_is_final_not_retried(dep):
    dep.stub.answers = [(400, {})]
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep)
    assert info.value.retryable is False and "400" in info.value.detail
    assert len(dep.stub.calls) == 1 and dep.pauses == []


def test_a_503_is_retried_up_to_max_attempts_with_one_key(dep):
    dep.stub.answers = [(503, {})]
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep, key="charge-ord-000042")
    assert info.value.status == 502 and info.value.retryable is True
    assert len(dep.stub.calls) == 3 and len(dep.pauses) == 2
    assert dep.stub.keys() == ["charge-ord-000042"] * 3, "every attempt carries the same Idempotency-Key"
    assert all(c["path"] == "/charge" and c["body"] == PAYLOAD for c in dep.stub.calls)
    assert all(0 <= p <= dep.mod.BACKOFF_CAP_S for p in dep.pauses)


def test_a_503_then_a_200_succeeds_on_the_second_attempt(dep):
    dep.stub.answers = [(503, {}), (200, {})]
    assert charge(dep) == {"ok": True}
    assert len(dep.stub.calls) == 2
    assert dep.stub.keys()[0] == dep.stub.keys()[1] == "charge-ord-000001"


def test_retry_after_zero_is_read_as_zero_seconds_not_as_no_hint(dep):
    dep.stub.answers = [(503, {"Retry-After": "0"})]
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep)
    assert info.value.retry_after_s == 0  # "retry at once" is a hint too (RFC 9110 section 10.2.3)
    assert len(dep.stub.calls) == dep.mod.MAX_ATTEMPTS, "0 s fits any deadline: every attempt is made"


def test_retry_after_is_the_least_pause(dep):
    dep.stub.answers = [(503, {"Retry-After": "2"}), (200, {})]  # 2 s fits in the 5 s deadline
    assert charge(dep) == {"ok": True}
    assert dep.pauses == [2], "the dependency's hint, not the 0-100 ms jitter"


def test_retry_after_past_the_deadline_stops_retrying(dep):
    dep.stub.answers = [(503, {"Retry-After": "3600"})]
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep)
    assert info.value.retry_after_s == 3600
    assert len(dep.stub.calls) == 1 < dep.mod.MAX_ATTEMPTS and dep.pauses == []


def test_an_empty_retry_budget_stops_retries(dep):
    budget = dep.mod.RETRY_BUDGETS["payment"]
    for _ in range(4):
        budget.record(success=False)  # 6 of 10 tokens: the next failure leaves half
    dep.stub.answers = [(503, {})]
    with pytest.raises(dep.mod.DependencyError):
        charge(dep)
    assert len(dep.stub.calls) == 1


def test_a_call_without_an_idempotency_key_works(dep):
    assert dep.mod.call_dependency("payment", "/charge", PAYLOAD) == {"ok": True}
    assert dep.stub.keys() == [None]


@pytest.mark.parametrize("path", BREAKING, ids=version_id)
def test_an_open_breaker_fails_fast_without_calling(path, stub, monkeypatch):
    dep = wire(module(path), stub, monkeypatch)
    breaker = dep.mod.CircuitBreaker(window_calls=10, min_calls=1, failure_rate=0.5, slow_call_s=10.0, open_s=60.0,
                                     probes=1)
    breaker.record(breaker.allow(), success=False)
    assert breaker.state == "open"
    monkeypatch.setitem(dep.mod.BREAKERS, "payment", breaker)
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep)
    assert info.value.status == 503 and info.value.retryable is False
    assert stub.calls == [], "an open circuit does not even try"


def strict_breaker(dep, monkeypatch, min_calls):
    """Payment's breaker replaced by one that opens after min_calls failures and stays open for a minute."""
    breaker = dep.mod.CircuitBreaker(window_calls=10, min_calls=min_calls, failure_rate=0.5, slow_call_s=10.0,
                                     open_s=60.0, probes=1)
    monkeypatch.setitem(dep.mod.BREAKERS, "payment", breaker)
    return breaker


@pytest.fixture(params=BREAKING, ids=version_id)
def breaking(request, stub, monkeypatch):
    return wire(module(request.param), stub, monkeypatch)


def failed_charge(dep):
    with pytest.raises(dep.mod.DependencyError) as info:
        charge(dep)
    return info.value


def test_failed_attempts_feed_the_breaker(breaking, monkeypatch):
    """A call's three failed attempts open a min_calls=3 breaker; the next call fails fast."""
    breaker = strict_breaker(breaking, monkeypatch, min_calls=3)
    breaking.stub.answers = [(503, {})]
    assert failed_charge(breaking).status == 502 and len(breaking.stub.calls) == 3 and breaker.state == "open"
    second = failed_charge(breaking)
    assert second.status == 503 and second.retryable is False and len(breaking.stub.calls) == 3


def test_a_breaker_that_opens_between_attempts_answers_the_first_error(breaking, monkeypatch):
    """The first try may have committed (an ambiguous failure): its 502 says 'unknown', never a 503 'come later'."""
    breaker = strict_breaker(breaking, monkeypatch, min_calls=1)
    breaking.stub.answers = [(500, {})]
    assert failed_charge(breaking).status == 502 and len(breaking.stub.calls) == 1 and breaker.state == "open"
