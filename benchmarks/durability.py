"""What keeping orders on disk costs v1.0: CPU per order and commit latency, with and without it.

    python benchmarks/durability.py                 # 3,000 orders each way
    python benchmarks/durability.py --orders 500    # quicker

Each order goes through the steps v1.0 takes to keep it, without HTTP, payment or shipping (they
cost the same either way): reserve its key, keep the order and its event, remember the answer,
mark it shipped. "memory" is what v0.8 does (MemoryStore and IdempotencyStore, in memory);
"SQLite" is v1.0's DurableStore on a file in a fresh temporary directory (WAL, synchronous
NORMAL): three commits an order. It prints the CPU each order costs and the p50/p99/max of each
step. A benchmark reports; it passes or fails nothing.
"""

import argparse
import importlib.util
import os
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
V1_0 = os.path.join(HERE, os.pardir, "v1_0_composed.py")
STEPS = ("begin", "keep", "finish", "ship")


def load_v1_0():
    spec = importlib.util.spec_from_file_location("v1_0_composed", V1_0)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.publish = lambda event: None  # no fulfilment thread here: the event is not shipped
    return module


def in_memory(v1, keys):
    """v0.8's way, with v1.0's interface: the key in memory, the order in ORDERS."""
    memory = v1.MemoryStore()

    class Memory:
        def begin(self, key, fields, order_id):
            return order_id, keys.begin(key, fields)

        def keep(self, order, event):
            memory.keep(order, event)

        def finish(self, key, fields, order_id, answer):
            keys.finish(key, answer)

        def mark_shipped(self, order_id):
            memory.mark_shipped(order_id)

    return Memory()


def measure(v1, store, orders):
    """Place `orders` orders through `store`: (CPU µs an order, {step: sorted seconds})."""
    took = {step: [] for step in STEPS}
    cpu_started = time.process_time()
    for n in range(orders):
        fields = {"item": "book", "qty": 1, "customer": "bench", "ref": f"bench-{n}"}
        order_id = f"ord-bench-{n:06d}"
        order = dict(fields, order_id=order_id, amount=1200, status="placed")
        event = {"type": "OrderPlaced", "order_id": order_id, "ref": fields["ref"]}
        key = f"key-{n}"
        steps = (
            ("begin", store.begin, (key, fields, order_id)),
            ("keep", store.keep, (order, event)),
            ("finish", store.finish, (key, fields, order_id, v1.placed_answer(order))),
            ("ship", store.mark_shipped, (order_id,)),
        )
        for step, do, arguments in steps:
            started = time.perf_counter()
            do(*arguments)
            took[step].append(time.perf_counter() - started)
    cpu_us = (time.process_time() - cpu_started) / orders * 1e6
    return cpu_us, {step: sorted(seconds) for step, seconds in took.items()}


def quantile_us(ordered, q):
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000, help="orders each way (default 3000)")
    args = parser.parse_args()
    if not 10 <= args.orders <= 100_000:
        parser.error("--orders: from 10 to 100000")
    v1 = load_v1_0()
    with tempfile.TemporaryDirectory(prefix="durability-") as scratch:
        keys = v1.IdempotencyStore(v1.IDEMPOTENCY_TTL_S, v1.IDEMPOTENCY_KEYS_MAX)
        memory = measure(v1, in_memory(v1, keys), args.orders)
        keys = v1.IdempotencyStore(v1.IDEMPOTENCY_TTL_S, v1.IDEMPOTENCY_KEYS_MAX)
        store = v1.DurableStore(os.path.join(scratch, "orders.sqlite3"), keys)
        on_disk = measure(v1, store, args.orders)
        store.close()
    print(f"{args.orders:,} orders each way, one thread (python benchmarks/durability.py):")
    print(
        f"  {'kept':8s} {'CPU/order':>10s}   "
        + "   ".join(f"{s + ' p50/p99/max µs':>24s}" for s in STEPS)
    )
    for name, (cpu_us, took) in (("memory", memory), ("SQLite", on_disk)):
        cells = [
            "/".join(f"{quantile_us(took[step], q):.0f}" for q in (0.5, 0.99, 1.0))
            for step in STEPS
        ]
        print(f"  {name:8s} {cpu_us:8.0f} µs   " + "   ".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
