"""The lessons, measured: each version passes the scenario it fixes and its predecessor fails it.

Every pair runs the same scenario with the same criteria on both versions (`--quick`) and must
differ by at least 2x on the scenario's decisive figure, so noise cannot flip a verdict. The full
staircase (every version on every earlier lesson) is longer: `python -m pytest -m slow`.
"""
import os

import pytest

from conftest import VERSIONS, run_loadtest, version_id

PRESENT = {version_id(p) for p in VERSIONS}
# (scenario, the version that fixes it, its predecessor, True if a higher decisive figure is better)
PAIRS = [
    ("spike", "v0_2", "v0_1", False),
    ("slow-payment", "v0_3", "v0_2", False),
    ("slow-shipping", "v0_3", "v0_2", False),
    ("hang-payment", "v0_4", "v0_3", True),
    ("flaky-payment", "v0_5", "v0_4", False),
    ("retry-storm", "v0_6", "v0_5", False),
    ("payment-down", "v0_7", "v0_6", False),
    ("early-warning", "v0_8", "v0_7", True),
    ("partial-failure", "v1_0", "v0_8", False),
    ("overload", "v1_0", "v0_8", False),
    ("capacity-drop", "v1_0", "v0_8", False),
    ("crash", "v1_0", "v0_8", False),
]
LESSONS = [(scenario, fixer) for scenario, fixer, _, _ in PAIRS]
# Coins a default run must not toss (-m slow runs them). overload: at 10 C v1.0 refuses in 1.9-2.7
# ms (p99) when the machine is calm, 6-19 ms when something else takes the services' core, against
# 5 ms. capacity-drop: v1.0 serves 88-98 % of 0.8 C per second-long window once capacity is back
# (its limit moves between 8 and 12 there: at 80 % utilisation payment's own queueing reads as
# waiting), against 90 %; CI failed it once at 88.4 %.
NOISY = {"overload", "capacity-drop"}


def quick_runs(*args):
    """Run loadtest --quick; return its runs and its printed report (for failure messages)."""
    proc, data = run_loadtest(*args, "--quick")
    assert proc.returncode == 0 and data, f"loadtest failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return data["runs"], proc.stdout


def runs_by_target(*args):
    runs, out = quick_runs(*args)
    return {run["target"]: run for run in runs}, out


def test_v0_1_passes_steady():
    runs, out = runs_by_target("--target", "v0_1", "--scenario", "steady")
    assert runs["v0_1"]["verdict"] == "pass", out


@pytest.mark.parametrize("scenario,fixer,predecessor,higher_is_better", [
    pytest.param(*pair, marks=pytest.mark.slow) if pair[0] in NOISY else pair for pair in PAIRS
], ids=[p[0] for p in PAIRS])
def test_decisive_pair(scenario, fixer, predecessor, higher_is_better):
    if not {fixer, predecessor} <= PRESENT:
        pytest.skip(f"{fixer} or {predecessor} not written yet")
    runs, out = runs_by_target("--compare", f"{predecessor},{fixer}", "--scenario", scenario)
    before, after = runs[predecessor], runs[fixer]
    assert before["verdict"] == "fail", f"{predecessor} should fail {scenario}:\n{out}"
    assert after["verdict"] == "pass", f"{fixer} should pass {scenario}:\n{out}"
    figure = after["decisive"]
    worse, better = before["figures"][figure], after["figures"][figure]
    if worse is None:  # not measurable at all before (no alert without /metrics): as far apart as it gets
        assert better is not None, out
    elif higher_is_better:
        assert better >= 2 * max(worse, 0.1), f"{figure}: {predecessor} {worse} vs {fixer} {better}\n{out}"
    else:
        assert worse >= 2 * better, f"{figure}: {predecessor} {worse} vs {fixer} {better}\n{out}"


# A services' core that woke its canary this late (p99) delayed payment's 40 ms answers by as much:
# seen once on a clean-clone run, 11.5 ms, when PaymentSlow fired on a healthy steady run
BUSY_CORE_MS = 5


def test_no_false_alarm_in_steady():
    """From v0.8: an alert that fires on a healthy system teaches operators to ignore it."""
    if "v0_8" not in PRESENT:
        pytest.skip("v0_8 not written yet")
    for _ in range(2):  # once more only if the services' core itself was late (loadtest's canary)
        runs, out = runs_by_target("--target", "v0_8", "--scenario", "steady")
        figures = runs["v0_8"]["figures"]
        if figures["first_alert"] == "none" or (figures.get("core_lag_p99_ms") or 0) <= BUSY_CORE_MS:
            break
    assert runs["v0_8"]["verdict"] == "pass" and figures["first_alert"] == "none", out


def test_v0_1_spike_piles_up():
    """The issue's acceptance: spike p99 >= 10x steady p99, and orders' threads climb with the pile-up."""
    runs, out = runs_by_target("--target", "v0_1", "--scenario", "steady")
    steady_p99 = runs["v0_1"]["latency_ms"]["p99"]
    spike_runs, out = runs_by_target("--target", "v0_1", "--scenario", "spike")
    spike = spike_runs["v0_1"]
    assert spike["latency_ms"]["p99"] >= 10 * steady_p99, out
    in_fault = [b for b in spike["timeline"] if b["fault"]]
    p99s = [b["p99_ms"] for b in in_fault if b["p99_ms"] is not None]
    assert len(p99s) >= 2 and p99s == sorted(p99s) and p99s[-1] > 1.5 * p99s[0], \
        f"latency should climb through the spike: {p99s}"
    if os.path.isdir("/proc/self"):  # where /proc tells: threads pile up with the requests
        steady_threads = runs["v0_1"]["figures"]["peak_threads"]
        assert steady_threads and spike["figures"]["peak_threads"] >= 5 * steady_threads, out


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(PRESENT))
def test_no_regression(version):
    """A version passes steady and every lesson an earlier (or the same) version learned."""
    earlier = sorted({s for s, fixer in LESSONS if fixer <= version})
    runs, out = quick_runs("--target", version, "--scenario", ",".join(["steady"] + earlier))
    failed = [r["scenario"] for r in runs if r["verdict"] != "pass"]
    assert not failed, f"{version} fails {failed}:\n{out}"


def test_lessons_cover_every_version_present():
    """Each version after v0.1 has its decisive pair here (keeps this file honest as versions land)."""
    fixers = {fixer for _, fixer, _, _ in PAIRS}
    missing = sorted(PRESENT - fixers - {"v0_1"})
    assert not missing, f"no decisive-pair test for {missing}: add its scenario to PAIRS"
