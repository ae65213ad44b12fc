"""Every measured figure quoted in README.md, bench/README.md and docs/*.md comes from a committed
result file in bench/results/ (the convention: bench/README.md, "Result files").

A figure is written as a Markdown link whose text is the number as printed (with its unit) and
whose target is the result file plus a fragment that says which value it is:

    [4.93](bench/results/gpu_flux_h200.json#/rows/0/s_per_image)               a JSON pointer
    [1.29x](bench/results/gpu_flux_h200.json#ratio(/rows/0/s_per_image,/rows/1/s_per_image))

Fragment functions (arguments are JSON pointers or numbers): ratio(a,b) = a/b, diff(a,b) = a-b,
pct(a,b) = (a/b - 1) * 100, mul(a,b) = a*b, min(...), max(...). The link text holds one number; it
must equal the value rounded to as many decimals as it is printed with. Links from docs/ start with
`../`. Outside fenced code blocks and `code spans`, any other number with a measurement unit (ms, s,
min, h, KiB, MiB, GiB, MB, GB, %, dB, a ratio such as 1.3x or x1.3, N ... per CR/request/image/pod,
N images/s) fails the test unless it is a bound (right after <, >, <= or >=) or one of the
non-measurement numbers in ALLOWED below (settings, defaults, limits, examples of a message, other
projects' published figures). Numbers without a unit (a table's seconds column) are not scanned:
link them all the same.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]

NUMBER = r"[-+]?\d+(?:\.\d+)?"
# [text](path/to/bench/results/x.json#fragment), the fragment may hold one level of parentheses
FIGURE_LINK = re.compile(
    r"\[([^\[\]]*)\]\(((?:\.\./)*(?:bench/)?results/[^()\s#]+)#((?:[^()\s]|\([^()\s]*\))+)\)"
)
UNIT = r"(?:ms|s|min|h|KiB|MiB|GiB|MB|GB|%|dB)"
RANGE_SEP = r"\s*(?:-|to|and|->|/|,)\s*"
UNBACKED = re.compile(
    rf"(?<![\w.\-/+])(?:{NUMBER})(?:{RANGE_SEP}{NUMBER})*\s?{UNIT}(?![\w/])"  # 12.3 s, 10-15 %, 3/4 ms
    rf"|(?<![\w.])\d+(?:\.\d+)?x(?![\w])"  # 1.29x
    rf"|(?<![\w.])x\d+(?:\.\d+)?(?![\w])"  # x1.3
    rf"|(?<![\w.\-/+]){NUMBER}\s(?:[A-Za-z-]+\s){{0,2}}per (?:CR|request|image|pod)\b"  # 2.11 reconciles per CR
    rf"|(?<![\w.\-/+]){NUMBER}\s?[a-z]+/s\b"  # 3.2 requests/s
)
BOUND = re.compile(r"(?:<=|>=|<|>|≤|≥)\s*$")

# Numbers with a unit that are not measurements: (doc, exact text as it stands in the doc, why).
# An entry must match the doc's text exactly (newlines included) and must still be there.
SETTING = "a setting, default or limit, not a measurement"
ALLOWED: list[tuple[str, str, str]] = [
    ("README.md", "+100 % or +4 pods per 15 s", SETTING),
    ("README.md", "(300 s stabilization window", SETTING),
    ("README.md", "cached 30 s)", SETTING),
    ("README.md", "lease duration (15 s)", SETTING),
    ("README.md", "waits up to 5 s for that", SETTING),
    ("README.md", "32 MiB by default", SETTING),
    ("README.md", "bodies above 1 MiB", SETTING),
    ("README.md", "`server.store_max_bytes` (512 MiB)", SETTING),
    ("README.md", "`server.store_max_bytes`, 512 MiB)", SETTING),
    ("README.md", "(progress every 10 s)", SETTING),
    ("README.md", "up: 0 s, Max, 100 % or 4 pods / 15 s; down: 300 s, Max, 1 pod / 60 s", SETTING),
    (
        "README.md",
        "keeps PSNR 35.2 / SSIM 0.91 at 1.53x",
        "cache-dit's own published FLUX.1-dev figure, cited",
    ),
    ("README.md", "the defaults (25 dB / 0.75", SETTING),
    ("bench/README.md", "published 3.73 s / 2.77 s (H200)", "the seed's published FLUX.1-dev figures, cited"),
    ("README.md", "the 2-core, 24 GiB dev machine", "the machine's size"),
    ("bench/README.md", "child events wait 0.25 s", SETTING),
    ("bench/README.md", "asserts the 15 s bound", SETTING),
    ("bench/README.md", "(polled every 0.25 s)", SETTING),
    ("bench/README.md", "scrape interval\n1 s, adapter relist 2 s, HPA sync period 5 s", SETTING),
    ("bench/README.md", "HPA sync period (5 s here; the controller manager's default is 15 s)", SETTING),
    ("bench/README.md", "PodMonitor (15 s by default", SETTING),
    ("docs/adapters.md", "e.g. 1% for r = 16", "arithmetic (2r/d), not a measurement"),
    ("docs/adapters.md", "about 16%)", "arithmetic (2r/d), not a measurement"),
    ("docs/adapters.md", "at most about 5 %", "arithmetic (2r/d), not a measurement"),
    ("docs/contracts.md", "10 MiB chunk", SETTING),
    ("docs/multi-gpu.md", "(1 h while loading", SETTING),
    ("docs/multi-gpu.md", "`request_timeout_seconds` + 60 s", SETTING),
    ("docs/multi-gpu.md", "4 KiB semaphore", "the size NCCL's shared memory needs, not a measurement"),
    ("docs/network.md", "720 h:", SETTING),
    ("docs/operator.md", "`leaseDuration` 15 s, `renewDeadline` 10 s,\n`retryPeriod` 2 s", SETTING),
    ("docs/operator.md", "(timings 3/2/0.25 s for these two)", SETTING),
    ("docs/operator.md", "set to 5 ms", SETTING),
    ("docs/operator.md", "`child_delay` (0.25 s)", SETTING),
    ("docs/operator.md", "retried after 5 s, doubling up to 60 s", SETTING),
    ("docs/operator.md", "(0.5 s doubling, at most 60 s)", SETTING),
    ("docs/operator.md", "asserts the 15 s bound", SETTING),
    ("docs/operator.md", "test's 15 s bound", SETTING),
    ("docs/operator.md", "`activeDeadlineSeconds` 6 h", SETTING),
    ("docs/operator.md", "every 10 s (bytes move", SETTING),
    ("docs/operator.md", "`limitBytes` 1 MiB", SETTING),
    ("docs/operator.md", "again every 15 s (fresh)", SETTING),
    ("docs/operator.md", "cached\n30 s;", SETTING),
    ("docs/queue.md", "a sync job's record: 60 s", SETTING),
    ("docs/queue.md", "at most every 0.25 s", SETTING),
    ("docs/queue.md", "connect timeout (2 s; at once while its 1 s health check", SETTING),
    ("docs/queue.md", "edits, 1 MiB JSON)", SETTING),
    ("docs/queue.md", "429: 5 s", SETTING),
    ("docs/security.md", "(1 MiB JSON", SETTING),
    ("docs/webhooks.md", "`server.webhook_timeout_seconds` (10 s)", SETTING),
    ("docs/webhooks.md", "1 s doubling up to 30 s by default", SETTING),
]


class FigureError(Exception):
    pass


def _pointer(doc: object, pointer: str) -> float:
    """RFC 6901 JSON pointer (URL-quoted in the link) into `doc`; the value must be a number."""
    if not pointer.startswith("/"):
        raise FigureError(f"not a JSON pointer: {pointer!r}")
    node = doc
    for raw in urllib.parse.unquote(pointer)[1:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise FigureError(f"{pointer}: no index {key!r}")
            node = node[int(key)]
        elif isinstance(node, dict):
            if key not in node:
                raise FigureError(f"{pointer}: no key {key!r}")
            node = node[key]
        else:
            raise FigureError(f"{pointer}: {key!r} below a {type(node).__name__}")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise FigureError(f"{pointer}: {node!r} is not a number")
    return float(node)


FUNCTIONS: dict[str, Callable[..., float]] = {
    "ratio": lambda a, b: a / b,
    "diff": lambda a, b: a - b,
    "pct": lambda a, b: (a / b - 1) * 100,
    "mul": lambda a, b: a * b,
    "min": min,
    "max": max,
}


def evaluate(doc: object, fragment: str) -> float:
    """The value a link's fragment names in the result file `doc`."""
    m = re.fullmatch(r"(\w+)\((.*)\)", fragment)
    if not m:
        return _pointer(doc, fragment)
    name, args = m.groups()
    if name not in FUNCTIONS:
        raise FigureError(f"unknown function {name!r} (known: {', '.join(FUNCTIONS)})")
    values = [float(a) if re.fullmatch(NUMBER, a) else _pointer(doc, a) for a in args.split(",")]
    return FUNCTIONS[name](*values)


