"""Write the sample outputs in the docs from two recorded runs: the whole matrix, and the course.

    python loadtest.py --compare all --scenario all --quick --json /tmp/matrix.json  # ~12 min
    python loadtest.py --compare all --json /tmp/course.json   # each lesson's runs, full length
    python docs/render.py --from /tmp/matrix.json --full /tmp/course.json   # keep, rewrite pages
    python docs/render.py --check                              # pages match? (exit 1 if not)

Both runs are kept in docs/samples.json, so every sample in every page comes from them, and the
docs test can check that no page was edited by hand. A sample is a fenced block between two
markers; `full` takes the run from the full-length course, else from the quick matrix;
`rows=2-6,12,20` keeps those seconds of the timeline (a lesson shows a few rows, not all;
`rows=none` none):

    <!-- sample: full v0_1 spike rows=2-9 -->
    ```
    ```
    <!-- /sample -->

`<!-- sample: matrix -->` gives the lesson matrix instead of one run. The README's picture is
loadtest's own HTML report of the full-length runs of one scenario, photographed:

    python docs/render.py --report /tmp/spike.html --scenario spike
    chromium --headless --hide-scrollbars --window-size=760,900 \
        --screenshot=docs/report.png /tmp/spike.html
"""

import argparse
import glob
import io
import json
import os
import re
import sys
import textwrap

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
SAMPLES = os.path.join(DOCS, "samples.json")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)
)
BLOCK = re.compile(r"(<!-- sample: ([^>]*?) -->\n)```\n.*?```\n(<!-- /sample -->)", re.S)

sys.path.insert(0, ROOT)
import loadtest  # noqa: E402  (beside this folder, not installed)


def load_runs(path, key="runs"):
    """The last run of each (version, scenario): an untrusted try is followed by its rerun."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError:
            data = None  # not JSON at all
    runs = data.get(key, []) if isinstance(data, dict) else None
    fine = isinstance(runs, list) and all(isinstance(r, dict) and "scenario" in r for r in runs)
    if not fine:
        raise ValueError(f"{path} is not the JSON of loadtest.py --json")
    return list({(r["target"], r["scenario"]): r for r in runs}.values())


def render(spec, runs):
    """The text of one sample: `matrix`, or `[full] VERSION SCENARIO [rows=A-B]`."""
    out = io.StringIO()
    words = spec.split()
    if words == ["matrix"]:
        loadtest.print_matrix(runs["runs"], out)
        return out.getvalue().lstrip("\n")
    source = "full" if words[0] == "full" else "runs"
    target, scenario, *options = words[1:] if source == "full" else words
    found = [r for r in runs[source] if (r["target"], r["scenario"]) == (target, scenario)]
    run = found[0] if found else None
    if run is None:
        raise SystemExit(f"no run of {target} {scenario} in {SAMPLES}")
    rows = dict(option.split("=") for option in options).get("rows")
    if rows:
        kept = seconds(rows)
        run = dict(run, timeline=[second for second in run["timeline"] if second["t"] in kept])
    loadtest.print_run(run, out)
    lines = out.getvalue().lstrip("\n").splitlines(True)
    if not run["timeline"]:  # rows=none: no column heads either
        lines = [line for line in lines if not line.startswith("    t s ")]
    return "".join(wrapped(line) for line in lines)


def seconds(rows):
    """`2-6,12,20` -> {2, 3, 4, 5, 6, 12, 20}; `none` -> no row at all."""
    kept = set()
    for part in rows.split(","):
        if part == "none":
            continue
        first, _, last = part.partition("-")
        kept.update(range(int(first), int(last or first) + 1))
    return kept


def wrapped(line):
    """The verdict's reasons run long: one line of at most 100 columns each."""
    if len(line) <= 100:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 3)
    return textwrap.fill(line.rstrip("\n"), 100, subsequent_indent=indent) + "\n"


def rewrite(text, runs):
    def sample(match):
        return f"{match.group(1)}```\n{render(match.group(2), runs)}```\n{match.group(3)}"

    return BLOCK.sub(sample, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="JSON", help="the matrix's --json to keep")
    parser.add_argument("--full", metavar="JSON", help="the full-length course's --json to keep")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    parser.add_argument("--report", metavar="FILE.html", help="write loadtest's HTML report...")
    parser.add_argument("--scenario", default="spike", help="...of this scenario's full runs")
    args = parser.parse_args(argv)
    if args.report:
        full = [r for r in load_runs(SAMPLES, "full") if r["scenario"] == args.scenario]
        if not full:
            raise SystemExit(f"no full-length run of {args.scenario} in {SAMPLES}")
        loadtest.write_report(full, args.report)
        return 0
    if args.source or args.full:
        kept = {key: load_runs(SAMPLES, key) for key in ("runs", "full")}
        if args.source:
            kept["runs"] = load_runs(args.source)
        if args.full:
            kept["full"] = load_runs(args.full)
        with open(SAMPLES, "w", encoding="utf-8") as f:
            json.dump(kept, f, separators=(",", ":"))
    runs = {key: load_runs(SAMPLES, key) for key in ("runs", "full")}
    stale = []
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        new = rewrite(text, runs)
        if new != text:
            stale.append(os.path.relpath(page, ROOT))
            if not args.check:
                with open(page, "w", encoding="utf-8") as f:
                    f.write(new)
    verb = "differ from" if args.check else "rewritten from"
    for page in stale:
        print(f"{page}: samples {verb} {os.path.relpath(SAMPLES, ROOT)}")
    return 1 if args.check and stale else 0


def run(argv=None):
    """main(), with a file it cannot read or write said in one line, exit code 2."""
    try:
        return main(argv)
    except loadtest.OutputError as err:
        sys.stderr.write(f"{str(err).split(' (the results')[0]}\n")
    except (OSError, ValueError, KeyError) as err:
        sys.stderr.write(f"render.py: error: {err}\n")
    return 2


if __name__ == "__main__":
    sys.exit(run())
