"""v1.0 keeps what it acknowledged on disk (SQLite, the transactional outbox): a `kill -9` at any
step of placing an order, then a restart on the same file, ends with exactly one charge and one
order; events waiting to ship survive; a data file orders cannot use is one line and exit code 2.

Payment and shipping run as their own processes (--role), so only orders dies."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import VERSIONS, Service, request, version_id

V1_0 = next(p for p in VERSIONS if version_id(p) == "v1_0")
ORDER = {"item": "book", "qty": 1, "customer": "ada"}


@pytest.fixture(scope="module")
def simulators():
    """Payment and shipping, each in its own process group, for orders to die beside; one pair
    for the module (each test has its own refs), healed before each test."""
    payment = Service(V1_0, "--role", "payment")
    shipping = Service(V1_0, "--role", "shipping")
    try:
        yield {**payment.urls, **shipping.urls}
    finally:
        payment.stop()
        shipping.stop()


@pytest.fixture
def world(simulators):
    for role in ("payment", "shipping"):
        assert request(simulators[role] + "/chaos", "POST", {})[0] == 200
    return simulators


def start_orders(world, data, crash_at=None):
    return Service(
        V1_0,
        "--role",
        "orders",
        "--payment-url",
        world["payment"],
        "--shipping-url",
        world["shipping"],
        "--data",
        data,
        env={"ORDERS_CRASH_AT": crash_at} if crash_at else None,
    )


def post(orders, key, ref):
    try:
        return request(orders.urls["orders"] + "/orders", "POST", dict(ORDER, ref=ref), {"Idempotency-Key": key})
    except OSError:  # the process died under the request
        return 0, {}, None


def counted(world, role, ref):
    status, _, stats = request(world[role] + "/stats?refs=1")
    assert status == 200, stats
    return stats["refs"].get(ref, 0)


def until(condition, timeout_s=10.0):
    """Poll `condition` until it returns something true, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


def died(orders):
    try:
        orders.proc.wait(timeout=10)
    finally:
        orders.stop()
    return orders.proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("step", ["before-charge", "after-charge", "after-commit", "after-ship"])
def test_a_kill_at_any_step_then_a_restart_gives_one_charge_and_one_order(world, tmp_path, step):
    data = str(tmp_path / "orders.sqlite3")
    ref = f"crash-{step}"
    doomed = start_orders(world, data, crash_at=step)
    post(doomed, "k-1", ref)
    assert died(doomed), f"ORDERS_CRASH_AT={step} did not kill orders"
    orders = start_orders(world, data)
    try:
        # the client's retry, same key and body: 409 while recovery finishes it, then the order
        status, _, answer = until(lambda: (lambda a: a if a[0] not in (0, 409) else None)(post(orders, "k-1", ref)))
        assert status == 201, answer
        assert request(orders.urls["orders"] + "/orders/" + answer["order_id"])[0] == 200
        until(lambda: counted(world, "shipping", ref) >= 1)
        assert counted(world, "payment", ref) == 1, "one order, charged once"
        assert counted(world, "shipping", ref) == 1, "one order, shipped once"
    finally:
        orders.stop()


def test_an_order_begun_by_a_dead_process_is_finished_without_its_client(world, tmp_path):
    """No retry comes: recovery asks payment again with the same key and places the order."""
    data = str(tmp_path / "orders.sqlite3")
    doomed = start_orders(world, data, crash_at="after-charge")
    post(doomed, "k-gone", "crash-no-retry")
    assert died(doomed)
    orders = start_orders(world, data)
    try:
        until(lambda: counted(world, "shipping", "crash-no-retry") == 1)
        assert counted(world, "payment", "crash-no-retry") == 1
    finally:
        orders.stop()