def check_figure(text: str, value: float) -> None:
    """`text` (the link text) holds one number that equals `value` as printed."""
    numbers = re.findall(NUMBER, text.replace("\u2212", "-"))
    if len(numbers) != 1:
        raise FigureError(f"[{text}]: a figure link holds exactly one number, found {numbers}")
    quoted = numbers[0]
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    if not math.isclose(float(quoted), value, abs_tol=0.5 * 10**-decimals + 1e-9):
        raise FigureError(f"[{text}]: the file says {value:.{decimals + 3}f}")


def figure_errors(text: str, doc_dir: Path, root: Path = REPO) -> list[str]:
    """Every figure link in `text` whose file, value or number is wrong (paths relative to doc_dir;
    the files must be in root/bench/results)."""
    results_dir = (root / "bench" / "results").resolve()
    errors = []
    for label, path, fragment in FIGURE_LINK.findall(text):
        target = (doc_dir / path).resolve()
        try:
            if target.parent != results_dir:
                raise FigureError(f"{path} is not in {results_dir}")
            if not target.is_file():
                raise FigureError(f"no file {path}")
            if target.suffix != ".json":
                raise FigureError(f"{path}: a figure comes from a JSON result file")
            check_figure(label, evaluate(json.loads(target.read_text()), fragment))
        except FigureError as e:
            errors.append(f"[{label}]({path}#{fragment}): {e}")
        except (ArithmeticError, TypeError, ValueError) as e:
            errors.append(f"[{label}]({path}#{fragment}): {type(e).__name__}: {e}")
    return errors


