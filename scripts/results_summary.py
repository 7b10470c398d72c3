"""The summary that opens docs/RESULTS.md, filled from the sections below it.

docs/results/summary.md is a template: each figure in it is a reference to a cell of a table
in RESULTS.md, ``{{ANCHOR|KEY;KEY...|COLUMN}}``: the section with that heading anchor, the
first of its tables with that column header and a row whose first cells are the keys. A
trailing ``|~`` keeps the cell's value without its ``± spread``. ``scripts/make_results.py``
assembles the sections, then fills the summary from them, so no figure of the summary is
typed by hand and each one changes when its section is run again.
"""

from __future__ import annotations

import re

REF = re.compile(r"\{\{([^|}]+)\|([^|}]*)\|([^|}]+)(\|~)?\}\}")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def sections(text: str) -> dict[str, str]:
    """{anchor: the text under that heading, up to the next heading of its level or above}
    (the first of equal anchors, as GitHub links to it)."""
    lines = text.splitlines()
    heads = [(i, len(m.group(1)), slug(m.group(2))) for i, line in enumerate(lines)
             for m in [re.match(r"(#{1,6}) (.+)", line)] if m]
    out = {}
    for k, (i, level, anchor) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
        out.setdefault(anchor, "\n".join(lines[i:end]))
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_cell(section: str, keys: list[str], column: str) -> str:
    lines = section.splitlines()
    for i in range(1, len(lines)):
        if not re.match(r"\|\s*-", lines[i]) or column not in _cells(lines[i - 1]):
            continue
        col = _cells(lines[i - 1]).index(column)
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            if cells[:len(keys)] == keys:
                return cells[col] if col < len(cells) else ""
    raise KeyError(f"no row {';'.join(keys)!r} with a column {column!r}")


def fill(template: str, doc: str) -> str:
    """The template with every reference replaced by its cell of ``doc``; a reference that
    finds nothing is an error naming it."""
    secs = sections(doc)

    def one(m):
        anchor, keys, column, bare = m.group(1), m.group(2), m.group(3), m.group(4)
        if anchor not in secs:
            raise KeyError(f"summary: no section #{anchor}")
        try:
            value = table_cell(secs[anchor], keys.split(";") if keys else [], column)
        except KeyError as e:
            raise KeyError(f"summary: #{anchor}: {e.args[0]}") from None
        return value.split(" ±")[0] if bare else value

    return REF.sub(one, template)
