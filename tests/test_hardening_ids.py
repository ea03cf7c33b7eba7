"""Order ids are unique across restarts of orders, in every version.

payment and shipping run on their own (`--role`) and keep what they hold; orders is killed with
SIGKILL and started again with the same command. Every key derived from an order id (from v0.5 on,
`charge-<id>` and `ship-<id>`) must be new too, or payment answers the new order's charge with
422 (the key was used with another body) and the client gets a 502 for a healthy system.
"""
import os
import signal

import pytest
from conftest import VERSIONS, Service, request, version_id
from test_contract import JSON_HEADERS, order_body, poll, start_role, stop_role

SHIP_TIMEOUT_S = 15.0

# (what happens between the two orders, the second order's body)
CASES = [
    ("SIGKILL and restart, another body", True, order_body(ref="after-restart", item="mug", qty=3)),
    ("SIGKILL and restart, the same body", True, order_body(ref="after-restart")),
    ("no restart, another body", False, order_body(ref="same-process", item="pen", qty=1)),
]


@pytest.mark.parametrize("label, restart, second", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_an_order_after_a_restart_gets_a_new_id_and_is_placed(path, label, restart, second):
    payment, payment_url = start_role(path, "payment")
    shipping, shipping_url = start_role(path, "shipping")
    args = ("--role", "orders", "--payment-url", payment_url, "--shipping-url", shipping_url)
    orders = Service(path, *args)
    try:
        status, _, first = request(orders.urls["orders"] + "/orders", "POST", order_body(ref="before"),
                                   JSON_HEADERS)
        assert status == 201, first
        if restart:
            os.kill(orders.proc.pid, signal.SIGKILL)
            orders.proc.wait(timeout=10)
            orders.stop()
            orders = Service(path, *args)
        status, _, body = request(orders.urls["orders"] + "/orders", "POST", second, JSON_HEADERS)
        assert status == 201, f"{label}: {status} {body}"
        assert body["order_id"] != first["order_id"], (first, body)
        assert body["order_id"].startswith("ord-") and len(body["order_id"]) <= 20, body
        charged = request(payment_url + "/stats?refs=1")[2]
        assert charged["refs"].get(second["ref"]) == 1 and charged["duplicates"] == 0, charged
        poll(lambda: request(shipping_url + "/stats?refs=1")[2],
             lambda s: s.get("refs", {}).get(second["ref"]) == 1, SHIP_TIMEOUT_S, "the second order shipped")
    finally:
        orders.stop()
        stop_role(shipping)
        stop_role(payment)
