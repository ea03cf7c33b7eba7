"""A hostile or broken target must not fool or sink the instrument; a full disk must not hide a run;
the exit status says what CI needs to know when asked (--exit-code), and 0 otherwise.

Every server here is an asyncio server on 127.0.0.1 in a thread of this process; loadtest runs
in this process (the engine) or as a child attached to it with --url (nothing else is started).
"""
import asyncio
import contextlib
import io
import os
import resource
import subprocess
import sys
import threading

import pytest
from conftest import LOADTEST, constant_plan, requester

import loadtest

HUNDRED_MB = 100 * 1024 * 1024


def answer_with(data):
    """An answer: these bytes, then the connection closes."""
    async def answer(writer):
        writer.write(data)
        await writer.drain()
    return answer


def endless(first, chunk, limit=HUNDRED_MB):
    """An answer that starts with `first` and goes on with `chunk` until `limit` bytes or the client leaves."""
    async def answer(writer):
        writer.write(first)
        sent = len(first)
        while sent < limit:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
    return answer


@contextlib.contextmanager
def server_in_thread(answer):
    """An HTTP server on 127.0.0.1 in a thread and event loop of its own that reads each request (head and
    body) and then sends answer(writer); yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            await reader.readexactly(length[0] if length else 0)
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what a hostile server shrugs off
        finally:
            writer.close()

    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0, backlog=512),
                                              loop).result(10)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def drive(url, plan, client_timeout_s=5.0):
    """The engine in this process: a Load over `plan` against `url`; its records."""
    port = int(url.rsplit(":", 1)[1])

    async def main():
        load = loadtest.Load(plan, requester(port), client_timeout_s=client_timeout_s)
        await load.drive()
        return load.records

    return asyncio.run(main())


HOSTILE = {
    "Content-Length abc": answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}"),
    "Content-Length -5": answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n{}"),
    "two Content-Lengths": answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    "no status line": answer_with(b"hello there\r\nContent-Length: 2\r\n\r\n{}"),
    "status 999": answer_with(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}"),
    "head cut short": answer_with(b"HTTP/1.1 201 Created\r\nContent-Len"),
    "body cut short": answer_with(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{}"),
    "endless headers": endless(b"HTTP/1.1 200 OK\r\n", b"X-Junk: " + b"y" * 1000 + b"\r\n"),
    "100 MB body": endless(b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n", b"x" * 65536),
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_malformed_answer_is_a_bad_answer_never_ok(answer):
    with server_in_thread(answer) as url:
        records = drive(url, constant_plan(50, 0.2))
    assert len(records) == 10
    assert {(r.outcome, r.status) for r in records} == {("bad answer", 0)}, records[:3]
    assert max(r.latency for r in records) < 2.0, "read to the end of a 100 MB answer, or waited for it"


@pytest.mark.parametrize("data", [b"HTTP/1.0 201 Created\r\n\r\n{}", b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
                                  b"HTTP/1.1 201\r\ncontent-length:  2 \r\n\r\n{}"],
                         ids=["no Content-Length: body ends at close", "Content-Length", "no reason, spaces"])
def test_a_well_formed_answer_is_still_read(data):
    with server_in_thread(answer_with(data)) as url:
        records = drive(url, constant_plan(50, 0.1))
    assert {(r.outcome, r.status) for r in records} == {("ok", 201)}


def test_bad_answers_fail_the_run_with_their_count_whatever_the_checks_say():
    figures = {"error_pct": 0.0, "p99_ms": 5.0, "bad_answers": 7, "schedule_lag_p99_ms": 1.0}
    verdict, reasons = loadtest.decide(loadtest.SCENARIOS["steady"], figures, [])
    assert verdict == "fail" and reasons[0].startswith("7 bad answers"), reasons
    assert loadtest.decide(loadtest.SCENARIOS["steady"], dict(figures, bad_answers=0), [])[0] == "pass"


MEASURED = """import resource, runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stderr.write("maxrss_kib %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_server_of_100_mb_answers_cannot_sink_loadtest():
    """Against answers of 100 MB each, loadtest stays small, prints no traceback, and fails the run saying how
    many answers were bad (with --exit-code: exit status 1)."""
    answer = endless(b"HTTP/1.1 201 Created\r\nContent-Length: 104857600\r\n\r\n", b"x" * 65536)
    with server_in_thread(answer) as url:
        proc = subprocess.run([sys.executable, "-c", MEASURED, LOADTEST, "--url", url, "--scenario", "steady",
                               "--quick", "--duration", "2", "--exit-code"],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "bad answer" in proc.stdout and "FAIL:" in proc.stdout and "bad answers" in proc.stdout, proc.stdout
    maxrss_mb = int(proc.stderr.rsplit("maxrss_kib ", 1)[1].split()[0]) / 1024
    assert maxrss_mb < 150, f"loadtest grew to {maxrss_mb:.0f} MB"


# --- a full disk -------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("flag", ["--json", "--report"])
def test_a_full_disk_is_one_line_and_exit_code_2_after_the_run_is_printed(flag):
    with server_in_thread(answer_with(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")) as url:
        proc = subprocess.run([sys.executable, LOADTEST, "--url", url, "--scenario", "steady", "--quick",
                               "--duration", "1", flag, "/dev/full"],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{flag} /dev/full" in lines[0] and "No space left" in lines[0], lines[0]
    assert "== " in proc.stdout and "PASS:" in proc.stdout, "the run's own output must stay printed"
    assert "report written" not in proc.stdout


# --- the exit status ---------------------------------------------------------------------------


@pytest.mark.parametrize("verdicts, status", [(["pass", "pass"], 0), (["pass", "fail"], 1), (["untrusted", "pass"], 3),
                                              (["untrusted", "fail"], 1), ([], 0)])
def test_exit_code_says_fail_then_untrusted(verdicts, status):
    assert loadtest.exit_status([{"verdict": v} for v in verdicts]) == status


@pytest.mark.parametrize("exit_code", [False, True])
@pytest.mark.parametrize("verdict", ["pass", "fail", "untrusted"])
def test_the_exit_status_is_0_unless_asked(verdict, exit_code, monkeypatch):
    """Without --exit-code a completed run exits 0 whatever its verdicts (a story run fails by design)."""
    async def fake_run_all(args, out):
        return [{"verdict": verdict}]

    monkeypatch.setattr(loadtest, "run_all", fake_run_all)
    monkeypatch.setattr(loadtest.signal, "signal", lambda *a: None)  # leave pytest's own handlers alone
    argv = ["--url", "http://127.0.0.1:9", "--scenario", "steady"] + (["--exit-code"] if exit_code else [])
    want = {"pass": 0, "fail": 1, "untrusted": 3}[verdict] if exit_code else 0
    assert loadtest.main(argv) == want


def test_a_failing_target_exits_1_with_exit_code_and_0_without():
    with server_in_thread(answer_with(b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}")) as url:
        for extra, status in (([], 0), (["--exit-code"], 1)):
            proc = subprocess.run([sys.executable, LOADTEST, "--url", url, "--scenario", "steady", "--quick",
                                   "--duration", "1", *extra],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert proc.returncode == status and "FAIL:" in proc.stdout, (extra, proc.returncode, proc.stderr)


def test_help_documents_the_exit_codes():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        loadtest.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--exit-code" in text and "exit 1 when any verdict is a fail" in text
    assert "3 a run was untrusted" in text and "130 interrupted" in text


def test_maxrss_is_measured_in_kib():
    """The RSS test reads ru_maxrss as KiB, as Linux reports it (macOS would say bytes)."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 10 * 1024 * 1024


def test_the_instruments_own_reads_are_not_held_to_the_loads_cap():
    """Ground truth (/stats?refs=1 grows with the run) and /metrics are larger than an order's answer: the
    load's 16 KiB cap made every run's ground truth n/a. The instrument's reads have their own, larger cap."""
    body = b'{"refs": {' + b", ".join(b'"run-%d": 1' % i for i in range(20000)) + b"}}"
    assert len(body) > 10 * loadtest.MAX_ANSWER_BYTES
    answer = answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    with server_in_thread(answer) as url:
        status, obj = asyncio.run(loadtest.fetch_json(url + "/stats?refs=1"))
        assert status == 200 and len(obj["refs"]) == 20000
        records = drive(url, constant_plan(50, 0.1))
        assert {r.outcome for r in records} == {"bad answer"}, "an order's answer that big is still a bad one"
        with pytest.raises(loadtest.BadAnswer):
            asyncio.run(loadtest.fetch_json(url + "/stats?refs=1", max_bytes=64 * 1024))


def test_a_connection_closed_without_a_byte_is_no_answer_not_a_bad_one():
    """A process killed between accept and answer closes its connections: nothing was said, so
    nothing broke HTTP (crash kills orders on purpose; a bad answer would fail any run)."""
    with server_in_thread(answer_with(b"")) as url:
        records = drive(url, constant_plan(50, 0.1))
    assert {(r.outcome, r.status) for r in records} == {("conn", 0)}, records[:3]
