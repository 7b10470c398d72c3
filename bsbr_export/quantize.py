"""The int8 CPU engine: int8 graphs of an export and their parity gate against the fp32 graphs.

``export_int8`` writes ``model_int8.onnx``, ``extend_int8.onnx``, ``decode_int8.onnx`` and
``close_int8.onnx`` beside an fp32 export (``export.ExportSpec(int8=True)``: the dense weights
int8 in ``weights_int8.onnx.data``, every fp32 tensor read from the fp32 export's
``weights.onnx.data``), then ``int8_parity`` compares the int8 prefill graph with the fp32 one
in ONNX Runtime on the parity grid (``check.grid_lengths``; held-out text and random ids,
batches 1 and 3).

The gate is statistical, not a logits bound: int8 moves every logit a little, so it is judged
on what generation sees. Per source (held-out text, random ids), over every position of every
case of the grid: top-1 agreement with the fp32 graph >= ``MIN_TOP1`` and mean
KL(fp32 || int8) of the next-token distributions <= ``MAX_KL`` nats. Pooling the positions
matters for top-1: a case of one token agrees 0% or 100%. The statistics are ``check``'s
(``compare_case``, ``LogitStats``); the pooled values are their position-weighted means.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BSBRExportError

MIN_TOP1 = 0.97  # top-1 agreement with the fp32 graph, per source over the grid
MAX_KL = 0.02  # mean KL(fp32 || int8) in nats, per source over the grid


class Int8ParityError(BSBRExportError):
    """The int8 graph disagrees with the fp32 graph beyond the gate; the message is one line."""


@dataclass
class Int8Case:
    source: str
    batch: int
    seq: int
    positions: int
    top1: float
    kl_mean: float
    kl_max: float
    max_abs: float
    cosine_min: float


def check_thresholds(min_top1: float, max_kl: float) -> None:
    from .errors import ConfigError

    if not (isinstance(min_top1, (int, float)) and 0.0 <= min_top1 <= 1.0):
        raise ConfigError(f"int8 minimum top-1 agreement must lie in [0, 1], got {min_top1!r}")
    if not (isinstance(max_kl, (int, float)) and max_kl >= 0.0 and math.isfinite(max_kl)):
        raise ConfigError(f"int8 maximum mean KL must be a finite number >= 0, got {max_kl!r}")


def int8_parity(fp32_onnx, int8_onnx, chunk: int, max_len: int, vocab: int, text_ids=None,
                threads: int | None = None, min_top1: float = MIN_TOP1, max_kl: float = MAX_KL, lengths=None,
                batches=None, progress=None) -> dict:
    """The int8 prefill graph against the fp32 one on the grid; returns the report (``passed``,
    thresholds, per-source pooled statistics, every case)."""
    from .check import BATCHES, compare_case, grid_cases, grid_lengths, lean_ort_runner

    check_thresholds(min_top1, max_kl)
    batches = tuple(batches or BATCHES)
    lengths = list(lengths or grid_lengths(chunk, max_len))
    sources = ["heldout", "random"] if text_ids is not None else ["random"]
    cases = []
    with lean_ort_runner(fp32_onnx, threads=threads) as ref, lean_ort_runner(int8_onnx, threads=threads) as cand:
        # The same inputs as the fp32 grid.
        for source, b, n, ids in grid_cases(chunk, max_len, vocab, text_ids, batches, lengths):
            m, _ = compare_case(ref, cand, ids, vocab)
            cases.append(Int8Case(source, b, n, b * n, m["top1"], m["kl_mean"], m["kl_max"], m["max_abs"],
                                  m["cosine_min"]))
            if progress:
                progress(cases[-1])
    pooled = {}
    for source in sources:
        mine = [c for c in cases if c.source == source]
        n = sum(c.positions for c in mine)
        top1 = sum(c.top1 * c.positions for c in mine) / n
        kl = sum(c.kl_mean * c.positions for c in mine) / n
        pooled[source] = {"positions": n, "top1": top1, "kl_mean": kl, "kl_max": max(c.kl_max for c in mine),
                          "min_case_top1": min(c.top1 for c in mine),
                          "passed": top1 >= min_top1 and kl <= max_kl}
    return {"precision": "int8", "reference": f"onnxruntime {Path(fp32_onnx).name} (fp32)",
            "candidate": f"onnxruntime {Path(int8_onnx).name}",
            "thresholds": {"min_top1": min_top1, "max_kl_mean_nats": max_kl,
                           "judged": "per source, over every position of every case of the grid"},
            "lengths": lengths, "batches": list(batches), "sources": pooled,
            "passed": all(p["passed"] for p in pooled.values()), "cases": [asdict(c) for c in cases]}


def case_line(c: Int8Case) -> str:
    return (f"    {c.source:7s} batch {c.batch} seq {c.seq:5d}  top-1 {c.top1:.1%}  mean KL {c.kl_mean:.2e}  "
            f"max|diff| {c.max_abs:.2e}")


def verdict(report: dict) -> str:
    """One line: the gate's thresholds and what each source measured."""
    t = report["thresholds"]
    parts = [f"{s}: top-1 {p['top1']:.2%}, mean KL {p['kl_mean']:.4f}" for s, p in report["sources"].items()]
    return (f"{report['candidate']} {'passes' if report['passed'] else 'FAILS'} the int8 gate against "
            f"{report['reference']} (top-1 >= {t['min_top1']:.0%}, mean KL <= {t['max_kl_mean_nats']:g} nats): "
            + "; ".join(parts))