def test_events_waiting_to_ship_survive_a_kill(world, tmp_path):
    data = str(tmp_path / "orders.sqlite3")
    assert request(world["shipping"] + "/chaos", "POST", {"down": True})[0] == 200
    orders = start_orders(world, data)
    refs = [f"waiting-{i}" for i in range(5)]
    for ref in refs:
        assert post(orders, ref, ref)[0] == 201
    os.killpg(orders.proc.pid, signal.SIGKILL)
    assert died(orders)
    assert request(world["shipping"] + "/chaos", "POST", {})[0] == 200
    orders = start_orders(world, data)
    try:
        until(lambda: all(counted(world, "shipping", ref) == 1 for ref in refs))
        assert all(counted(world, "payment", ref) == 1 for ref in refs)
    finally:
        orders.stop()


def refused(data, tmp_path):
    """Start orders on `data`: (exit code, what it said on stderr)."""
    proc = subprocess.run(
        [sys.executable, V1_0, "--role", "orders", "--port", "0", "--payment-url", "http://127.0.0.1:9",
         "--shipping-url", "http://127.0.0.1:9", "--data", data],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )
    return proc.returncode, proc.stderr


def test_a_file_that_is_not_a_database_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database, just notes\n" * 100)
    code, said = refused(str(bad), tmp_path)
    assert code == 2 and said.count("\n") == 1 and str(bad) in said and "not a database" in said, said
    assert "Traceback" not in said


def test_a_directory_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    code, said = refused(str(tmp_path / "no" / "such" / "dir.sqlite3"), tmp_path)
    assert code == 2 and said.count("\n") == 1 and "unable to open" in said, said


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only file anyway")
def test_a_read_only_file_is_one_line_and_exit_2(world, tmp_path):
    data = tmp_path / "orders.sqlite3"
    start_orders(world, str(data)).stop()
    data.chmod(0o444)
    code, said = refused(str(data), tmp_path)
    assert code == 2 and said.count("\n") == 1 and "readonly" in said, said


def test_a_file_another_orders_holds_is_one_line_and_exit_2(world, tmp_path):
    data = str(tmp_path / "orders.sqlite3")
    orders = start_orders(world, data)
    try:
        code, said = refused(data, tmp_path)
        assert code == 2 and said.count("\n") == 1 and "another process (another orders?)" in said, said
    finally:
        orders.stop()


def test_a_charge_whose_answer_was_lost_is_finished_by_the_retry(world, tmp_path):
    """Payment too slow to answer in time: 502 or 504, the charge maybe made. That is not final: the
    retry with the same key asks payment again with the same payment key, and gets the order."""
    orders = start_orders(world, str(tmp_path / "orders.sqlite3"))
    try:
        assert request(world["payment"] + "/chaos", "POST", {"latency_factor": 30})[0] == 200
        first = post(orders, "k-slow", "slow-1")
        assert first[0] in (502, 504), first
        assert request(world["payment"] + "/chaos", "POST", {})[0] == 200
        # a client retrying now and then (a 503 too: the breaker opened on the slow calls)
        status, _, answer = until(lambda: (lambda a: a if a[0] < 500 and a[0] not in (0, 409) else
                                           time.sleep(0.2))(post(orders, "k-slow", "slow-1")), 20)
        assert status == 201, answer
        until(lambda: counted(world, "shipping", "slow-1") == 1)
        assert counted(world, "payment", "slow-1") == 1, "asked again with the same key: one charge"
    finally:
        orders.stop()


def test_after_a_graceful_stop_the_file_alone_holds_every_order(world, tmp_path):
    data = tmp_path / "orders.sqlite3"
    orders = start_orders(world, str(data))
    status, _, answer = post(orders, "k-copy", "copy-1")
    assert status == 201, answer
    orders.stop()  # SIGTERM: a graceful stop
    assert not os.path.exists(f"{data}-wal"), "the log is folded into the file"
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(data.read_bytes())  # a backup of PATH alone
    orders = start_orders(world, str(copy))
    try:
        assert request(orders.urls["orders"] + "/orders/" + answer["order_id"])[0] == 200
    finally:
        orders.stop()


