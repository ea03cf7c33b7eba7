"""Shared helpers: start a version (or loadtest) as a real process, talk HTTP, always clean up."""
import asyncio
import glob
import importlib.util
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `import loadtest`
import loadtest  # noqa: E402  (the instrument's in-process helpers below)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = sorted(glob.glob(os.path.join(ROOT, "v[01]_[0-9]_*.py")))
LOADTEST = os.path.join(ROOT, "loadtest.py")


def version_id(path):
    return os.path.basename(path)[:4]


def load_version(path):
    """Import a version file as a module to test one of its classes (its servers start only under __main__)."""
    spec = importlib.util.spec_from_file_location(f"version_{version_id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def proc_stat(pid):
    """(state, ppid, pgrp) of a process from /proc, or None if it is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def group_members(pgid):
    """The live (not zombie) processes of a process group, "pid [state] command" each. Read here, from /proc,
    not with loadtest's own check: a test must not trust the code it tests. Without /proc: killpg(pgid, 0)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [f"process group {pgid} (no /proc to list it)"]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        stat = proc_stat(pid)
        if stat and stat[2] == pgid and stat[0] != "Z":  # some inits never reap zombies: they are not running
            members.append(f"{pid} [{stat[0]}] {proc_cmdline(pid)}")
    return members


def group_alive(pgid):
    return bool(group_members(pgid))


def read_ready(proc, timeout_s=20.0, seen=None):
    """The URLs of a process's READY line, waited for as a condition with a deadline (never a sleep), or None
    if it exits or the deadline passes first; `seen` collects the other lines, for a failure message."""
    deadline = time.monotonic() + timeout_s
    while select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return json.loads(line[6:])
        if not line:
            return None
        if seen is not None:
            seen.append(line)
    return None


class Service:
    """A version file running as `python vX.py --port 0`, in its own process group."""

    def __init__(self, path, *args, ready_timeout_s=20.0, env=None):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, path, "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=self.log, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.urls = self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s):
        urls = read_ready(self.proc, timeout_s)
        if urls is None:
            self.log.seek(0)
            said = self.log.read()[-2000:]  # before stop(), which closes the log
            self.stop()
            raise AssertionError(f"no READY line; stderr: {said}")
        return urls

    def stderr(self):
        self.log.seek(0)
        return self.log.read()

    def group_alive(self):
        return group_alive(self.proc.pid)

    def wait_group_gone(self, timeout_s=10.0):
        """True once every process of the group has exited (reaping our own child as we go)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.proc.poll()
            if not self.group_alive():
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        """SIGTERM the group, then SIGKILL whatever is left: nothing outlives a test."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            if self.wait_group_gone(5.0):
                break
        self.proc.poll()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


def request(url, method="GET", body=None, headers=None, timeout_s=10.0):
    """One HTTP request; returns (status, headers dict, parsed JSON or raw bytes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), data, headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw
        return resp.status, dict(resp.getheaders()), payload
    finally:
        conn.close()


def run_loadtest(*args, timeout_s=300):
    """Run loadtest.py with --json and return (completed process, parsed JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run([sys.executable, LOADTEST, *args, "--json", out], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        data = json.load(open(out)) if os.path.exists(out) else None
    return proc, data


def versions_from(first):
    """The version files from `first` on: versions_from("v0_5") is every version with idempotency."""
    return [p for p in VERSIONS if version_id(p) >= first]


def service_fixture(paths):
    """A fixture running each of `paths` as a Service for a test, stopped afterwards even if the test fails."""
    @pytest.fixture(params=paths, ids=version_id)
    def running(request):
        service = Service(request.param)
        try:
            yield service
        finally:
            service.stop()
    return running


@pytest.fixture(params=VERSIONS, ids=version_id)
def version_path(request):
    return request.param


@pytest.fixture
def service(version_path):
    svc = Service(version_path)
    try:
        yield svc
    finally:
        svc.stop()


# --- in-process servers and loads for the instrument's tests (loadtest.py imported, not run) ------


class Behaviour(asyncio.Protocol):
    """An HTTP server whose answer time is decided per request by `delay(now)` (seconds, or None: never)."""

    def __init__(self, delay, status=201, body=b'{"order_id": "x"}', heard=None):
        self.delay, self.status, self.body, self.heard = delay, status, body, heard
        self.buf, self.answered, self.transport = b"", False, None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.answered or b"\r\n\r\n" not in self.buf:
            return
        self.answered = True
        if self.heard is not None:  # the request lines this server was sent, in order
            self.heard.append(self.buf.split(b"\r\n", 1)[0].decode())
        loop = asyncio.get_running_loop()
        wait = self.delay(loop.time())
        if wait is None:
            return  # never answer (the client's timeout has to deal with it)
        if wait <= 0:
            self.reply()
        else:
            loop.call_later(wait, self.reply)

    def reply(self):
        if self.transport.is_closing():
            return
        reason = {200: "OK", 201: "Created", 404: "Not Found", 503: "Service Unavailable"}.get(self.status, "X")
        self.transport.write(f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: application/json\r\n"
                             f"Connection: close\r\nContent-Length: {len(self.body)}\r\n\r\n".encode() + self.body)
        self.transport.close()


async def serve(delay, **kw):
    """Start a Behaviour server on 127.0.0.1:0; returns (server, port)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Behaviour(delay, **kw), "127.0.0.1", 0, backlog=1024)
    return server, server.sockets[0].getsockname()[1]


def load_against(delay, plan, serve_kw=None, requester_kw=None, **load_kw):
    """Run a Load over `plan` against a Behaviour server (`delay`, **serve_kw); return the finished Load."""
    async def main():
        server, port = await serve(delay, **(serve_kw or {}))
        try:
            load = loadtest.Load(plan, requester(port, **(requester_kw or {})), **load_kw)
            await load.drive()
            return load
        finally:
            server.close()
    return asyncio.run(main())


def requester(port, attempts=1, retry=False, answers=None):
    """make_request for Load: POST /orders to 127.0.0.1:port, `attempts` attempts."""
    request = loadtest.build_request("POST", "127.0.0.1", port, "/orders", {"item": "book", "qty": 1})

    def on_answer(status, body):
        if answers is not None:
            answers.append((status, body))

    return lambda kind: loadtest.Request(kind, [loadtest.Attempt("127.0.0.1", port, request, on_answer, retry)]
                                         * attempts)


def constant_plan(rate, seconds, kind="post"):
    return [(i / rate, kind) for i in range(int(rate * seconds))]
