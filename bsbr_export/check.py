"""Parity: any runner against the PyTorch model, over a grid of sequence lengths and batches.

Per case: max abs error, max relative error, cosine similarity, top-1 agreement and
KL(reference || runner) of next-token distributions. A case passes when the max abs
error of the logits is within the precision's tolerance and top-1 agreement is 100%
for fp32 (99% otherwise).

Memory: the statistics are running reductions (``LogitStats``), fed one batch row and one
slice of positions at a time, so no float64 copy of a whole [batch, T, vocab] tensor is
made. The candidate runs on the whole batch (what is compared never changes); the
reference and the baseline run one batch row at a time and are reduced against the
candidate's row, so that at most one full candidate output and one reference row are
resident at once. ``peak_bytes`` estimates the largest case before anything runs.

One model at a time: ``RecordedReference`` runs the reference (and the fp16 baseline) over the
whole grid first and keeps its logits in one file on disk, row by row; the reference model can
then be freed before the candidate's session is created, so the weights are held once, not
twice. The statistics are the same as with the live reference (the same rows are compared).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .util import kl_from_logprobs, log_softmax, release_free_memory

# Max abs logits error allowed against torch fp32, per precision of the runner.
TOLERANCES = {"fp32": 1e-4}
MIN_TOP1 = {"fp32": 1.0}
# float64 bytes of one compared slice (per array); a slice is this many bytes of positions.
SLICE_BYTES = 64 << 20
BATCHES = (1, 3)


def grid_lengths(chunk: int, max_len: int) -> list[int]:
    """{1, L-1, L, L+1, 2L+3, 4L, max}, clipped to [1, max]."""
    raw = [1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, 4 * chunk, max_len]
    return sorted({n for n in raw if 1 <= n <= max_len})


class LogitStats:
    """Running max abs/rel error, min cosine, top-1 agreement and KL over slices of positions.

    ``update(ref, out)`` takes (..., V) slices; ``result()`` equals ``compare_logits`` on the
    concatenation of every slice (the same formulas, in float64)."""

    def __init__(self):
        self.max_abs = self.max_rel = 0.0
        self.cosine_min = math.inf
        self.kl_max = -math.inf
        self.kl_sum = 0.0
        self.hits = self.n = 0

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        V = ref.shape[-1]
        ref = ref.reshape(-1, V)
        out = out.reshape(-1, V)
        if not len(ref):
            return
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        diff = np.abs(out64 - ref64)
        self.max_abs = max(self.max_abs, float(diff.max()))
        diff /= np.abs(ref64) + 1e-6
        self.max_rel = max(self.max_rel, float(diff.max()))
        del diff
        cos = (ref64 * out64).sum(-1) / (np.linalg.norm(ref64, axis=-1) * np.linalg.norm(out64, axis=-1) + 1e-30)
        self.cosine_min = min(self.cosine_min, float(cos.min()))
        kl = kl_from_logprobs(log_softmax(ref64), log_softmax(out64))
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.hits += int((ref.argmax(-1) == out.argmax(-1)).sum())
        self.n += len(ref)

    def result(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "cosine_min": self.cosine_min,
                "top1": self.hits / self.n, "kl_mean": self.kl_sum / self.n, "kl_max": self.kl_max}


def slice_rows(vocab: int) -> int:
    """Positions per compared slice."""
    return max(1, SLICE_BYTES // (8 * vocab))


def reduce_row(stats: LogitStats, ref_row: np.ndarray, out_row: np.ndarray) -> None:
    """Feed one batch row (T, V) to ``stats``, a slice of positions at a time."""
    step = slice_rows(ref_row.shape[-1])
    for s in range(0, ref_row.shape[0], step):
        stats.update(ref_row[s:s + step], out_row[s:s + step])


def compare_logits(ref: np.ndarray, out: np.ndarray) -> dict:
    """Metrics between reference and candidate logits of shape (..., V)."""
    V = ref.shape[-1]
    stats = LogitStats()
    reduce_row(stats, ref.reshape(-1, V), out.reshape(-1, V))
    return stats.result()


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


# The parity session's options, recorded in the manifest. No CPU arena and no memory pattern:
# at GPT-2 size x 8192 tokens x batch 3 they hold about 3 GiB beyond the output itself.
# Prepacking stays on: the session owns its weights and drops each packed weight's original, so
# the peak is the same either way (gpt2-medium shape, batch 3 x 1024 tokens: 4.39 GiB with, 4.29
# without) and the time per call within noise; without it the weights are mapped from the file
# lazily (1.58 vs 0.26 GiB right after loading) but every page is touched by the first run.
# Large C-heap blocks get their own mappings (``map_large_allocations``).
PARITY_SESSION = {"arena": False, "memory_pattern": False, "prepacking": True, "malloc_mmap_threshold": 1 << 20}


def lean_ort_runner(onnx_path, threads: int | None = None, prepacking: bool = PARITY_SESSION["prepacking"]):
    """An ``ORTRunner`` with the parity session's options (``PARITY_SESSION``)."""
    from .runtime import ORTRunner

    config = None if prepacking else {"session.disable_prepacking": "1"}
    return ORTRunner(onnx_path, threads=threads, arena=False, config=config)


