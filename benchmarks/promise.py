"""The seed's promise as a benchmark: v0.8 and v1.0 side by side at 0.5, 3 and 10 C.

    python benchmarks/promise.py            # full length: 5 s at 0.5 C, 10 s at 3 C, 10 s at 10 C
    python benchmarks/promise.py --quick    # 2 s, 2 s, 3 s

It runs loadtest.py's `overload` scenario on each version (started on free ports, stopped
after) and prints, per load: goodput (successful orders/s), the accepted orders' p99 and the
shed answers' p99. A benchmark reports; it passes or fails nothing (`loadtest.py` judges).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOADTEST = os.path.join(HERE, os.pardir, "loadtest.py")
PHASES = (("baseline", "0.5 C"), ("3C", "3 C"), ("10C", "10 C"))
FIGURES = (
    ("goodput_rps", "goodput /s"),
    ("p99_ms", "accepted p99 ms"),
    ("shed_p99_ms", "shed p99 ms"),
)


def run_overload(versions, quick):
    """loadtest.py's overload scenario on each version: its JSON runs."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "promise.json")
        command = [sys.executable, LOADTEST, "--compare", ",".join(versions)]
        command += ["--scenario", "overload", "--json", path] + (["--quick"] if quick else [])
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"loadtest.py stopped with exit code {done.returncode} (see above)")
        with open(path) as f:
            return json.load(f)["runs"]


def show(value):
    if value is None:
        return "n/a"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def table(runs):
    """One row per figure and load, one column per version."""
    versions = [run["target"] for run in runs]
    width = max(len(label) for _, label in FIGURES) + 8
    lines = [f"{'':{width}s}" + "".join(f"{v:>12s}" for v in versions)]
    for phase, load in PHASES:
        for figure, label in FIGURES:
            cells = [show(run["figures"].get(f"{figure}@{phase}")) for run in runs]
            lines.append(f"{load + '  ' + label:{width}s}" + "".join(f"{c:>12s}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (2, 2 and 3 s)")
    parser.add_argument(
        "--versions", default="v0_8,v1_0", help="versions to compare (default %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        print(table(run_overload(args.versions.split(","), args.quick)))
    except KeyboardInterrupt:  # loadtest got the Ctrl-C too, and stopped what it started
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
