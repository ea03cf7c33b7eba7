"""The docs say only what is so: every command they show parses, and every file, scenario, flag,
link and constant they name exists; the cheap commands (--help, --list) run as written; each
version header's headline figures are the ones its lesson page quotes."""
import functools
import io
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import VERSIONS, version_id

import loadtest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
CODE = "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True))
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(python [^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONSTANT = re.compile(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`")
# a copy the exercises make (never a tracked file): my_v0_2.py stands for v0_2
COPY = re.compile(r"my_(v\d_\d|loadtest)\w*\.py")


def doc_id(path):
    return os.path.relpath(path, ROOT)


def read(path):
    return open(path, encoding="utf-8").read()


def commands(text):
    """Every `python ...` command a doc shows: in code blocks (a line each, comments and shell
    continuations dropped) and inline; only the first of `a && b`, `a | b`, `a; b`."""
    found = [m.group(1) for m in INLINE.finditer(text)]
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():  # a shell continuation joins
            line = line.strip().removeprefix("$ ")
            if line.startswith("python "):
                found.append(line)
    out = []
    for command in found:
        command = re.split(r"\s(?:&&|\||;)\s|\s+#\s", command)[0].strip()
        out.append(command)
    return out


def argv_of(command):
    """The command's words, a learner's copy (my_v0_2.py) standing for the version it copies."""
    return [COPY.sub(lambda m: version_file(m.group(1)), word) for word in shlex.split(command)]


def version_file(name):
    if name == "loadtest":
        return "loadtest.py"
    return next(os.path.basename(p) for p in VERSIONS if version_id(p) == name)


def all_commands():
    return [(doc_id(p), c) for p in DOCS for c in commands(read(p))]


def test_the_docs_exist_and_are_short_enough_to_read():
    readme = read(os.path.join(ROOT, "README.md"))
    lessons = sorted(glob.glob(os.path.join(ROOT, "docs", "lessons", "*.md")))
    assert len(lessons) == len(VERSIONS), "one lesson page per version"
    assert readme.count("\n") <= 260, "the README is a start-here page: lessons live in docs/lessons"
    for path in lessons:
        assert read(path).count("\n") <= 210, f"{doc_id(path)}: a lesson page reads in one sitting"


@pytest.mark.parametrize("where,command", all_commands())
def test_every_loadtest_command_in_the_docs_parses(where, command):
    argv = argv_of(command)
    if argv[1:2] != ["loadtest.py"]:
        return
    try:
        loadtest.parse_args(argv[2:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse ({exc})")


@functools.lru_cache(maxsize=None)
def version_help(path):
    return subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.parametrize("where,command", all_commands())
def test_every_other_command_in_the_docs_names_a_file_and_flags_that_exist(where, command):
    argv = argv_of(command)
    script = argv[1]
    if script in ("-m", "-c", "loadtest.py"):
        return
    assert os.path.exists(os.path.join(ROOT, script)), f"{where}: `{command}` runs a file that does not exist"
    flags = [word.split("=")[0] for word in argv[2:] if word.startswith("--")]
    helptext = version_help(os.path.join(ROOT, script))
    for flag in flags:
        assert flag in helptext, f"{where}: `{command}`: {script} has no {flag}"


def test_every_scenario_the_docs_name_exists():
    for path in DOCS:
        for command in commands(read(path)):
            argv = argv_of(command)
            for flag, value in zip(argv, argv[1:]):
                if flag == "--scenario":
                    for name in value.split(","):
                        assert name == "all" or name in loadtest.SCENARIOS, f"{doc_id(path)}: no scenario {name!r}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    text = read(path)
    found = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_every_link_in_the_docs_leads_somewhere(path):
    for target in LINK.findall(read(path)):
        if re.match(r"[a-z]+:", target):
            continue  # a web page: not checked offline
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(linked), f"{doc_id(path)}: the link {target!r} leads nowhere"
        if anchor and linked.endswith(".md"):
            assert anchor in anchors(linked), f"{doc_id(path)}: {doc_id(linked)} has no #{anchor}"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_every_constant_and_file_the_docs_name_exists(path):
    text = read(path)
    for name in CONSTANT.findall(text):
        assert name in CODE, f"{doc_id(path)}: `{name}` is in no file of the kit"
    for name in re.findall(r"`([\w/.-]+\.(?:py|md|yml|png|toml|txt))`", text):
        if COPY.fullmatch(os.path.basename(name)):
            continue
        anywhere = glob.glob(os.path.join(ROOT, "**", name), recursive=True)  # alerts.yml: in prometheus/
        assert anywhere, f"{doc_id(path)}: `{name}` does not exist"


CHEAP = [(w, c) for w, c in all_commands() if re.search(r"(--help|--list)$", c)]


@pytest.mark.parametrize("where,command", CHEAP)
def test_the_cheap_commands_in_the_docs_run_as_written(where, command):
    argv = [sys.executable] + argv_of(command)[1:]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout, f"{where}: `{command}` failed: {proc.stderr[-500:]}"


HEADLINE = re.compile(r"([\d,.]+ ?(?:ms|s|x|%)?) -> ([\d,.]+ ?(?:ms|s|x|%)?)")


@pytest.mark.parametrize("path", VERSIONS, ids=version_id)
def test_each_version_headers_headline_figures_are_its_lesson_pages(path):
    header = read(path).split('"""')[1]
    number = version_id(path)[1:].replace("_", "")  # v0_3 -> 03, v1_0 -> 10
    lesson = glob.glob(os.path.join(ROOT, "docs", "lessons", "*.md"))
    page = next((p for p in sorted(lesson) if os.path.basename(p)[:2] == f"{VERSIONS.index(path) + 1:02d}"), None)
    assert page, f"no lesson page for {version_id(path)} ({number})"
    text = read(page).replace("→", "->")
    for before, after in HEADLINE.findall(header):
        for figure in (before, after):
            digits = figure.split()[0].rstrip("msx%")
            assert digits in text, f"{doc_id(page)} does not quote {figure.strip()} from {version_id(path)}'s header"


def test_the_samples_in_the_docs_are_the_recorded_runs():
    """Every sample output comes from docs/samples.json (docs/render.py writes them): none edited by hand."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "render.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


TIMELINE_ROW = re.compile(r"^ {3,5}\d+ [ #] +\d+ ", re.M)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "docs", "lessons", "*.md"))), ids=doc_id)
def test_a_lesson_shows_a_few_timeline_rows_not_all(path):
    for block in FENCE.findall(read(path)):
        rows = len(TIMELINE_ROW.findall(block))
        assert rows <= 8, f"{doc_id(path)}: a sample with {rows} timeline rows (rows=A-B keeps a few)"


def test_a_versions_run_ends_by_sending_the_learner_to_its_lesson_page():
    """loadtest's `Next:` line: the version's page first, then the diff to the next version."""
    for number, path in enumerate(VERSIONS, start=1):
        page = loadtest.lesson_page(number)
        assert page and os.path.exists(os.path.join(ROOT, page)), (path, page)
        assert os.path.basename(page).startswith(f"{number:02d}-")
    result = {"target": "v0_1", "scenario": "spike", "verdict": "fail", "decisive": "p99_ms",
              "figures": {"p99_ms": 4000.0}, "reasons": ["p99_ms = 4000.0, needs <= 1000"]}
    out = io.StringIO()
    loadtest.print_story([result], out)
    assert "Next: read docs/lessons/01-naive.md, then diff -u v0_1_naive.py v0_2_admission.py" in (
        out.getvalue()
    )
