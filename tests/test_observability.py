"""v0.8 on its own terms, beyond /metrics (tests/test_prometheus.py): request ids and logs that never hurt.

A request id is echoed and logged; a client's sane X-Request-Id is kept, an odd one replaced; and a stderr
that nobody reads (a pipe left full) costs log lines, never the service.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_ready, request, service_fixture, version_id, versions_from

OBSERVED = versions_from("v0_8")


svc = service_fixture(OBSERVED)


def test_request_ids_are_echoed_and_logged(svc):
    status, headers, _ = request(svc.urls["orders"] + "/orders", "POST", {"item": "pen", "qty": 0, "customer": "x"},
                                 {"X-Request-Id": "find-me-42"})
    assert status == 400 and headers["X-Request-Id"] == "find-me-42"
    status, headers, _ = request(svc.urls["orders"] + "/nope", "GET", None, {"X-Request-Id": "x" * 65})
    assert status == 404 and len(headers["X-Request-Id"]) == 16, "an odd id is replaced by a fresh one"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "find-me-42" not in svc.stderr():
        time.sleep(0.05)
    lines = [json.loads(line) for line in svc.stderr().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("request_id") == "find-me-42"]
    assert failed and failed[0]["event"] == "request failed" and failed[0]["status"] == 400, lines


@pytest.mark.parametrize("path", OBSERVED, ids=version_id)
def test_a_stderr_nobody_reads_never_stops_the_service(path):
    """Fill the stderr pipe (64 KiB) with failed-request log lines and never read it: still serving."""
    proc = subprocess.Popen([sys.executable, path, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        urls = read_ready(proc, 20)
        assert urls, "no READY line"
        orders = urls["orders"]
        for i in range(800):  # ~150 bytes of log each: about twice what the pipe holds
            assert request(orders + f"/no-such-path-{i}", timeout_s=5)[0] == 404
        assert request(orders + "/health", timeout_s=5)[0] == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
