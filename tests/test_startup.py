"""Starting up, as a learner gets it wrong: a port already taken, a port with no room after it,
a piece started alone with nothing to talk to, and the simulators' own HTTP corners."""

import socket
import subprocess
import sys
import time

import pytest
from conftest import VERSIONS, Service, version_id
from test_contract import raw_exchange

PROMPT_S = 5.0  # a start-up that fails must say so well before the 15 s READY wait


def run_briefly(path, *args):
    """Run a version that should refuse to start: (exit code, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, path, *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_a_child_that_cannot_start_is_reported_at_once(path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        payment_port = taken.getsockname()[1]
        code, stderr, seconds = run_briefly(path, "--port", str(payment_port - 1))
    assert code != 0 and "payment did not start" in stderr, stderr[-500:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert seconds < PROMPT_S, f"{seconds:.1f} s to notice that payment exited"


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
@pytest.mark.parametrize(
    "args,says",
    [
        (["--port", "65534"], "payment and shipping take the next two"),
        (["--port", "65535"], "payment and shipping take the next two"),
        (["--role", "orders", "--port", "0"], "give --payment-url and --shipping-url"),
        (["--port", "65536"], "not a port from 0 to 65535"),
    ],
    ids=["65534", "65535", "orders alone on port 0", "65536"],
)
def test_a_start_that_cannot_work_is_refused_in_one_line(path, args, says):
    code, stderr, seconds = run_briefly(path, *args)
    assert code == 2 and says in stderr, stderr[-500:]
    assert "Traceback" not in stderr and seconds < PROMPT_S


@pytest.fixture(scope="module")
def simulators():
    service = Service(VERSIONS[-1])
    try:
        yield service
    finally:
        service.stop()


@pytest.mark.parametrize("role", ["payment", "shipping"])
def test_the_simulators_answer_expect_100_continue_at_once(simulators, role):
    url = simulators.urls[role]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = b"{}"
    head = (
        b"POST /chaos HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(head)
        first = sock.recv(4096)
        waited_s = time.monotonic() - started
        sock.sendall(body)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    assert waited_s < 0.3, f"{role} made the client wait {waited_s:.2f} s for 100 Continue"
    assert (first + rest).count(b"HTTP/1.1 200 ") == 1, first + rest


@pytest.mark.parametrize("role", ["payment", "shipping"])
def test_a_simulator_post_without_content_length_is_411(simulators, role):
    raw = b"POST /chaos HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, body = raw_exchange(simulators.urls[role], raw + b'{"down": true}', timeout_s=5)
    assert status == 411, body
