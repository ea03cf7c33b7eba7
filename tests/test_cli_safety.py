"""A safe instrument: every bad command line is refused before anything starts, and --rate means
the offered rate (vegeta's -rate, wrk2's -R), --capacity the C that scenario loads are multiples of.

The refusals run loadtest.py as a real process against a fake version file that leaves a marker
if it is ever started, and a listening socket that must never see a connection. The rate tests
call make_plan and run_all in this process, with run_scenario replaced: no server is started.
"""
import asyncio
import io
import math
import os
import socket
import subprocess
import sys

import pytest
from conftest import LOADTEST, ROOT, run_loadtest

sys.path.insert(0, ROOT)
import loadtest  # noqa: E402

FAKE_VERSION = """import os, sys
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "started"), "w").close()
sys.exit(1)
"""


@pytest.fixture
def fake(tmp_path):
    """A version file that only records that it was started; returns (path, marker)."""
    path = tmp_path / "fake_version.py"
    path.write_text(FAKE_VERSION)
    return str(path), tmp_path / "started"


@pytest.fixture
def listener():
    """A loopback port that accepts nothing by itself: any connection to it is a request sent."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def nothing_reached(sock):
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


# (command line, a word the one-line message must contain). {fake}: the fake version; {url}: the listener.
REFUSED = [
    (["--target", "{fake}", "--rate", "nan"], "--rate"),
    (["--target", "{fake}", "--rate", "inf"], "--rate"),
    (["--target", "{fake}", "--rate", "-5"], "--rate"),
    (["--target", "{fake}", "--rate", "0"], "--rate"),  # was silently replaced by the default
    (["--target", "{fake}", "--rate", "1e9"], "limit"),
    (["--target", "{fake}", "--rate", "abc"], "--rate"),
    (["--target", "{fake}", "--capacity", "nan"], "--capacity"),
    (["--target", "{fake}", "--capacity", "0"], "--capacity"),
    (["--target", "{fake}", "--capacity", "-1"], "--capacity"),
    (["--target", "{fake}", "--capacity", "1e5"], "limit"),
    (["--target", "{fake}", "--duration", "nan"], "--duration"),
    (["--target", "{fake}", "--duration", "0"], "--duration"),
    (["--target", "{fake}", "--duration", "-1"], "--duration"),
    (["--target", "{fake}", "--duration", "inf"], "--duration"),
    (["--target", "{fake}", "--duration", "1e4"], "limit"),
    (["--target", "{fake}", "--scenario", "steady", "--rate", "20000", "--duration", "600"], "requests"),
    (["--target", "{fake}", "--scenario", "spike", "--rate", "5000"], "peak"),
    (["--target", "{fake}", "--scenario", "steady", "--rate", "0.01", "--duration", "1"], "too few"),
    (["--target", "{fake}", "--scenario", "steady", "--duration", "1e-9"], "too few"),
    (["--target", "{fake}", "--scenario", "steady", "--rate", "1e-300"], "too few"),
    (["--target", "{fake}", "--scenario", "spike", "--capacity", "10000"], "peak"),
    (["--target", "{fake}", "--scenario", "no-such-thing"], "unknown scenario"),
    (["--target", "{fake}", "--report", "{tmp}/no/such/dir/r.html"], "does not exist"),
    (["--target", "{fake}", "--report", "{tmp}"], "directory"),
    (["--target", "v0"], "v0_1"),  # used to run v0_1 silently: a prefix is not a name
    (["--target", "v0_3_b"], "no version"),
    (["--target", "v9_9"], "v9_9"),
    (["--compare", "{fake},v0_9"], "v0_9"),  # the first target must not run before the typo is found
    (["--compare", "v0_1,"], "no version"),
    (["--url", "http://127.0.0.1:99999"], "99999"),
    (["--url", "http://[::1"], "malformed"),
    (["--url", "127.0.0.1:8080"], "http://"),
    (["--url", "localhost:8080"], "http://"),
    (["--url", "ftp://127.0.0.1/x"], "http://"),
    (["--url", "https://127.0.0.1:8443"], "http://"),
    (["--url", "http://:80"], "host"),
    (["--url", "http://10.1.2.3:8080"], "loopback"),
    (["--url", "{url}", "--payment-url", "http://10.0.0.1:8081"], "loopback"),
    (["--url", "{url}", "--shipping-url", "http://127.0.0.1:0"], "port 0"),
    (["--url", "{url}", "--probe"], "--target"),  # was a traceback
    (["--compare", "{fake},v0_1", "--probe"], "--target"),
    (["--target", "{fake}", "--payment-url", "{url}"], "--url"),
    ([], "--target"),
]


@pytest.mark.parametrize("argv, word", REFUSED, ids=[" ".join(a) or "nothing" for a, _ in REFUSED])
def test_a_bad_command_line_is_refused_before_anything_starts(argv, word, fake, listener, tmp_path):
    path, marker = fake
    sock, url = listener
    argv = [a.format(fake=path, url=url, tmp=tmp_path) for a in argv]
    proc, data = run_loadtest(*argv, timeout_s=20)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert word in lines[0], lines[0]
    assert proc.stdout == "" and data is None
    assert not marker.exists(), "the version was started"
    assert nothing_reached(sock), "a request was sent"


@pytest.mark.parametrize("flag", ["--json", "--report"])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(flag, fake, tmp_path):
    path, marker = fake
    cases = [(str(tmp_path / "missing" / "out"), "does not exist"), (str(tmp_path), "directory")]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((str(locked / "out"), "not writable"))
    for out, word in cases:
        proc = subprocess.run([sys.executable, LOADTEST, "--target", path, flag, out], capture_output=True,
                              text=True, timeout=20, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and word in proc.stderr and flag in proc.stderr
        assert not marker.exists()


# --- what is accepted ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v0_3", "v0.3", "v0_3_backpressure", "v0_3_backpressure.py",
                                  os.path.join(ROOT, "v0_3_backpressure.py")])
def test_a_version_name_matches_exactly_one_file(name):
    path, why = loadtest.find_version(name)
    assert why is None and os.path.basename(path) == "v0_3_backpressure.py"


def test_the_limits_themselves_are_accepted():
    args = loadtest.parse_args(["--target", "v0_1", "--scenario", "steady", "--rate", str(loadtest.MAX_RATE_RPS),
                                "--duration", "50", "--capacity", str(loadtest.MAX_CAPACITY_RPS), "--seed", "-7"])
    assert args.rate == loadtest.MAX_RATE_RPS and args.capacity == loadtest.MAX_CAPACITY_RPS and args.seed == -7
    args = loadtest.parse_args(["--target", "v0_1", "--duration", str(loadtest.MAX_DURATION_S), "--quick"])
    assert args.duration == loadtest.MAX_DURATION_S


def test_a_url_without_a_port_gets_port_80():
    assert loadtest.parse_args(["--url", "http://localhost"]).url == "http://localhost:80"
    assert loadtest.parse_args(["--url", "http://[::1]/"]).url == "http://[::1]:80/"
    assert loadtest.parse_args(["--url", "http://127.0.0.1:8080"]).url == "http://127.0.0.1:8080"


# --- --rate is the offered rate, --capacity the C loads are multiples of ---------------------


def rate_of(plan, start, end):
    return sum(1 for t, _ in plan if start <= t < end) / (end - start)


def test_rate_is_the_offered_rate_of_a_steady_run():
    for capacity in (100, 1000):  # C does not change what --rate offers
        plan, phases = loadtest.make_plan(loadtest.SCENARIOS["steady"], capacity, False, 1, rate_rps=300)
        assert phases[0]["rps"] == 300
        assert abs(rate_of(plan, 0, phases[-1]["end"]) - 300) <= 0.1 * 300


def test_rate_sets_a_scenarios_first_phase_and_keeps_its_shape():
    spike = loadtest.SCENARIOS["spike"]
    plan, phases = loadtest.make_plan(spike, 100, False, 1, rate_rps=300)
    assert [p["rps"] for p in phases] == [300, 300 * 3.0 / 0.5, 300]
    got = rate_of(plan, phases[1]["start"], phases[1]["end"])
    assert abs(got - 1800) <= 0.1 * 1800


@pytest.mark.parametrize("name", ["steady", "spike", "slow-payment"])
def test_capacity_scales_scenario_loads(name):
    scenario = loadtest.SCENARIOS[name]
    for capacity in (100, 250):
        plan, phases = loadtest.make_plan(scenario, capacity, False, 2)
        for ph, spec in zip(phases, scenario["phases"]):
            assert math.isclose(ph["rps"], spec["load"] * capacity)
            if ph["rps"] * (ph["end"] - ph["start"]) >= 1000:  # enough arrivals for the mean to be within 10 %
                assert abs(rate_of(plan, ph["start"], ph["end"]) - ph["rps"]) <= 0.1 * ph["rps"]


@pytest.mark.parametrize("capacity, rate", [(100, -5), (100, math.nan), (100, 1e9), (0, None), (-1, None),
                                            (math.inf, None)])
def test_make_plan_refuses_a_plan_that_would_never_end(capacity, rate):
    with pytest.raises(ValueError):
        loadtest.make_plan(loadtest.SCENARIOS["steady"], capacity, True, 1, rate_rps=rate)


def drive(argv, monkeypatch):
    """run_all for a command line, with run_scenario recording what it was asked: no server, no request."""
    asked = []

    async def fake_run_scenario(target, name, capacity_rps, quick, seed, progress, duration_s=None, rate_rps=None,
                                on_load_done=None):
        plan, phases = loadtest.make_plan(loadtest.SCENARIOS[name], capacity_rps, quick, seed, duration_s, rate_rps)
        asked.append({"capacity": capacity_rps, "rate": rate_rps, "phases": phases})
        return {"verdict": "pass"}

    monkeypatch.setattr(loadtest, "run_scenario", fake_run_scenario)
    monkeypatch.setattr(loadtest, "print_run", lambda result, out: None)
    asyncio.run(loadtest.run_all(loadtest.parse_args(argv), io.StringIO()))
    return asked


def test_cli_rate_reaches_the_plan_as_the_offered_rate(monkeypatch):
    # the report that started this: `--scenario steady --rate 2000` offered 1,000 req/s
    asked = drive(["--url", "http://127.0.0.1:9", "--scenario", "steady", "--rate", "2000"], monkeypatch)
    assert len(asked) == 1 and asked[0]["rate"] == 2000
    assert asked[0]["capacity"] == loadtest.DEFAULT_CAPACITY_RPS  # no payment to ask: C stays the default
    assert asked[0]["phases"][0]["rps"] == 2000


def test_cli_capacity_is_the_c_that_loads_are_multiples_of(monkeypatch):
    asked = drive(["--url", "http://127.0.0.1:9", "--scenario", "steady", "--capacity", "250"], monkeypatch)
    assert asked[0]["capacity"] == 250 and asked[0]["rate"] is None
    assert asked[0]["phases"][0]["rps"] == 0.5 * 250


@pytest.mark.parametrize("stats, want", [({"capacity_rps": 80}, 80), (None, 100), ({}, 100),
                                         ({"capacity_rps": 1e12}, 100), ({"capacity_rps": -3}, 100),
                                         ({"capacity_rps": "lots"}, 100), ({"capacity_rps": True}, 100)])
def test_capacity_read_from_stats_is_only_trusted_within_the_limits(stats, want):
    assert loadtest.capacity_of(stats) == want


# --- the open-files limit ---------------------------------------------------------------------


def test_an_open_files_limit_it_cannot_raise_is_said_in_one_line():
    def lower_the_hard_limit():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run([sys.executable, "-c", "import loadtest; print(loadtest.raise_open_files_limit())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=20, preexec_fn=lower_the_hard_limit)
    assert proc.returncode == 0, proc.stderr
    note = proc.stdout.strip()
    assert len(note.splitlines()) == 1 and "open-files limit is 256" in note and str(loadtest.OPEN_FILES_WANTED) in note
