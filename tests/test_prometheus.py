"""GET /metrics and prometheus/ against Prometheus' own rules, for every version that has /metrics (v0.8 on).

1. A stdlib parser holds the exposition to the text format 0.0.4: content type, one HELP and one TYPE
   per family before its samples, each family's samples together, metric and label names, unit
   suffixes (_total, _seconds), and every histogram's buckets (increasing le, cumulative counts,
   +Inf equal to _count, a _sum).
2. `promtool check metrics` on the same exposition.
3. `promtool check rules|config` and `promtool test rules` on prometheus/.
4. A real Prometheus scraping the version while loadtest.py runs early-warning: its PaymentSlow fires,
   within ALERT_AGREEMENT_S of the first alert loadtest.py computes from the same rules.

promtool and prometheus are optional (CI has neither): the tests that need one skip, saying so.
Nothing here sleeps to synchronise: every wait polls a condition against a deadline.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import pytest
from conftest import LOADTEST, ROOT, VERSIONS, Service, group_alive, version_id
from conftest import request as fetch  # `request` is pytest's fixture argument here

METRICS_VERSIONS = [p for p in VERSIONS if version_id(p) >= "v0_8"]
PROMETHEUS_DIR = os.path.join(ROOT, "prometheus")
PROMTOOL = "promtool"
PROMETHEUS = "prometheus"
JSON_HEADERS = {"Content-Type": "application/json"}
ORDER = {"item": "book", "qty": 2, "customer": "ada", "ref": "prom-1"}
BAD_ORDER = {"item": "book", "qty": 0, "customer": "ada"}  # qty must be > 0: a 400

# Prometheus' data model (https://prometheus.io/docs/concepts/data_model/).
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
SAMPLE = re.compile(r"(?P<name>[^{\s]+)(?:\{(?P<labels>.*)\})?[ \t]+(?P<value>\S+)(?:[ \t]+(?P<ts>-?\d+))?\Z")
LABEL_PAIR = re.compile(r'\s*(?P<name>[^=\s]+)\s*=\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|\Z)')
VALUE = re.compile(r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\Z")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
# A name with one of these words measures time, so its unit must be _seconds (Prometheus' naming guide).
TIME_WORDS = {"duration", "latency", "age", "time", "elapsed", "wait", "uptime", "ms", "millis", "milliseconds",
              "microseconds", "us", "minutes", "hours", "seconds"}

PROMETHEUS_READY_S = 30.0  # a fresh TSDB is ready in ~1 s; generous: the machine is shared with load tests
LOADTEST_TIMEOUT_S = 120.0  # early-warning --quick: ~17 s of load plus at most 4 s of drain
ALERT_AGREEMENT_S = 2.5  # Prometheus' PaymentSlow vs loadtest.py's, in wall-clock time
POLL_S = 0.05  # a short pause between polls, not a synchronisation


def needs(tool):
    """Skip, saying why, when a binary is not installed (CI has neither promtool nor prometheus)."""
    return pytest.mark.skipif(shutil.which(tool) is None,
                              reason=f"`{tool}` is not installed (optional: Debian/Ubuntu package prometheus)")


# === THE EXPOSITION: A STDLIB PARSER OF THE TEXT FORMAT 0.0.4 ===


def unescape(value):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_labels(text, where, problems):
    """'a="1",b="x\\"y"' -> {'a': '1', 'b': 'x"y'}; what is wrong goes to problems."""
    labels, pos = {}, 0
    while pos < len(text.rstrip()):
        m = LABEL_PAIR.match(text, pos)
        if not m:
            problems.append(f"{where}: malformed labels {text[pos:]!r}")
            break
        name = m.group("name")
        if not LABEL_NAME.match(name) or name.startswith("__"):
            problems.append(f"{where}: label name {name!r} does not match {LABEL_NAME.pattern} (or is reserved __)")
        if name in labels:
            problems.append(f"{where}: label {name!r} twice")
        labels[name] = unescape(m.group("value"))
        pos = m.end()
    return labels


def family_of(name, families):
    """The family a sample name belongs to: itself, or a histogram/summary's name without its suffix."""
    for family, info in families.items():
        if name in tuple(family + s for s in SUFFIXES.get(info["type"], ("",))):
            return family
    return None