def write_report(report: dict, out_dir, stem: str = "parity_onnx_int8") -> tuple[Path, Path]:
    from .util import atomic_write_text, markdown_table

    out = Path(out_dir)
    j, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(j, json.dumps(report, indent=2) + "\n")
    t = report["thresholds"]
    src = markdown_table(["source", "positions", "top-1", "mean KL (nats)", "max KL", "worst case top-1", "pass"],
                         [[s, p["positions"], f"{p['top1']:.2%}", f"{p['kl_mean']:.2e}", f"{p['kl_max']:.2e}",
                           f"{p['min_case_top1']:.2%}", "yes" if p["passed"] else "NO"]
                          for s, p in report["sources"].items()])
    rows = markdown_table(["source", "batch", "seq", "top-1", "mean KL", "max KL", "max abs", "min cosine"],
                          [[c["source"], c["batch"], c["seq"], f"{c['top1']:.2%}", f"{c['kl_mean']:.2e}",
                            f"{c['kl_max']:.2e}", f"{c['max_abs']:.2e}", f"{c['cosine_min']:.6f}"]
                           for c in report["cases"]])
    head = (f"# Parity: {report['candidate']} vs {report['reference']} (int8)\n\n"
            f"Gate: top-1 agreement >= {t['min_top1']:.0%} and mean KL(fp32 || int8) <= {t['max_kl_mean_nats']:g} "
            f"nats, {t['judged']}. Result: **{'pass' if report['passed'] else 'FAIL'}**\n\n")
    atomic_write_text(md, head + src.rstrip("\n") + "\n\nEvery case:\n\n" + rows.rstrip("\n") + "\n")
    return j, md


def manifest_entry(report: dict) -> dict:
    """The manifest's parity summary of the int8 gate (the keys of the other precisions' entries,
    and the gate's thresholds and pooled values)."""
    return {"passed": report["passed"], "precision": "int8", "reference": report["reference"],
            "thresholds": report["thresholds"], "sources": report["sources"],
            "worst_max_abs": max(c["max_abs"] for c in report["cases"]),
            "min_top1": min(p["top1"] for p in report["sources"].values()),
            "max_kl_mean": max(p["kl_mean"] for p in report["sources"].values()), "cases": len(report["cases"])}


def gate_int8(out_dir, cfg, max_len: int, text_ids=None, threads: int | None = None, min_top1: float = MIN_TOP1,
              max_kl: float = MAX_KL, progress=None) -> dict:
    """Gate ``out_dir/model_int8.onnx`` against ``out_dir/model.onnx`` (``int8_parity``; ``cfg``:
    the model's configuration), write ``parity_onnx_int8.{json,md}`` and return the manifest
    entry. Raises ``Int8ParityError`` (one line) when the gate fails."""
    out = Path(out_dir)
    report = int8_parity(out / "model.onnx", out / "model_int8.onnx", cfg.chunk_size, max_len, cfg.vocab_size,
                         text_ids, threads, min_top1, max_kl, progress=progress)
    write_report(report, out)
    if not report["passed"]:
        raise Int8ParityError(verdict(report))
    return manifest_entry(report)


def export_int8(model, out_dir, max_len: int, inline: bool = False, log=print) -> dict:
    """Write the int8 graphs beside the fp32 export in ``out_dir`` (their fp32 tensors read from
    its ``weights.onnx.data``); returns {file name: path}."""
    from .export import ExportSpec, export_onnx

    out = Path(out_dir)
    if not (out / "model.onnx").is_file():
        raise BSBRExportError(f"{out}: no fp32 model.onnx to export the int8 graphs beside")
    return export_onnx(model, out, ExportSpec(max_seq_len=max_len, inline=inline, int8=True),
                       progress=lambda m: log(f"    {m}"))