def candidate_logits(runner, ids: np.ndarray, vocab: int) -> np.ndarray:
    """The candidate's logits for the whole batch. ONNX Runtime writes them straight into one
    numpy buffer (IO binding) and hands its arena's free chunks back after the run, so the
    process keeps one copy of the output, not two."""
    from .runtime import ORTRunner, check_feeds

    if not isinstance(runner, ORTRunner) or runner.session is None:
        return runner.infer({"input_ids": ids})["logits"]
    import onnxruntime as ort

    ids = check_feeds({"input_ids": ids}, runner.max_seq_len, runner.vocab_size)
    release_free_memory()
    out = np.empty((*ids.shape, vocab), dtype=np.float32)
    binding = runner.session.io_binding()
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    opts = ort.RunOptions()
    if runner.session.get_session_options().enable_cpu_mem_arena:
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    runner.session.run_with_iobinding(binding, opts)
    return out


def compare_case(reference, candidate, ids: np.ndarray, vocab: int, baseline=None) -> tuple[dict, dict | None]:
    """Statistics of one case (and of the baseline, if any) against the reference, row by row."""
    out = candidate_logits(candidate, ids, vocab)
    recorded = isinstance(baseline, RecordedBaseline)
    stats, bstats = LogitStats(), (LogitStats() if baseline is not None and not recorded else None)
    for r in range(ids.shape[0]):
        row = ids[r:r + 1]
        ref = reference.infer({"input_ids": row})["logits"][0]
        reduce_row(stats, ref, out[r])
        if bstats is not None:
            reduce_row(bstats, ref, baseline.infer({"input_ids": row})["logits"][0])
        del ref
    if recorded:
        return stats.result(), baseline.case_result(ids)
    return stats.result(), (bstats.result() if bstats is not None else None)


def grid_cases(chunk: int, max_len: int, vocab: int, text_ids=None, batches=BATCHES, lengths=None):
    """Every case of the grid as (source, batch, seq, ids), in the order ``check_parity`` runs them."""
    lengths = lengths or grid_lengths(chunk, max_len)
    sources = ["heldout", "random"] if text_ids is not None else ["random"]
    return [(source, b, n, make_inputs(source, b, n, vocab, text_ids, seed=1000 * si + 10 * b + n))
            for si, source in enumerate(sources) for b in batches for n in lengths]


def _row_key(ids: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).digest()