def parse_exposition(text):
    """Text format 0.0.4 -> (families {name: {help, type, samples [(name, labels, value)]}}, problems)."""
    families, problems, current, closed = {}, [], None, set()
    if "\r" in text:
        problems.append("a carriage return: lines end in \\n only")
    if text and not text.endswith("\n"):
        problems.append("the exposition does not end with a line feed")
    for number, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        where = f"line {number} {line!r}"
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # an ordinary comment
            kind, name = parts[1], parts[2]
            if name != current:  # a new family's block starts: the previous one is over
                if current is not None:
                    closed.add(current)
                if name in closed:
                    problems.append(f"{where}: family {name} comes back after another family: not one block")
                current = name
            info = families.setdefault(name, {"help": 0, "type": None, "types": 0, "samples": []})
            if not METRIC_NAME.match(name) or ":" in name:
                problems.append(f"{where}: metric name {name!r} does not match {METRIC_NAME.pattern} "
                                "(colons are for recording rules, not exporters)")
            if info["samples"]:
                problems.append(f"{where}: # {kind} after the family's samples")
            if kind == "HELP":
                info["help"] += 1
                if len(parts) < 4 or not parts[3].strip():
                    problems.append(f"{where}: an empty HELP")
            else:
                info["types"] += 1
                info["type"] = parts[3].strip() if len(parts) == 4 else None
                if info["type"] not in TYPES:
                    problems.append(f"{where}: type {info['type']!r} is not one of {sorted(TYPES)}")
            continue
        m = SAMPLE.match(line)
        if not m:
            problems.append(f"{where}: not a sample line")
            continue
        name = m.group("name")
        if not METRIC_NAME.match(name):
            problems.append(f"{where}: metric name {name!r} does not match {METRIC_NAME.pattern}")
        labels = parse_labels(m.group("labels") or "", where, problems)
        if not VALUE.match(m.group("value")):
            problems.append(f"{where}: value {m.group('value')!r} is not a Prometheus float")
            continue
        family = family_of(name, {current: families[current]} if current in families else {})
        if family is None:
            owner = family_of(name, families)
            problems.append(f"{where}: sample of {owner or name} "
                            + ("outside its family's block" if owner else "with no # HELP and # TYPE before it"))
            continue
        if families[family]["type"] is None:
            problems.append(f"{where}: sample before its family's # TYPE")
        families[family]["samples"].append((name, labels, float(m.group("value"))))
    for name, info in families.items():
        if info["help"] != 1 or info["types"] != 1:
            problems.append(f"family {name}: {info['help']} # HELP and {info['types']} # TYPE lines, expected one each")
        seen = [(n, tuple(sorted(labels.items()))) for n, labels, _ in info["samples"]]
        for dup in {s for s in seen if seen.count(s) > 1}:
            problems.append(f"family {name}: sample {dup} appears twice")
    return families, problems


def naming_problems(families):
    """Unit and type suffixes, as Prometheus' naming guide (and promtool's linter) ask."""
    problems = []
    for name, info in families.items():
        kind, words = info["type"], set(name.split("_"))
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"counter {name} does not end in _total")
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{kind} {name} ends in _total, which is for counters")
        unit_end = "_seconds_total" if kind == "counter" else "_seconds"
        if words & TIME_WORDS and not name.endswith(unit_end):
            problems.append(f"{name} measures time ({sorted(words & TIME_WORDS)}) but does not end in {unit_end}")
        for sample, labels, value in info["samples"]:
            if kind == "counter" and not value >= 0:
                problems.append(f"counter sample {sample}{labels} = {value}: a counter is never negative")
    return problems


