"""Where a version listens, in every version: loopback unless told otherwise, IPv6 loopback too.

/chaos and /stats have no authentication, so `--host 0.0.0.0` used to expose them on every
interface silently: a non-loopback address is now refused before anything starts, unless
`--allow-remote` is given, and then one warning line says what is exposed. `--host ::1` used to
fail after starting the children (orders bound IPv4 only): all three processes serve on it, and
the URLs print the address in brackets.
"""
import socket
import subprocess
import sys

import pytest
from conftest import VERSIONS, Service, request, version_id
from test_contract import JSON_HEADERS, SHIP_TIMEOUT_S, order_body, poll


def can_bind(host):
    """False where this machine has no such loopback address (no IPv6; macOS has 127.0.0.1 only)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
        return True
    except OSError:
        return False


def run(path, *args):
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)


# (label, command line): each is refused with a usage error, before anything starts
REFUSED = [
    ("every IPv4 interface", ["--host", "0.0.0.0"]),
    ("every IPv6 interface", ["--host", "::"]),
    ("an empty host binds every interface", ["--host", ""]),
    ("0 is 0.0.0.0", ["--host", "0"]),
    ("a LAN address", ["--host", "10.1.2.3"]),
    ("a name that resolves to nothing", ["--host", "no.such.host.invalid"]),
    ("payment alone", ["--role", "payment", "--host", "0.0.0.0"]),
    ("shipping alone", ["--role", "shipping", "--host", "::"]),
    ("orders alone", ["--role", "orders", "--host", "0.0.0.0"]),
]


@pytest.mark.parametrize("label, argv", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("path", [VERSIONS[0], VERSIONS[-1]], ids=version_id)
def test_a_non_loopback_host_is_refused_before_anything_starts(path, label, argv):
    proc = run(path, "--port", "0", *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--allow-remote" in proc.stderr.strip().splitlines()[-1] and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_allow_remote_warns_in_one_line_what_is_exposed(path):
    """orders alone on 0.0.0.0 at a port the test holds on 127.0.0.1: the warning comes first,
    then the bind fails, so nothing ever listens on every interface."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = run(path, "--role", "orders", "--host", "0.0.0.0", "--allow-remote", "--port", str(port),
                   "--payment-url", "http://127.0.0.1:9", "--shipping-url", "http://127.0.0.1:9")
    lines = proc.stderr.strip().splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "/chaos" in warnings[0], proc.stderr
    assert proc.returncode == 1 and "in use" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr


# (host, the host as URLs print it)
LOOPBACK = [("::1", "[::1]"), ("localhost", "localhost"), ("127.0.0.2", "127.0.0.2")]


@pytest.mark.parametrize("host, in_url", LOOPBACK, ids=[h for h, _ in LOOPBACK])
@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_a_loopback_host_serves_all_three(path, host, in_url):
    if host != "localhost" and not can_bind(host):
        pytest.skip(f"no {host} on this machine")
    svc = Service(path, "--host", host)
    try:
        for role, url in svc.urls.items():
            assert url.startswith(f"http://{in_url}:"), (role, url)
        status, _, body = request(svc.urls["orders"] + "/orders", "POST", order_body(ref=f"bind-{host}"),
                                  JSON_HEADERS)
        assert status == 201, body
        assert "warning" not in svc.stderr(), svc.stderr()
        poll(lambda: request(svc.urls["shipping"] + "/stats?refs=1")[2],
             lambda s: s.get("refs", {}).get(f"bind-{host}") == 1, SHIP_TIMEOUT_S, "the order shipped")
    finally:
        svc.stop()