class RecordedReference:
    """A reference runner's logits for a list of inputs, recorded once into one file.

    ``record`` runs ``reference`` one batch row at a time and appends each row's float32 logits
    to ``path``; with a ``baseline`` runner, each case's baseline statistics against the
    reference are reduced at the same time (the baseline is compared with the reference only).
    Afterwards ``infer`` answers a recorded row from the file (one row resident at a time) and
    ``baseline`` stands for the recorded baseline in ``check_parity``. Rows are looked up by
    their token ids, so the grid needs no bookkeeping beyond the inputs themselves.
    """

    def __init__(self, path, cfg=None, name: str = "torch"):
        self.path, self.cfg, self.name = Path(path), cfg, name
        self.rows: dict[bytes, tuple[int, tuple]] = {}
        self.baseline: RecordedBaseline | None = None
        self.bytes = 0

    def record(self, reference, inputs, baseline=None, progress=None) -> "RecordedReference":
        if baseline is not None:
            self.baseline = RecordedBaseline(baseline.name)
        with open(self.path, "ab") as f:
            for ids in inputs:
                bstats = LogitStats() if baseline is not None else None
                for r in range(ids.shape[0]):
                    row = ids[r:r + 1]
                    ref = reference.infer({"input_ids": row})["logits"][0]
                    key = _row_key(row)
                    if key not in self.rows:
                        self.rows[key] = (f.tell(), ref.shape)
                        np.ascontiguousarray(ref, dtype=np.float32).tofile(f)
                    if bstats is not None:
                        reduce_row(bstats, ref, baseline.infer({"input_ids": row})["logits"][0])
                    del ref
                if bstats is not None:
                    self.baseline.stats[_row_key(ids)] = bstats.result()
                if progress:
                    progress(ids)
            self.bytes = f.tell()
        return self

    def infer(self, feeds: dict) -> dict:
        ids = np.asarray(feeds["input_ids"])
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"a recorded reference answers one row at a time, got input_ids {ids.shape}")
        try:
            offset, shape = self.rows[_row_key(ids)]
        except KeyError:
            raise KeyError(f"no recorded reference row for these {ids.shape[1]} token ids") from None
        out = np.fromfile(self.path, dtype=np.float32, count=int(np.prod(shape)), offset=offset)
        return {"logits": out.reshape(1, *shape)}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class RecordedBaseline:
    """The baseline's statistics against the reference, per case (see ``RecordedReference``)."""

    def __init__(self, name: str):
        self.name, self.stats = name, {}

    def case_result(self, ids: np.ndarray) -> dict:
        return self.stats[_row_key(ids)]


