"""The README and the pages under docs/: the README stays short, every relative link (and its
#anchor) resolves (a fragment of docs/results/ from docs/RESULTS.md, where it is assembled),
and no page speaks of the project's issue tracker."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from results_summary import fill, sections, slug  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    seen, out = {}, set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"#{1,6} (.+)", line)
        if m and not in_code:
            a = slug(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_slug_matches_github():
    assert slug("Behaviour preservation (tables 1, 2, 7)") == "behaviour-preservation-tables-1-2-7"
    assert slug("Benchmark: gpt2-small-random on CPU") == "benchmark-gpt2-small-random-on-cpu"
    assert slug("`bsbr-export serve` options") == "bsbr-export-serve-options"


def test_readme_is_short_and_keeps_its_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for cmd in ('    pip install -e ".[test]"', "    bsbr-export models/gpt2-pystdlib --engine onnx --out out/gpt2-pystdlib",
                "    python -m pytest -q"):
        assert cmd in text.splitlines(), cmd
    head = text[:text.index("## Set up")]  # the first screen answers speed, quality, what ran where
    assert "How fast" in head and "behaviour" in head and "TensorRT never ran" in head


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, frag = target.partition("#")
        # a fragment of docs/results/ is written for its place in docs/RESULTS.md
        base = page.parent.parent if page.parent.name == "results" else page.parent
        here = ROOT / "docs" / "RESULTS.md" if page.parent.name == "results" else page
        dest = (base / path).resolve() if path else here
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(page):
    assert not re.search(r"\bissue #?\d+", page.read_text(), re.IGNORECASE)


NUMBER = r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?"


def _summary(doc: str) -> str:
    start = doc.index("## Summary")
    return doc[start:doc.index("\n\n", doc.index("| question |", start))].strip()


def test_results_summary_is_filled_from_the_sections_below_it():
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    template = (ROOT / "docs" / "results" / "summary.md").read_text()
    summary = _summary(doc)
    assert len(summary.splitlines()) <= 40
    assert doc.index(summary) < doc.index("## Definitions")  # the document opens with it
    assert "{{" not in summary and summary == fill(template, doc).strip()  # the figures are the tables'


def test_fragments_under_one_heading_leave_it_to_the_document():
    """Fragments under one heading (a script run again with other options): the one with the
    shortest name keeps the plain heading, whose anchor the summary reads; RESULTS.md names the
    others by their fragment."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_results import fragments, plain_headings

    paths = fragments(ROOT / "docs" / "results")
    keeps = plain_headings(paths)
    shared = {}
    for p in paths:
        shared.setdefault(p.read_text().strip().partition("\n")[0], []).append(p.stem)
    shared = {h: stems for h, stems in shared.items() if len(stems) > 1}
    assert shared  # the benchmark and its recheck, decode-memory and its chunk variant, ...
    doc = (ROOT / "docs" / "RESULTS.md").read_text().splitlines()
    for heading, stems in shared.items():
        assert keeps[heading] == min(stems, key=len)
        assert doc.count(heading) == 1 and all(f"{heading} ({s})" in doc for s in stems if s != keeps[heading])


def test_each_summary_number_stands_in_its_section():
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    secs = sections(doc)
    rows = [line for line in _summary(doc).splitlines() if line.startswith("| ") and "](#" in line]
    assert len(rows) >= 8
    missing = []
    for row in rows:
        behind = " ".join(secs[a] for a in re.findall(r"\]\(#([^)]+)\)", row)).replace(",", "")
        found = set(re.findall(NUMBER, behind))
        for n in re.findall(NUMBER, re.sub(r"\]\([^)]*\)", "]", row)):
            if n.replace(",", "") not in found:
                missing.append((n, row[:60]))
    assert not missing, missing


def test_readme_results_are_the_summary_figures():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Results at a glance"):readme.index("## Set up")]
    answers = " ".join(line.split(" | ")[1] for line in table.splitlines() if line.startswith("| ") and " | " in line)
    summary = _summary((ROOT / "docs" / "RESULTS.md").read_text()).replace(",", "")
    found = set(re.findall(NUMBER, summary))
    missing = [n for n in re.findall(NUMBER, answers.replace(",", "")) if n not in found]
    assert not missing, missing


def test_a_summary_reference_that_finds_nothing_is_an_error():
    doc = "## A b\n\n| k | v |\n|---|---|\n| x | 1.5 ± 0.2 |\n"
    assert fill("{{a-b|x|v}} and {{a-b|x|v|~}}", doc) == "1.5 ± 0.2 and 1.5"
    for bad in ("{{a-c|x|v}}", "{{a-b|y|v}}", "{{a-b|x|w}}"):
        with pytest.raises(KeyError):
            fill(bad, doc)