def histogram_problems(name, samples):
    """Each label set: _bucket with increasing le, cumulative counts, le="+Inf" == _count, and a _sum."""
    problems, groups = [], {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        group = groups.setdefault(key, {"buckets": [], "sum": [], "count": []})
        if sample == name + "_bucket":
            if "le" not in labels or not VALUE.match(labels["le"]):
                problems.append(f"{name}_bucket{dict(key)}: le={labels.get('le')!r} is not a float")
                continue
            group["buckets"].append((float(labels["le"]), value, labels["le"]))
        elif "le" in labels:
            problems.append(f"{sample}{dict(key)} has an le label: only _bucket does")
        else:
            group["sum" if sample.endswith("_sum") else "count"].append(value)
    for key, group in groups.items():
        where, buckets = f"{name}{dict(key)}", group["buckets"]
        if not buckets:
            problems.append(f"{where}: no _bucket")
            continue
        bounds, counts = [b[0] for b in buckets], [b[1] for b in buckets]
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            problems.append(f"{where}: le not strictly increasing: {[b[2] for b in buckets]}")
        if any(b > c for b, c in zip(counts, counts[1:])):
            problems.append(f"{where}: bucket counts not cumulative: {counts}")
        if buckets[-1][2] != "+Inf" or not math.isinf(bounds[-1]):
            problems.append(f'{where}: the last bucket is le="{buckets[-1][2]}", not le="+Inf"')
        if len(group["count"]) != 1:
            problems.append(f"{where}: {len(group['count'])} _count samples, expected one")
        elif math.isinf(bounds[-1]) and counts[-1] != group["count"][0]:
            problems.append(f'{where}: le="+Inf" bucket {counts[-1]} != _count {group["count"][0]}')
        if len(group["sum"]) != 1:
            problems.append(f"{where}: {len(group['sum'])} _sum samples, expected one")
    return problems


# === SERVICES AND PROCESSES ===


@pytest.fixture(scope="module", params=METRICS_VERSIONS, ids=version_id)
def exposition(request):
    """A version after one placed order and one 400: (its /metrics headers, body text)."""
    svc = Service(request.param)
    try:
        orders = svc.urls["orders"]
        status, _, body = fetch(orders + "/orders", "POST", ORDER, JSON_HEADERS)
        assert status == 201, (status, body)
        status, _, body = fetch(orders + "/orders", "POST", BAD_ORDER, JSON_HEADERS)
        assert status == 400, (status, body)
        status, headers, body = fetch(orders + "/metrics")
        assert status == 200 and isinstance(body, bytes), (status, body)
        yield headers, body.decode("utf-8")
    finally:
        svc.stop()


def header(headers, name):
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def free_port():
    """A port free on loopback now (Prometheus cannot report the one it picked for :0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc, timeout_s=10.0):
    """SIGTERM the process group, then SIGKILL whatever is left; reap our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s / 2
        while time.monotonic() < deadline:
            proc.poll()
            if not group_alive(proc.pid):
                break
            time.sleep(POLL_S)
        else:
            continue
        break
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def get_json(url, timeout_s=2.0):
    """GET url -> parsed JSON, or None on any error (the poller keeps polling)."""
    try:
        status, _, payload = fetch(url, timeout_s=timeout_s)
    except (OSError, ValueError):
        return None
    return payload if status == 200 and isinstance(payload, (dict, list)) else None


def parse_rfc3339(text):
    """Prometheus' activeAt ('2026-01-02T03:04:05.123456789Z') -> Unix seconds (to the microsecond)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)\Z", text)
    assert m, f"not an RFC 3339 time: {text!r}"
    stamp = datetime.fromisoformat(m.group(1) + "." + (m.group(2) or "0")[:6].ljust(6, "0")
                                   + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return stamp.timestamp()


def prometheus_settings():
    """global scrape_interval and evaluation_interval from prometheus/prometheus.yml (no YAML parser here)."""
    with open(os.path.join(PROMETHEUS_DIR, "prometheus.yml")) as f:
        text = f.read()
    settings = {}
    for key in ("scrape_interval", "evaluation_interval"):
        m = re.search(rf"^\s+{key}:\s*(\S+)\s*$", text, re.M)
        assert m, f"prometheus/prometheus.yml has no {key}"
        settings[key] = m.group(1)
    return settings


# === 1. THE EXPOSITION, BY A STDLIB PARSER ===


def test_content_type_is_text_format_0_0_4(exposition):
    headers, _ = exposition
    content_type = header(headers, "Content-Type") or ""
    params = [p.strip() for p in content_type.split(";")]
    assert params[0] == "text/plain" and "version=0.0.4" in params[1:], content_type
    assert all(p in ("version=0.0.4", "charset=utf-8") for p in params[1:]), content_type


def test_exposition_follows_the_text_format(exposition):
    families, problems = parse_exposition(exposition[1])
    problems += naming_problems(families)
    for name, info in families.items():
        if info["type"] == "histogram":
            problems += histogram_problems(name, info["samples"])
    assert not problems, "\n".join(problems)
    assert any(info["type"] == "histogram" and info["samples"] for info in families.values()), \
        "no histogram with samples: the bucket checks checked nothing"


def test_the_alert_rules_inputs_are_exposed(exposition):
    """What prometheus/alerts.yml (and loadtest.py's ALERT_RULES) read is there, of the right type."""
    families, _ = parse_exposition(exposition[1])
    kinds = {name: info["type"] for name, info in families.items()}
    assert kinds.get("dependency_request_duration_seconds") == "histogram", kinds
    assert kinds.get("fulfilment_oldest_event_age_seconds") == "gauge", kinds
    assert kinds.get("circuit_breaker_state") == "gauge", kinds
    payment = [(n, labels, v) for n, labels, v in families["dependency_request_duration_seconds"]["samples"]
               if labels.get("dependency") == "payment"]
    assert any(n.endswith("_count") and v >= 1 for n, _, v in payment), f"the placed order's charge: {payment}"
    assert any(n.endswith("_bucket") and labels.get("le") == "0.075" for n, labels, _ in payment), \
        'PaymentSlow reads le="0.075": that bucket boundary must exist'
    states = {labels.get("state") for _, labels, _ in families["circuit_breaker_state"]["samples"]
              if labels.get("dependency") == "payment"}
    assert "open" in states, states


def test_parser_catches_what_it_should():
    """The checker itself: each broken exposition is refused (a checker that passes everything checks nothing)."""
    good = ("# HELP a_seconds A.\n# TYPE a_seconds histogram\n"
            'a_seconds_bucket{le="0.1"} 1\na_seconds_bucket{le="+Inf"} 2\na_seconds_sum 0.3\na_seconds_count 2\n'
            "# HELP b_total B.\n# TYPE b_total counter\nb_total 1\n")

    def problems(text):
        families, found = parse_exposition(text)
        found += naming_problems(families)
        return found + [p for n, i in families.items() if i["type"] == "histogram"
                        for p in histogram_problems(n, i["samples"])]
    assert problems(good) == []
    broken = {
        "no TYPE": good.replace("# TYPE b_total counter\n", ""),
        "two HELP": good.replace("# HELP b_total B.\n", "# HELP b_total B.\n# HELP b_total B.\n"),
        "split family": good + "a_seconds_count 2\n",
        "counter without _total": good.replace("b_total", "b"),
        "time not in seconds": good.replace("a_seconds", "a_latency_ms"),
        "le decreasing": good.replace('a_seconds_bucket{le="0.1"} 1\n', 'a_seconds_bucket{le="0.2"} 1\n'
                                      'a_seconds_bucket{le="0.1"} 1\n'),
        "not cumulative": good.replace('a_seconds_bucket{le="0.1"} 1', 'a_seconds_bucket{le="0.1"} 3'),
        "+Inf != count": good.replace("a_seconds_count 2", "a_seconds_count 3"),
        "no _sum": good.replace("a_seconds_sum 0.3\n", ""),
        "bad label name": good.replace("b_total 1", 'b_total{0x="1"} 1'),
        "bad metric name": good.replace("b_total", "b-x_total"),
        "no trailing newline": good.rstrip("\n"),
    }
    for what, text in broken.items():
        assert problems(text), f"{what}: not caught"


# === 2. AND 3. PROMTOOL ===


@needs(PROMTOOL)
def test_promtool_check_metrics(exposition):
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition[1], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, f"promtool check metrics:\n{proc.stdout}{proc.stderr}"


@needs(PROMTOOL)
@pytest.mark.parametrize("command", [["check", "rules", "prometheus/alerts.yml"],
                                     ["check", "config", "prometheus/prometheus.yml"],
                                     ["test", "rules", "prometheus/alerts_test.yml"]], ids=lambda c: " ".join(c[:2]))
def test_promtool_on_the_rules(command):
    proc = subprocess.run([PROMTOOL, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(command)}:\n{proc.stdout}{proc.stderr}"


# === 4. A REAL PROMETHEUS, END TO END ===


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="test_prometheus_") as tmp:
        yield tmp


@needs(PROMETHEUS)
@pytest.mark.parametrize("version_path", [  # v1.0's /metrics and rules are v0.8's: -m slow runs it
    pytest.param(p, marks=pytest.mark.slow) if version_id(p) == "v1_0" else p for p in METRICS_VERSIONS
], ids=version_id)
def test_prometheus_fires_payment_slow_with_loadtest(version_path, workdir):
    """early-warning: a real Prometheus fires PaymentSlow within ALERT_AGREEMENT_S of loadtest.py's own alert.

    Times are compared on the wall clock. Prometheus gives the alert's activeAt (the rule has no `for:`,
    so active is firing). loadtest.py reports its first alert in seconds after its run's t0 and has no
    absolute start time; t0 is anchored here by watching payment's GET /chaos: the first chaos loadtest
    sets is the first faulty phase's, sent at t0 + that phase's "start" (from the JSON). That anchor is
    good to a poll (POLL_S) plus one request; loadtest rounds its time to 0.1 s. Prometheus itself
    trails by up to one scrape plus one evaluation (2 x 500 ms). The launch time bounds the anchor as a
    sanity check (t0 is after loadtest started)."""
    svc = Service(version_path)
    prometheus = prom_log = load_log = None
    try:
        port = free_port()
        prom_url = f"http://127.0.0.1:{port}"
        config = os.path.join(workdir, "prometheus.yml")
        settings = prometheus_settings()
        target = svc.urls["orders"].split("://", 1)[1]
        with open(config, "w") as f:  # JSON is YAML: no YAML writer needed
            json.dump({"global": settings, "rule_files": [os.path.join(PROMETHEUS_DIR, "alerts.yml")],
                       "scrape_configs": [{"job_name": "orders", "static_configs": [{"targets": [target]}]}]}, f)
        prom_log = open(os.path.join(workdir, "prometheus.log"), "w+")
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True)

        def prom_output():
            prom_log.seek(0)
            return prom_log.read()[-3000:]

        deadline = time.monotonic() + PROMETHEUS_READY_S
        while True:
            try:
                if fetch(prom_url + "/-/ready", timeout_s=1.0)[0] == 200:
                    break
            except OSError:
                pass
            assert prometheus.poll() is None, f"prometheus exited ({prometheus.returncode}):\n{prom_output()}"
            assert time.monotonic() < deadline, f"prometheus not ready in {PROMETHEUS_READY_S} s:\n{prom_output()}"
            time.sleep(POLL_S)
        # The target is up and scraped before the load starts (so the rule has history to rate() over).
        deadline = time.monotonic() + PROMETHEUS_READY_S
        while True:
            up = get_json(prom_url + "/api/v1/query?query=up")
            if up and any(r["value"][1] == "1" for r in up["data"]["result"]):
                break
            assert time.monotonic() < deadline, f"prometheus never scraped {target}: {up}\n{prom_output()}"
            time.sleep(POLL_S)

        out = os.path.join(workdir, "result.json")
        load_log = open(os.path.join(workdir, "loadtest.log"), "w+")  # a file: a full pipe would stall the run
        launched = time.time()
        loadtest = subprocess.Popen(
            [sys.executable, LOADTEST, "--url", svc.urls["orders"], "--payment-url", svc.urls["payment"],
             "--shipping-url", svc.urls["shipping"], "--scenario", "early-warning", "--quick", "--json", out],
            stdin=subprocess.DEVNULL, stdout=load_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            chaos_at, prom_fired, seen = None, None, []  # seen: every alert state Prometheus showed
            deadline = time.monotonic() + LOADTEST_TIMEOUT_S
            while loadtest.poll() is None:
                assert time.monotonic() < deadline, f"loadtest ran over {LOADTEST_TIMEOUT_S} s"
                if chaos_at is None and get_json(svc.urls["payment"] + "/chaos"):
                    chaos_at = time.time()  # when we saw it: at most one poll after it was set
                alerts = get_json(prom_url + "/api/v1/alerts")
                for alert in (alerts or {}).get("data", {}).get("alerts", []):
                    name, state = alert["labels"].get("alertname"), alert.get("state")
                    if (name, state) not in [(n, s) for n, s, _ in seen]:
                        seen.append((name, state, round(time.time() - launched, 2)))
                    if name == "PaymentSlow" and state == "firing" and prom_fired is None:
                        prom_fired = parse_rfc3339(alert["activeAt"])
                time.sleep(POLL_S)
        finally:
            if loadtest.poll() is None:
                stop_group(loadtest)
            load_log.seek(0)
            output = load_log.read()
        assert loadtest.returncode == 0, f"loadtest exited {loadtest.returncode}:\n{output[-3000:]}"
        with open(out) as f:
            run = json.load(f)["runs"][0]
        figures = run["figures"]
        first_alert = figures.get("first_alert") or ""
        m = re.fullmatch(r"(\w+) at ([\d.]+) s", first_alert)
        assert m and m.group(1) == "PaymentSlow", \
            f"loadtest's first alert is {first_alert!r}, not PaymentSlow: {figures}\n{output[-2000:]}"
        faulty = [p for p in run["phases"] if p["payment"]]
        assert faulty and chaos_at is not None, f"never saw loadtest set payment's chaos: {run['phases']}"
        t0 = chaos_at - faulty[0]["start"]
        assert t0 >= launched - 0.1, f"anchor {t0 - launched:.2f} s before loadtest was even launched"
        loadtest_fired = t0 + float(m.group(2))
        assert prom_fired is not None, (f"Prometheus never fired PaymentSlow; alerts seen (name, state, s after "
                                        f"launch): {seen}; loadtest: {first_alert}\n{prom_output()}")
        gap = prom_fired - loadtest_fired
        print(f"\n{version_id(version_path)}: loadtest PaymentSlow at {loadtest_fired - launched:.2f} s after launch "
              f"(t0 +{m.group(2)} s, t0 = launch +{t0 - launched:.2f} s), Prometheus at "
              f"{prom_fired - launched:.2f} s: Prometheus {gap:+.2f} s; lead {figures.get('alert_lead_s')} s")
        assert abs(gap) <= ALERT_AGREEMENT_S, (
            f"Prometheus fired PaymentSlow {gap:+.2f} s from loadtest's first alert ({first_alert}), more than "
            f"{ALERT_AGREEMENT_S} s; alerts seen: {seen}")
    finally:
        if prometheus is not None:
            stop_group(prometheus)
        svc.stop()
        for log in (prom_log, load_log):
            if log is not None:
                log.close()