def unbacked_figures(text: str, allowed: list[str]) -> list[str]:
    """Numbers with a measurement unit outside figure links, code and the `allowed` snippets,
    as 'line N: text'; plus every allowed snippet that is no longer in the text."""
    errors = [f"allow-listed text not found (stale ALLOWED entry): {s!r}" for s in allowed if s not in text]

    def blank(m: re.Match) -> str:  # keep the line numbers
        return re.sub(r"[^\n]", " ", m.group(0))

    for snippet in allowed:
        text = re.sub(re.escape(snippet), blank, text)
    text = re.sub(r"^```.*?^```", blank, text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = FIGURE_LINK.sub(blank, text)
    # a code span may wrap onto the next line, not into the next paragraph
    text = "\n\n".join(re.sub(r"`[^`]+`", blank, para) for para in text.split("\n\n"))
    for m in UNBACKED.finditer(text):
        if BOUND.search(text[max(0, m.start() - 3) : m.start()]):
            continue
        line = text.count("\n", 0, m.start()) + 1
        errors.append(f"line {line}: {m.group(0)!r} has no result-file link")
    return errors


@pytest.mark.parametrize("doc", DOCS)
def test_every_linked_figure_matches_its_result_file(doc):
    path = REPO / doc
    errors = figure_errors(path.read_text(), path.parent)
    assert not errors, f"{doc}:\n" + "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS)
def test_no_measured_figure_without_its_result_file(doc):
    errors = unbacked_figures((REPO / doc).read_text(), [s for d, s, _ in ALLOWED if d == doc])
    assert not errors, f"{doc} (see bench/README.md, 'Result files'):\n" + "\n".join(errors)


def test_the_docs_quote_figures_from_files():
    """The convention is in use (a scan that finds no links at all would pass vacuously)."""
    links = [m for doc in DOCS for m in FIGURE_LINK.findall((REPO / doc).read_text())]
    assert len(links) >= 50
    files = {Path(path).name for _, path, _ in links}
    assert {"gpu_flux_h200.json", "queue_overhead_cpu.json", "runtime_overhead_cpu.json"} <= files
    assert {doc for doc, _, _ in ALLOWED} <= set(DOCS)


def test_a_doctored_readme_fails():
    """The real README with one figure changed, and with one unbacked figure added."""
    readme = (REPO / "README.md").read_text()
    link = "[4.93](bench/results/gpu_flux_h200.json#/rows/0/s_per_image)"
    assert link in readme
    (error,) = figure_errors(readme.replace(link, link.replace("4.93", "4.99")), REPO)
    assert "the file says 4.933" in error
    allowed = [s for d, s, _ in ALLOWED if d == "README.md"]
    assert unbacked_figures(readme, allowed) == []
    (error,) = unbacked_figures(
        readme.replace("## Quickstart", "A run took 12.3 s.\n\n## Quickstart"), allowed
    )
    assert "'12.3 s'" in error


# The checks themselves, on doctored text: each kind of mistake is caught.


@pytest.fixture
def results(tmp_path: Path) -> Path:
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.json").write_text(
        json.dumps({"p50_ms": 3.783, "rows": [{"s": 4.933}, {"s": 3.812}], "n": 150, "a/b": 2.0, "x y": 1.5})
    )
    (tmp_path / "bench" / "results" / "r.md").write_text("| 3.8 |")
    return tmp_path


