"""A model of v1.0's concurrency limit in front of payment, in simulated time: no sockets, no
threads, the same answer on any machine in a few seconds.

    python benchmarks/limit_sim.py                   # v1_0_composed.py's GradientLimit
    python benchmarks/limit_sim.py --target my_v1_0.py --seeds 8

Orders arrive as a Poisson process at a multiple of C; each takes a place under the limit (or is
refused at once), spends PRE_S in orders, calls payment (a FIFO in front of `workers` slots of
40 ms x latency factor, as the simulator in the version files), and PAYMENT_TIMEOUT_S after the
call gives up on it (payment finishes the work anyway); then POST_S more in orders and its place
is freed. The limit sees every call's latency, a timed-out one as the timeout, plus NOISE: 10 %
of the calls look up to 20 ms slower, a slow moment of orders' own CPU. What it leaves out: the
interpreter, retries, the breaker, shipping. It is a model to reason with; the scenarios in
loadtest.py are the measurement.
"""

import argparse
import heapq
import importlib.util
import os
import random
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE_S = 0.003  # orders' own work before the charge...
POST_S = 0.005  # ...and after it (the store, the event)
NOISE_SHARE = 0.1
NOISE_MAX_S = 0.020

# name -> phases: (seconds, load in C, payment's workers, latency factor, label)
SCENARIOS = {
    "0.8 C": [(30, 0.8, 4, 1, "0.8 C")],
    "overload": [(5, 0.5, 4, 1, "0.5 C"), (10, 3, 4, 1, "3 C"), (10, 10, 4, 1, "10 C")],
    "capacity-drop": [
        (5, 0.8, 4, 1, "before"),
        (1, 0.8, 2, 1, "drop 1st s"),
        (9, 0.8, 2, 1, "half"),
        (3, 0.8, 4, 1, "back 3 s"),
        (5, 0.8, 4, 1, "after"),
    ],
    "slower": [(3, 0.5, 4, 1, "x1")]
    + [(2, 0.5, 4, f, f"x{f}") for f in (1.25, 1.5, 1.75, 2.0)],
}


def load_version(path):
    spec = importlib.util.spec_from_file_location("version", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_limit(version):
    return version.GradientLimit(
        version.LIMIT_INITIAL,
        version.LIMIT_MIN,
        version.LIMIT_MAX,
        version.LIMIT_TOLERANCE,
        version.LIMIT_HEADROOM,
        version.LIMIT_NO_LOAD_CREEP,
    )


class Model:
    """One run of the model: events on a heap, in simulated seconds."""

    def __init__(self, version, phases, seed):
        self.rng = random.Random(seed)
        self.limit = new_limit(version)
        self.timeout_s = version.PAYMENT_TIMEOUT_S
        self.service_s = version.PAYMENT_SERVICE_MS / 1000
        self.events = []
        self.count = 0
        self.workers = 4
        self.factor = 1.0
        self.busy = 0
        self.waiting = []
        self.orders = {}
        self.current = None  # the phase's label
        self.stats = {}
        start = 0.0
        for seconds, load, workers, factor, label in phases:
            self.at(start, "phase", (workers, factor, label))
            self.stats[label] = {"seconds": seconds, "ok": [], "shed": 0, "sent": 0, "504": 0}
            t = start
            while True:
                t += self.rng.expovariate(100 * load)
                if t >= start + seconds:
                    break
                self.at(t, "arrive", None)
            start += seconds

    def at(self, t, kind, data):
        self.count += 1
        heapq.heappush(self.events, (t, self.count, kind, data))

    def run(self):
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            getattr(self, kind)(now, data)
        return self.stats

    def serve_next(self, now):
        while self.busy < self.workers and self.waiting:
            self.busy += 1
            self.at(now + self.service_s * self.factor, "served", self.waiting.pop(0))

    def phase(self, now, data):
        self.workers, self.factor, self.current = data
        self.serve_next(now)

    def arrive(self, now, _):
        stats = self.stats[self.current]
        stats["sent"] += 1
        if not self.limit.try_acquire():
            stats["shed"] += 1
            return
        order = len(self.orders)
        self.orders[order] = {"sent": now, "phase": self.current, "over": False}
        self.at(now + PRE_S, "call", order)

    def call(self, now, order):
        self.orders[order]["called"] = now
        self.at(now + self.timeout_s, "timeout", order)
        self.waiting.append(order)
        self.serve_next(now)

    def served(self, now, order):
        self.busy -= 1
        self.serve_next(now)
        state = self.orders[order]
        if state["over"]:
            return  # its caller gave up: zombie work
        state["over"] = True
        self.limit.observe(now - state["called"] + self.noise())
        self.at(now + POST_S, "done", order)

    def timeout(self, now, order):
        state = self.orders[order]
        if state["over"]:
            return
        state["over"] = True
        self.stats[state["phase"]]["504"] += 1
        self.limit.observe(self.timeout_s, answered=False)
        self.limit.release()

    def done(self, now, order):
        state = self.orders[order]
        self.limit.release()
        self.stats[state["phase"]]["ok"].append(now - state["sent"])

    def noise(self):
        extra = self.rng.uniform(0, NOISE_MAX_S) if self.rng.random() < NOISE_SHARE else 0
        return self.rng.uniform(0.0005, 0.002) + extra


def p99_ms(latencies):
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99)] * 1000 if ordered else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.path.join(ROOT, "v1_0_composed.py"))
    parser.add_argument("--seeds", type=int, default=5, help="runs of each scenario (5)")
    args = parser.parse_args()
    version = load_version(args.target)
    print(f"{os.path.basename(args.target)}, {args.seeds} seeds: min-max over the seeds")
    for name, phases in SCENARIOS.items():
        print(f"== {name}")
        runs = [Model(version, phases, seed).run() for seed in range(args.seeds)]
        for label in runs[0]:
            of = [run[label] for run in runs]
            goodput = [len(s["ok"]) / s["seconds"] for s in of]
            shed = [100 * s["shed"] / max(1, s["sent"]) for s in of]
            p99 = [p99_ms(s["ok"]) for s in of]
            timeouts = [s["504"] for s in of]
            print(
                f"   {label:11} goodput {min(goodput):5.1f}-{max(goodput):5.1f}/s"
                f" · shed {min(shed):4.1f}-{max(shed):4.1f} %"
                f" · p99 {min(p99):4.0f}-{max(p99):4.0f} ms"
                f" · timed out {min(timeouts)}-{max(timeouts)}"
                f" (mean of {statistics.mean(len(s['ok']) for s in of):.0f} served)"
            )


if __name__ == "__main__":
    main()
