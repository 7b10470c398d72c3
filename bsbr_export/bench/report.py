"""The Markdown report: bench.md and the docs fragment (header, then every table), and the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..util import atomic_write_text
from .plots import plots
from .results import cell, fmt_mib, fmt_range, fmt_x, lo_hi, ratio_range, timed_backends
from .sections import decode_table, miss_notes, opt_levels_table, paired_table, profile_tables, table, \
    targets_table
from .spec import BACKENDS, LABELS, LONG_TOKENS, SHORT_WARMUP_SEQ


def _prefill_tables(result: dict) -> list[str]:
    """Latency, ratio to the floor, speedups and peak memory over T (batch 1)."""
    lengths = sorted(result["spec"]["lengths"])
    shown = timed_backends(result)
    vs = [b for b in shown if b != "floor-ort"]
    names = list(result["speedups"])
    pairs = [f"{LABELS[n.split('/')[0]]} over {LABELS[n.split('/')[1]]}" for n in names]
    def x(v, num, den, T):  # a ratio of medians and the range of the runs' ratios
        return fmt_x(v) + (fmt_range(ratio_range(result, num, den, T), fmt_x) if v is not None else "")

    return [
        "\n### Prefill latency, batch 1 (median ms, in brackets the fastest and slowest run)\n",
        table(["T"] + [LABELS[b] for b in shown],
              [[T] + [cell(result, b, T, spread=True) for b in shown] for T in lengths]),
        "\n### Latency as a multiple of the dense floor (1.00 = only the unavoidable matmul work; in brackets "
        "the range over the runs)\n",
        table(["T"] + [LABELS[b] for b in vs], [[T] + [x(result["vs_floor"][b][str(T)], b, "floor-ort", T)
                                                       for b in vs] for T in lengths]),
        "\n### Speedups (ratio of median latencies; in brackets the range over the runs)\n",
        table(["T"] + pairs, [[T] + [x(result["speedups"][n][str(T)], n.split("/")[1], n.split("/")[0], T)
                                     for n in names] for T in lengths]),
        "\n### Peak memory, batch 1 (process RSS high-water mark during inference, MiB)\n",
        table(["T"] + [LABELS[b] for b in shown],
              [[T] + [cell(result, b, T, fmt=fmt_mib, key="peak_rss_bytes") for b in shown] for T in lengths]),
    ]


def markdown_tables(result: dict) -> str:
    """Every table of a run, as Markdown (the body of bench.md and of the fragment)."""
    spec = result["spec"]
    parts = ["### Parity gate (before any timing)\n"]
    rows = []
    for b in BACKENDS:
        p = result["backends"][b]["parity"]
        if "max_abs" in p and p.get("atol") is None:  # a gate of its own (int8): KL and top-1, no logits bound
            rows.append([LABELS[b], p["reference"], p["seq"], f"{p['max_abs']:.2e} (no bound; gate: {p['gate']})",
                         f"{p['top1']:.1%}", "pass" if p["status"] == "pass" else "parity FAILED"])
        elif "max_abs" in p:
            rows.append([LABELS[b], p["reference"], p["seq"], f"{p['max_abs']:.2e} (tol {p['atol']:.0e})",
                         f"{p['top1']:.1%}", "pass" if p["status"] == "pass" else "parity FAILED"])
        else:
            rows.append([LABELS[b], "—", "—", "—", "—", f"{p['status']}: {p.get('reason', '')}"])
    parts.append(table(["backend", "reference", "T", "max abs diff", "top-1", "verdict"], rows))
    parts += _prefill_tables(result)
    if spec["throughput"]:
        bt, T = spec["throughput"]
        parts.append(f"\n### Throughput, batch {bt} x T={T}\n")
        parts.append(table(["backend", "median ms", "tokens/s", "peak RSS MiB"], [
            [LABELS[b], cell(result, b, T, bt, spread=True), cell(result, b, T, bt, fmt=lambda v: f"{v:,.0f}", key="tokens_per_s"),
             cell(result, b, T, bt, fmt=fmt_mib, key="peak_rss_bytes")] for b in timed_backends(result)]))
    parts.append(f"\n### Scaling exponent (log-log slope of latency over T in {lo_hi(result)})\n")
    parts.append(table(["backend", "exponent", "r²", "lengths"], [
        [LABELS[b], f"{s['exponent']:.2f}", f"{s['r2']:.3f}", ", ".join(map(str, s["lengths"]))]
        for b, s in result["scaling"].items()]))
    if result["decode"]:
        parts.append(decode_table(result))
    if result.get("opt_levels"):
        parts.append(opt_levels_table(result))
    parts.append(paired_table(result))
    parts.append(targets_table(result))
    if result.get("profiles"):
        parts.append(profile_tables(result))
    notes = miss_notes(result)
    if notes:
        parts.append("\n### Missed targets: where the time goes and what would close them\n\n" + notes)
    return "\n".join(parts) + "\n"


def header(result: dict) -> str:
    m, mach, v = result["model"], result["machine"], result["versions"]
    params = m["params_hf_without_extended_positions"] / 1e6
    params = f"{params:.0f}M" if params >= 10 else f"{params:.2f}M"
    lines = [
        f"- command: `{result['command']}`",
        f"- machine: {mach['cpu']}, {mach['cores']} cores used ({result['threads']} threads), "
        f"{(mach['memory_bytes'] or 0) / 2 ** 30:.0f} GiB RAM, SIMD {', '.join(mach['simd']) or 'n/a'}; "
        f"{mach['platform']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- date: {result['date']}; whole run {result.get('seconds', 0) / 60:.1f} min",
        f"- model: {m['name']} ({params} parameters, {m['n_layer']} layers, {m['n_head']} heads, "
        f"d_model {m['n_embd']}, vocab {m['vocab_size']}), fp32, BSBR chunk L={m['chunk_size']}, "
        f"{m.get('retrieval', 'plain')} retrieval, g={m.get('retrieval_scale', '?')} (g scales the retrieval "
        f"term at run time: its cost is paid for any g)",
        f"- positions: the checkpoint has {m['n_positions']}; the standard baselines (HF torch, the HF export in "
        f"ORT) use a table extended to {m['n_positions_extended']} (rows tiled from the learned table): this compares "
        f"attention cost, the logits beyond {m['n_positions']} are not meaningful. BSBR uses its "
        f"`{m['position_policy']}` position policy.",
        f"- protocol: median of the timed runs after warm-up (>= 5 runs per case, 1-2 warm-ups; from "
        f"{LONG_TOKENS} tokens on, the warm-up runs a {SHORT_WARMUP_SEQ}-token prefix; `--quick`: 2 runs); "
        "every prefill case in its own child process; peak memory = that process's RSS high-water mark "
        "during inference (weights and the logits tensor included). Decode: state filled at the context's "
        "shape with random values, one chunk of steps (one run: no spread).",
    ]
    if result.get("quick"):
        lines.append("- quick: a smoke test of the benchmark itself (tiny model, 2 runs): the targets below are "
                     "computed but not judged")
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    if result["quick"]:
        lines.append("- **quick smoke run**: tiny random model, 2 runs per case, shared child per backend; "
                     "the numbers say nothing about speed.")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path, fragment=None) -> None:
    """bench.json, bench.md and the plots under ``out``; the docs fragment at ``fragment`` if given."""
    pngs = plots(result, out)
    write_json(result, out / "bench.json")
    title = f"# Benchmark: {result['model']['name']}\n\n"
    atomic_write_text(out / "bench.md", title + header(result) + "\n\n" + markdown_tables(result)
                      + "".join(f"\n![{p}]({p})\n" for p in pngs))
    if fragment is not None:
        frag = Path(fragment)
        frag.parent.mkdir(parents=True, exist_ok=True)
        # A fragment's links are relative to the document it is assembled into: docs/RESULTS.md,
        # one folder up, for a fragment in docs/results/ (scripts/make_results.py); else its own folder.
        doc = frag.parent.parent if (frag.parent.parent / "RESULTS.md").is_file() else frag.parent
        rel = os.path.relpath(out.resolve(), doc.resolve())
        links = "\n".join(f"![{p[:-4]}]({rel}/{p})" for p in pngs)
        atomic_write_text(frag, f"## Benchmark: {result['model']['name']} on CPU\n\n" + header(result) + "\n\n"
                          + f"Raw data: [`bench.json`]({rel}/bench.json).\n\n"
                          + markdown_tables(result).replace("\n### ", "\n#### ") + "\n" + links + "\n")


def write_json(result: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
