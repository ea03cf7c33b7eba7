"""A slow or idle client never holds a worker: the request is read whole before any worker sees
it (nginx does the same). Measured as a learner would try it: a crowd of connections that send
nothing, or trickle their headers, and one normal order in the middle of them."""

import resource
import socket
import time
from urllib.parse import urlsplit

import pytest
from conftest import request, service_fixture, versions_from

READ_FIRST = versions_from("v0_4")  # v0.4: never wait forever, on a client either
ORDER = {"item": "pen", "qty": 1, "customer": "ada"}
PROMPT_S = 0.25  # a normal order's answer, however many others are slow

svc = service_fixture(READ_FIRST)


@pytest.fixture
def many_sockets():
    """Room for a thousand connections in this test process, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    opened = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(svc, opened):
    parts = urlsplit(svc.urls["orders"])
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    opened.append(sock)
    return sock


def timed_order(svc):
    started = time.monotonic()
    status, _, body = request(svc.urls["orders"] + "/orders", "POST", ORDER, timeout_s=5)
    return status, time.monotonic() - started, body


@pytest.mark.parametrize("crowd", [16, 1000], ids=["16 idle", "1000 idle"])
def test_idle_connections_do_not_shut_orders_out(svc, many_sockets, crowd):
    for _ in range(crowd):
        connect(svc, many_sockets)
    status, elapsed_s, body = timed_order(svc)
    assert status == 201, body
    assert elapsed_s < PROMPT_S, f"{crowd} idle connections: a normal order took {elapsed_s:.2f} s"


def test_clients_trickling_headers_do_not_shut_orders_out(svc, many_sockets):
    crowd = [connect(svc, many_sockets) for _ in range(100)]
    for step in range(3):  # a byte each, a few times: every one of them is mid-request
        for sock in crowd:
            sock.sendall(b"POST /orders HTTP/1.1\r\n"[step : step + 1])
    status, elapsed_s, body = timed_order(svc)
    assert status == 201, body
    assert elapsed_s < PROMPT_S, f"100 trickling clients: a normal order took {elapsed_s:.2f} s"