def check_parity(reference, candidate, chunk: int, max_len: int, vocab: int, text_ids=None,
                 precision: str = "fp32", batches=BATCHES, lengths=None, atol: float | None = None,
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
    cases = []
    for source, b, n, ids in grid_cases(chunk, max_len, vocab, text_ids, batches, lengths):
        m, bm = compare_case(reference, candidate, ids, vocab, baseline)
        base, tol, top1_floor = None, atol, min_top1
        if bm is not None:
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


# --------------------------------------------------------------------------- memory

def n_params(cfg) -> int:
    """Parameters of the BSBR model (tied embedding counted once)."""
    E, inner = cfg.n_embd, cfg.inner_dim
    layer = 4 * E * E + 4 * E + 2 * E * inner + inner + E + 4 * E + 2 * E * E + 2 * E + cfg.n_head
    return cfg.vocab_size * E + cfg.n_positions * E + cfg.n_layer * layer + 2 * E


def record_bytes(cfg, max_len: int, batches=BATCHES, lengths=None, text: bool = True) -> int:
    """Bytes of the reference logits a ``RecordedReference`` writes for the grid."""
    lengths = lengths or grid_lengths(cfg.chunk_size, max_len)
    return (2 if text else 1) * sum(batches) * sum(lengths) * cfg.vocab_size * 4


def peak_bytes(cfg, max_len: int, batches=BATCHES, baseline: bool = False, fp16: bool = False,
               recorded: bool = False) -> int:
    """Estimated peak resident memory of the parity grid's largest case (batch max x max_len).

    The candidate's full output (an fp16 graph also holds its fp16 logits before the final
    Cast; an fp32 graph's LM head writes straight into the output), one reference row (and one
    baseline row), the compared float64 slices, the weights of torch and of the ONNX session,
    the activations of one layer, and the process. With ``recorded`` (the reference recorded
    first, its model freed), the torch weights and the session's are never held together: the
    peak is the larger of the two phases.
    """
    B, T, V, E = max(batches), max_len, cfg.vocab_size, cfg.n_embd
    out = B * T * V * 4
    inner_gemm = (B * T * V * 2 if fp16 else 0) + 2 * B * T * E * 4
    act = B * T * (3 * cfg.inner_dim + 8 * E) * 4 + 2 * B * cfg.n_head * T * cfg.chunk_size * 4
    rows = T * V * 4 * (2 if baseline else 1) + T * (3 * cfg.inner_dim + 8 * E) * 4
    torch_weights = n_params(cfg) * (4 + (2 if baseline else 0))
    session_weights = n_params(cfg) * (2 if fp16 else 4)
    process = 15 << 28  # 3.75 GiB: torch, the ONNX session and what the run leaves, measured at GPT-2 size x 8192
    # During the candidate's run: its output plus the fp16 logits (or the activations);
    # afterwards: its output, one reference (and baseline) row and the compared slices.
    candidate = out + max(inner_gemm, act, rows + 8 * SLICE_BYTES) + session_weights
    if recorded:
        return max(candidate, torch_weights + rows + 8 * SLICE_BYTES) + process
    return candidate + torch_weights + process


def available_bytes() -> int | None:
    """MemAvailable (else MemTotal) from /proc/meminfo; None where it cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    except OSError:
        return None
    for key in ("MemAvailable", "MemTotal"):
        if key in fields:
            return int(fields[key].split()[0]) * 1024
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------- recorded configuration

def config_difference(meta: dict, cfg, precision: str | None = None) -> str | None:
    """The first difference between a graph's recorded ``bsbr_export`` metadata and a model's
    configuration (and the requested precision), as one phrase; None when they agree."""
    if not meta or "config" not in meta:
        return "the graph has no bsbr_export metadata (not written by bsbr-export)"
    mine = cfg.to_dict()
    for key, theirs in meta["config"].items():
        if key in mine and mine[key] != theirs:
            return f"{key}: the graph was exported with {theirs!r}, the model has {mine[key]!r}"
    missing = sorted(set(mine) - set(meta["config"]))
    if missing:
        return f"{missing[0]}: not recorded in the graph (exported by another version)"
    if precision is not None and meta.get("precision", "fp32") != precision:
        return f"precision: the graph is {meta.get('precision', 'fp32')}, --precision is {precision}"
    max_len = meta.get("max_seq_len")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        return f"max_seq_len: the graph records {max_len!r}, not a positive integer"
    return None


# --------------------------------------------------------------------------- reports

def markdown_table(report: dict, only_failed: bool = False) -> str:
    from .util import markdown_table as table

    rows = [[c["source"], c["batch"], c["seq"], f"{c['max_abs']:.2e}", f"{c['atol']:.2e}", f"{c['max_rel']:.2e}",
             f"{c['cosine_min']:.6f}", f"{c['top1']:.2%}", f"{c['kl_mean']:.2e}", "yes" if c["passed"] else "NO"]
            for c in report["cases"] if not (only_failed and c["passed"])]
    return table(["source", "batch", "seq", "max abs", "tolerance", "max rel", "min cosine", "top-1", "mean KL",
                  "pass"], rows).rstrip("\n")


def write_report(report: dict, out_dir, stem: str = "parity") -> tuple[Path, Path]:
    from .util import atomic_write_text

    out = Path(out_dir)
    j, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(j, json.dumps(report, indent=2) + "\n")
    head = (f"# Parity: {report.get('candidate', 'runner')} vs torch fp32 ({report['precision']})\n\n"
            f"Tolerance: {report['tolerance']}, top-1 >= {report['min_top1']:.0%}. "
            f"Result: **{'pass' if report['passed'] else 'FAIL'}**\n\n")
    atomic_write_text(md, head + markdown_table(report) + "\n")
    return j, md
