"""Code a learner can read: the front door reads as the order system first, the HTTP corners sit
behind one named piece of protocol plumbing (the same in every version), the routes are in one
table, and every number we are sent goes through one digit parser."""
import contextlib
import io
import re

import pytest
from conftest import VERSIONS, load_version, version_id
from test_diff_discipline import sections

FRONT_DOOR = "HTTP FRONT DOOR"
# what makes http.server's corners hard to read; none of it belongs in the order-facing class
CORNERS = ["HTTP/0.9", "raw_requestline", "defects", "__getattr__", "isdigit", "send_error", "read_body(self)"]


def plumbing(path):
    """The protocol plumbing and its helpers: from `class HTTPPlumbing` to `class OrdersHandler`."""
    text = sections(path)[FRONT_DOOR]
    start = text.find("class HTTPPlumbing(")
    end = text.find("class OrdersHandler(")
    assert 0 <= start < end, f"{path}: no HTTPPlumbing class before OrdersHandler"
    return text[start:end]


def test_the_plumbing_is_the_same_in_every_version():
    first = plumbing(VERSIONS[0])
    for path in VERSIONS[1:]:
        assert plumbing(path) == first, f"the plumbing differs in {path}: diff it against {VERSIONS[0]}"


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_the_front_door_reads_as_the_order_system_first(path):
    text = sections(path)[FRONT_DOOR]
    api = text[text.find("class OrdersAPI"):text.find("class HTTPPlumbing(")]
    assert 0 < text.find("class OrdersAPI") < text.find("class HTTPPlumbing("), "the orders API comes first"
    assert [word for word in CORNERS if word in api] == []
    assert "def do_GET" in api and "def do_POST" in api


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_one_digit_parser(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    uses = [n for n, line in enumerate(lines, 1) if ".isdigit()" in line and "def parse_digits" not in line
            and "text.isdigit()" not in line and not line.strip().startswith(("str.isdigit", '"""', "#"))]
    assert uses == [], f"{path}: digits checked outside parse_digits on lines {uses}"


# (text, max_digits, the number or None for ValueError)
DIGITS = [("0", 1, 0), ("42", 2, 42), ("0042", 4, 42), ("65533", 5, 65533),
          ("", 5, None), (" 5", 5, None), ("5 ", 5, None), ("+5", 5, None), ("-1", 5, None), ("5_0", 5, None),
          ("\u00b2", 5, None), ("\u0665", 5, None), ("5, 6", 5, None), ("1" * 6, 5, None), ("1" * 5000, 20, None),
          ("1.5", 5, None), ("0x10", 5, None)]


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_parse_digits(path):
    module = load_version(path)
    problems = []
    for text, max_digits, want in DIGITS:
        try:
            got = module.parse_digits(text, max_digits)
        except ValueError:
            got = None
        if got != want:
            problems.append(f"parse_digits({text[:10]!r}, {max_digits}) = {got!r}, expected {want!r}")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_the_banner_lists_every_route_in_the_table(path):
    module = load_version(path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.announce({"orders": "http://o", "payment": "http://p", "shipping": "http://s"})
    banner = out.getvalue()
    assert module.ROUTES and all(f"{method} {route}" in banner for route, method in module.ROUTES.items()), banner
    assert ("/metrics" in module.ROUTES) == (version_id(path) >= "v0_8")
    # the table is the only place a route is spelled out in the front door, its dispatch aside
    text = sections(path)[FRONT_DOOR]
    table = re.search(r"^ROUTES = .*$", text, re.M).group(0)
    spelled = [m for m in re.findall(r'"(/[a-z]+[^"]*)"', text.replace(table, "")) if m in module.ROUTES]
    allowed = {f'route == "{r}"' for r in module.ROUTES} | {'route_of(self.path) != "/orders"'}
    stray = [r for r in set(spelled) if not any(a in text for a in allowed if r in a)]
    assert stray == [], stray
