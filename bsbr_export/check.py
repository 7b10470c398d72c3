"""Parity: any runner against the PyTorch model, over a grid of sequence lengths and batches.

Per case: max abs error, max relative error, cosine similarity, top-1 agreement and
KL(reference || runner) of next-token distributions. A case passes when the max abs
error of the logits is within the precision's tolerance and top-1 agreement is 100%
for fp32 (99% otherwise).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Max abs logits error allowed against torch fp32, per precision of the runner.
TOLERANCES = {"fp32": 1e-4}
MIN_TOP1 = {"fp32": 1.0}


def grid_lengths(chunk: int, max_len: int) -> list[int]:
    """{1, L-1, L, L+1, 2L+3, 4L, max}, clipped to [1, max]."""
    raw = [1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, 4 * chunk, max_len]
    return sorted({n for n in raw if 1 <= n <= max_len})


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, out: np.ndarray) -> dict:
    """Metrics between reference and candidate logits of shape (..., V)."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(out64 - ref64)
    lp, lq = log_softmax(ref64), log_softmax(out64)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    a, b = ref64.reshape(-1, ref.shape[-1]), out64.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref64) + 1e-6)).max()),
        "cosine_min": float(cos.min()),
        "top1": float((ref.argmax(-1) == out.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


@dataclass
class Case:
    source: str
    batch: int
    seq: int
    max_abs: float
    max_rel: float
    cosine_min: float
    top1: float
    kl_mean: float
    kl_max: float
    atol: float
    passed: bool
    baseline_max_abs: float | None = None


def make_inputs(source: str, batch: int, seq: int, vocab: int, text_ids: np.ndarray | None, seed: int):
    rng = np.random.default_rng(seed)
    if source == "random" or text_ids is None or len(text_ids) < seq + 1:
        return rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    starts = rng.integers(0, len(text_ids) - seq, size=batch)
    return np.stack([text_ids[s:s + seq] for s in starts]).astype(np.int64)


def check_parity(reference, candidate, chunk: int, max_len: int, vocab: int, text_ids=None,
                 precision: str = "fp32", batches=(1, 3), lengths=None, atol: float | None = None,
                 baseline=None, factor: float = 3.0, progress=None) -> dict:
    """Run both runners on the grid; returns {"cases": [...], "passed": bool, ...}.

    With a ``baseline`` runner (e.g. torch in fp16), each case's tolerance is measured:
    ``factor`` times the baseline's own distance from the reference on the same input,
    and top-1 agreement may trail the baseline's by at most one point.
    """
    if baseline is None:
        atol = TOLERANCES[precision] if atol is None else atol
    min_top1 = MIN_TOP1.get(precision, 0.99)
    lengths = lengths or grid_lengths(chunk, max_len)
    sources = ["heldout", "random"] if text_ids is not None else ["random"]
    cases = []
    for si, source in enumerate(sources):
        for b in batches:
            for n in lengths:
                ids = make_inputs(source, b, n, vocab, text_ids, seed=1000 * si + 10 * b + n)
                ref = reference.infer({"input_ids": ids})["logits"]
                out = candidate.infer({"input_ids": ids})["logits"]
                m = compare_logits(ref, out)
                base, tol, top1_floor = None, atol, min_top1
                if baseline is not None:
                    bm = compare_logits(ref, baseline.infer({"input_ids": ids})["logits"])
                    base, tol = bm["max_abs"], factor * bm["max_abs"] + 1e-4
                    top1_floor = min(min_top1, bm["top1"] - 0.01)
                ok = m["max_abs"] <= tol and m["top1"] >= top1_floor
                cases.append(Case(source, b, n, atol=tol, passed=ok, baseline_max_abs=base, **m))
                if progress:
                    progress(cases[-1])
    tolerance = (f"{factor:g}x the {baseline.name} distance per case" if baseline is not None
                 else f"logits max abs <= {atol:.1e}")
    return {"precision": precision, "tolerance": tolerance, "min_top1": min_top1, "lengths": lengths,
            "passed": all(c.passed for c in cases), "cases": [asdict(c) for c in cases]}


def markdown_table(report: dict, only_failed: bool = False) -> str:
    rows = ["| source | batch | seq | max abs | tolerance | max rel | min cosine | top-1 | mean KL | pass |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        if only_failed and c["passed"]:
            continue
        rows.append(f"| {c['source']} | {c['batch']} | {c['seq']} | {c['max_abs']:.2e} | {c['atol']:.2e} | "
                    f"{c['max_rel']:.2e} | "
                    f"{c['cosine_min']:.6f} | {c['top1']:.2%} | {c['kl_mean']:.2e} | "
                    f"{'yes' if c['passed'] else 'NO'} |")
    return "\n".join(rows)


def write_report(report: dict, out_dir, stem: str = "parity") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(report, indent=2) + "\n")
    head = (f"# Parity: {report.get('candidate', 'runner')} vs torch fp32 ({report['precision']})\n\n"
            f"Tolerance: {report['tolerance']}, top-1 >= {report['min_top1']:.0%}. "
            f"Result: **{'pass' if report['passed'] else 'FAIL'}**\n\n")
    md.write_text(head + markdown_table(report) + "\n")
    return j, md
