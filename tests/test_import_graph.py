"""The package's import graph (``ast`` over every module, function-level imports included):
no loops, and no module imports from a layer above its own (docs/packages.md draws the map)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layer of each module or package, lowest first; a module may import its own layer and below.
LAYERS = [
    ("ground", ["bsbr_export", "bsbr_export.errors", "bsbr_export.util", "bsbr_export.config", "bsbr_export.graph"]),
    ("the op", ["bsbr_export.ops"]),
    ("model and graphs", ["bsbr_export.modeling", "bsbr_export.convert", "bsbr_export.calibrate",
                          "bsbr_export.self_sample",
                          "bsbr_export.metrics", "bsbr_export.export", "bsbr_export.export_graphs",
                          "bsbr_export.trt"]),
    ("runtime", ["bsbr_export.runtime", "bsbr_export.generate"]),
    ("checks", ["bsbr_export.check", "bsbr_export.quantize", "bsbr_export.fidelity", "bsbr_export.kvcache"]),
    ("applications", ["bsbr_export.pipeline", "bsbr_export.serve", "bsbr_export.bench", "bsbr_export.calibrate_data",
                      "bsbr_export.calibrate_run"]),
    ("command line", ["bsbr_export.cli", "bsbr_export.cli_runtime", "bsbr_export.cli_options",
                      "bsbr_export.cli_calibrate"]),
]


def modules(pkg_dir: Path) -> dict[str, Path]:
    out = {}
    for p in pkg_dir.rglob("*.py"):
        parts = p.relative_to(pkg_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its body}."""
    mods = modules(pkg_dir)
    top = pkg_dir.name
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] == top and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = name.startswith(p + ".") and "." in p  # the top package holds only itself
            if (name == p or inside) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{name}: in no layer of LAYERS"
    return best[0]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def test_the_package_has_no_import_loop():
    assert loops(import_graph(ROOT / "bsbr_export")) == []


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward(import_graph(ROOT / "bsbr_export")) == []


def test_every_module_has_its_layer():
    unplaced = []
    for name in import_graph(ROOT / "bsbr_export"):
        try:
            layer(name)
        except AssertionError:
            unplaced.append(name)
    assert unplaced == []


def test_the_checks_see_a_loop_and_an_upward_import(tmp_path):
    pkg = tmp_path / "bsbr_export"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "util.py").write_text("def f():\n    from .ops import a  # a function-level import still counts\n")
    (pkg / "ops" / "a.py").write_text("from ..util import f\nfrom . import b\n")
    (pkg / "ops" / "b.py").write_text("import bsbr_export.ops.a\n")
    graph = import_graph(pkg)
    assert graph["bsbr_export.ops.b"] == {"bsbr_export.ops.a"}
    assert loops(graph) == [["bsbr_export.ops.a", "bsbr_export.ops.b", "bsbr_export.util"]]
    assert upward(graph) == ["bsbr_export.util -> bsbr_export.ops", "bsbr_export.util -> bsbr_export.ops.a"]


def test_the_package_map_in_docs_is_this_list():
    rows = {}
    for line in (ROOT / "docs" / "packages.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[0]] = [m.strip(" `") for m in cells[1].split(",")]
    short = lambda m: m if m == "bsbr_export" else m.removeprefix("bsbr_export.")  # noqa: E731
    assert rows == {name: [short(m) for m in mods] for name, mods in LAYERS}