@pytest.mark.parametrize("sql", [
    "UPDATE orders SET body = '[1, 2]'",
    "UPDATE orders SET created = 'yesterday'",
    "UPDATE orders SET fields = 'null'",
    "UPDATE outbox SET event = '42'",
], ids=["body not an object", "created not a time", "fields null", "event not an object"])
def test_a_row_orders_did_not_write_is_one_line_and_exit_2(world, tmp_path, sql):
    import sqlite3
    data = tmp_path / "orders.sqlite3"
    assert request(world["shipping"] + "/chaos", "POST", {"down": True})[0] == 200  # an event waits
    orders = start_orders(world, str(data))
    assert post(orders, "k-row", "row-1")[0] == 201
    orders.stop()
    db = sqlite3.connect(data)
    db.execute(sql)
    db.commit()
    db.close()
    code, said = refused(str(data), tmp_path)
    assert code == 2 and said.count("\n") == 1 and "not one we wrote" in said, said


def test_another_programs_database_is_left_alone(tmp_path):
    import sqlite3
    foreign = tmp_path / "app.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    code, said = refused(str(foreign), tmp_path)
    assert code == 2 and said.count("\n") == 1 and "other tables (users)" in said, said
    db = sqlite3.connect(foreign)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "not switched to WAL"
    db.close()


def test_a_scratch_file_does_not_promise_what_it_cannot_keep(world):
    orders = Service(V1_0, "--role", "orders", "--payment-url", world["payment"], "--shipping-url",
                     world["shipping"])  # --port 0 and no --data: a scratch file
    assert request(world["shipping"] + "/chaos", "POST", {"down": True})[0] == 200
    assert post(orders, "k-scratch", "scratch-1")[0] == 201
    os.killpg(orders.proc.pid, signal.SIGTERM)
    orders.proc.wait(timeout=10)
    said = orders.stderr()
    orders.stop()
    assert "lost: their file was a scratch one" in said, said


def test_a_full_disk_is_a_503_for_that_order_and_the_service_goes_on(tmp_path):
    """SQLITE_FULL (here: the file may not grow) while keeping an order: nothing acknowledged, a
    503 to retry, the charged order left for recovery; room again, and it is all kept."""
    from conftest import load_version
    v1 = load_version(V1_0)
    v1.publish = lambda event: None  # no fulfilment thread here
    store = v1.DurableStore(str(tmp_path / "orders.sqlite3"), v1.IdempotencyStore(600, 1000))
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    fields = {"item": "pen", "qty": 1, "customer": "ada", "ref": "full-1"}
    order_id, answer = store.begin("k-full", fields, "ord-full-1")
    assert answer is None
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here
    for size in (200, 1):  # fill what room the pages have left, to the last bytes
        with pytest.raises(v1.sqlite3.Error):
            for n in range(10_000):
                store.write(("INSERT INTO outbox VALUES (?, ?)", (f"fill-{size}-{n}", "x" * size)))
    order = dict(fields, order_id=order_id, amount=150, status="placed")
    with pytest.raises(v1.DependencyError) as refused:
        store.keep(order, {"type": "OrderPlaced", "order_id": order_id, "ref": "full-1"})
    assert refused.value.status == 503 and "could not record" in refused.value.detail
    assert order_id not in v1.ORDERS, "not kept, so not acknowledged"
    store.finish("k-full", fields, order_id, (503, {"error": "payment failed"}, {}))
    assert store.unfinished.get_nowait()[2] == order_id, "charged: left for recovery, not dropped"
    store.db.execute("PRAGMA max_page_count = 1000000")  # room again
    store.keep(order, {"type": "OrderPlaced", "order_id": order_id, "ref": "full-1"})
    assert v1.ORDERS[order_id]["status"] == "placed"
    store.close()


@pytest.mark.parametrize("data", ["", ":memory:"], ids=["empty", "memory"])
def test_a_database_sqlite_would_keep_in_memory_is_refused(tmp_path, data):
    """SQLite opens "" and ":memory:" as databases that die with the process: not --data."""
    code, said = refused(data, tmp_path)
    assert code == 2 and "is not a file's path" in said and "Traceback" not in said, said
