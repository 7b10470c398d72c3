"""The README and the pages under docs/: the README stays short, every relative link (and its
#anchor) resolves (a fragment of docs/results/ from docs/RESULTS.md, where it is assembled),
and no page speaks of the project's issue tracker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


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


def sections(page: Path) -> dict[str, str]:
    """{anchor: the text under that heading, up to the next heading of its level or above}."""
    lines = page.read_text().splitlines()
    heads = [(i, len(m.group(1)), slug(m.group(2))) for i, line in enumerate(lines)
             for m in [re.match(r"(#{1,6}) (.+)", line)] if m]
    out = {}
    for k, (i, level, anchor) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
        out.setdefault(anchor, "\n".join(lines[i:end]))
    return out


NUMBER = r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?"


def test_results_summary_fits_a_screen_and_each_number_stands_in_its_section():
    doc = ROOT / "docs" / "RESULTS.md"
    summary = (ROOT / "docs" / "results" / "summary.md").read_text().strip()
    assert len(summary.splitlines()) <= 40
    text = doc.read_text()
    assert text.index(summary) < text.index("## Definitions")  # the document opens with it
    secs = sections(doc)
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "](#" in line]
    assert len(rows) >= 8
    missing = []
    for row in rows:
        behind = " ".join(secs[a] for a in re.findall(r"\]\(#([^)]+)\)", row)).replace(",", "")
        found = set(re.findall(NUMBER, behind))
        for n in re.findall(NUMBER, re.sub(r"\]\([^)]*\)", "]", row)):
            if n.replace(",", "") not in found:
                missing.append((n, row[:60]))
    assert not missing, missing
