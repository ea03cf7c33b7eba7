"""What v1.0's adaptive concurrency limit does while payment loses half its workers.

    python benchmarks/limit_trace.py            # capacity-drop at full length (23 s)
    python benchmarks/limit_trace.py --quick    # 9 s

It starts v1_0_composed.py on free ports, runs loadtest.py's `capacity-drop` scenario against it
(--url), and reads /metrics every half second meanwhile: the limit (orders_concurrency_limit),
the orders in progress, and the capacity payment has (its /stats: 100 charges/s with its 4
workers, 50 with 2).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir)
EVERY_S = 0.5


def start_v1_0():
    """v1.0 on free ports: (its process, its URLs from the READY line)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "v1_0_composed.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit("v1_0_composed.py did not start")
    return proc, json.loads(line[len("READY ") :])


def read(url, timeout_s=1.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return answer.read().decode()


def gauge(text, name):
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def watch(urls, rows, done):
    """Every EVERY_S until `done`: (t, limit, in progress, payment's capacity)."""
    t0 = time.monotonic()
    while not done.is_set():
        try:
            metrics = read(urls["orders"] + "/metrics")
            capacity = json.loads(read(urls["payment"] + "/stats")).get("capacity_rps")
            limit = gauge(metrics, "orders_concurrency_limit")
            in_progress = gauge(metrics, "orders_in_progress")
            rows.append((time.monotonic() - t0, limit, in_progress, capacity))
        except (OSError, ValueError):
            pass
        done.wait(EVERY_S)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="loadtest.py's --quick phases")
    args = parser.parse_args(argv)
    proc, urls = start_v1_0()
    rows = []
    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(urls, rows, done))
    try:
        watcher.start()
        command = [sys.executable, os.path.join(ROOT, "loadtest.py"), "--url", urls["orders"]]
        command += ["--payment-url", urls["payment"], "--shipping-url", urls["shipping"]]
        command += ["--scenario", "capacity-drop"] + (["--quick"] if args.quick else [])
        finished = subprocess.run(command, stdout=subprocess.DEVNULL)
        if finished.returncode != 0:
            raise SystemExit(f"loadtest.py stopped: exit code {finished.returncode} (see above)")
    except KeyboardInterrupt:  # loadtest got the Ctrl-C too; v1.0 is stopped below
        raise SystemExit(130) from None
    finally:
        done.set()
        watcher.join()
        proc.terminate()
        proc.wait()
    print("    t s   payment capacity /s   limit   orders in progress")
    for t, limit, in_progress, capacity in rows:
        print(f"  {t:5.1f}   {capacity!s:>19s}   {limit!s:>5s}   {in_progress!s:>18s}")


if __name__ == "__main__":
    main()