@pytest.mark.parametrize(
    "text",
    [
        "overhead [3.8 ms](bench/results/r.json#/p50_ms)",
        "[3.78 ms](bench/results/r.json#/p50_ms)",
        "[4 ms](bench/results/r.json#/p50_ms)",
        "[4.93](bench/results/r.json#/rows/0/s) and [1.29x](bench/results/r.json#ratio(/rows/0/s,/rows/1/s))",
        "[x1.3](bench/results/r.json#ratio(/rows/0/s,/rows/1/s)), [29 %](bench/results/r.json#pct(/rows/0/s,/rows/1/s))",
        "[+1.12 s](bench/results/r.json#diff(/rows/0/s,/rows/1/s)), [3812 ms](bench/results/r.json#mul(/rows/1/s,1000))",
        "[3.81](bench/results/r.json#min(/rows/0/s,/rows/1/s))-[4.93 s](bench/results/r.json#max(/rows/0/s,/rows/1/s))",
        "[150 requests](bench/results/r.json#/n), [2.0](bench/results/r.json#/a~1b), [1.5](bench/results/r.json#/x%20y)",
    ],
)
def test_a_figure_that_matches_its_file_passes(results, text):
    assert figure_errors(text, results, results) == []
    assert figure_errors(text.replace("bench/results/", "results/"), results / "bench", results) == []
    assert figure_errors(text.replace("bench/results/", "../bench/results/"), results / "docs", results) == []
    assert unbacked_figures(text, []) == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[3.9 ms](bench/results/r.json#/p50_ms)", "the file says 3.783"),  # a stale or invented value
        ("[3.7 ms](bench/results/r.json#/p50_ms)", "the file says 3.783"),  # rounded the wrong way
        ("[3.783 ms](bench/results/r.json#/p90_ms)", "no key 'p90_ms'"),
        ("[4.93](bench/results/r.json#/rows/2/s)", "no index '2'"),
        ("[1.30x](bench/results/r.json#ratio(/rows/0/s,/rows/1/s))", "the file says 1.294"),
        ("[3.8 ms](bench/results/none.json#/p50_ms)", "no file"),
        ("[3.8](bench/results/r.md#/p50_ms)", "JSON result file"),
        ("[3.8 to 4 ms](bench/results/r.json#/p50_ms)", "exactly one number"),
        ("[4](bench/results/r.json#/rows/0)", "is not a number"),
        ("[4](bench/results/r.json#sum(/n,/n))", "unknown function"),
        ("[4](bench/results/r.json#p50_ms)", "not a JSON pointer"),
        ("[3.8 ms](results/r.json#/p50_ms)", "is not in"),  # relative to the wrong folder
    ],
)
def test_a_figure_that_does_not_match_its_file_fails(results, text, why):
    (error,) = figure_errors(text, results, results)
    assert why in error


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("the overhead is 3.8 ms at p50", "3.8 ms"),
        ("| create -> Deployment | p50 93.7 ms, p99 283 ms |", "93.7 ms"),
        ("took 11.3-11.9 s", "11.3-11.9 s"),
        ("200 CRs Ready in 49.7s", "49.7s"),
        ("RSS 115 MiB", "115 MiB"),
        ("a 2.70x speedup", "2.70x"),
        ("the ratio (x0.77)", "x0.77"),
        ("about 10-15 % here", "10-15 %"),
        ("PSNR about 49 dB", "49 dB"),
        ("2.11 reconciles per CR", "2.11 reconciles per CR"),
        ("6 API writes per CR", "6 API writes per CR"),
        ("at 1.7 images/s", "1.7 images/s"),
        ("[3.8 ms](bench/results/r.json#/p50_ms) against 25.0 ms for the direct path", "25.0 ms"),
        ("[an old run](https://example.com/run.json) gave 120.3 s", "120.3 s"),
    ],
)
def test_a_measured_figure_without_its_file_fails(text, found):
    errors = unbacked_figures(text, [])
    assert errors and repr(found) in errors[0], errors


@pytest.mark.parametrize(
    "text",
    [
        "target p50 <= 500 ms, 200 CRs >= 3x faster, < 60 s",  # bounds
        "`--timeout 30s` and\n```\n$ bench took 12.3 s\n```\n",  # code
        "1024x1024 x 28 steps, Ulysses 2 x TP 2, 3 cached steps of 8, 4 pods, 28 steps",  # not units
        "<!-- 12.3 s -->",
    ],
)
def test_numbers_that_are_not_measurements_pass(text):
    assert unbacked_figures(text, []) == []


def test_the_allow_list_is_exact_and_kept_current():
    text = "the lease lasts 15 s by default; a leader took 16.5 s"
    (error,) = unbacked_figures(text, ["lease lasts 15 s"])
    assert "16.5 s" in error
    assert unbacked_figures(text, ["lease lasts 15 s", "took 16.5 s"]) == []
    (stale,) = unbacked_figures("nothing here", ["lease lasts 15 s"])
    assert "stale ALLOWED entry" in stale
