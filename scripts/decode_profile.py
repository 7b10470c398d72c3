"""Where a decode step's time goes: ORT's node times of the per-token graph at 1 row and at many.

One engine over ``bench_decode_batch.py``'s BSBR export (GPT-2 small shape, random weights), its
per-token session profiled by ORT; a 1-row and a ``--rows``-row state of ``--context`` random
tokens (``bench_decode_batch.filled_state``) each stepped ``--steps`` times after ``--warmup``;
per op type, the mean node time per step. Beside it the dense floor (the same GPT-2 exported with
attention removed, ``decode_rows_paired.floor_graph``) profiled the same way, and the bytes the
attention's matrix products read per step (the state's K/V window and S of every layer and row,
``ops.state.StateSpec``) with the rate that gives. Profiling adds its own cost to every node:
read the shares and the ratios, not the absolute times (``decode_rows_paired.py`` times steps).

    python scripts/decode_profile.py WORK [--rows 16] [--context 256] [--steps 30] [--threads 2]
        [--out docs/results/decode-profile.md]
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import filled_state, prepare  # noqa: E402
from decode_rows_paired import floor_graph, step_arguments  # noqa: E402

ATTENTION_PRODUCTS = ("MatMul", "FusedMatMul")  # q.K^T, p.V and q.S: the state the step reads


def mean_ops(runs: list) -> dict:
    """{op type: mean ms per run} over profiled runs (control-flow nodes, which enclose others, left out)."""
    out = {}
    for r in runs:
        for op, ms in r["op_types_ms"].items():
            if op not in ("If", "Loop", "Scan"):
                out[op] = out.get(op, 0.0) + ms / len(runs)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_engine(path: str, rows: int, context: int, steps: int, warmup: int, threads: int, prefix: str) -> dict:
    """Mean op-type times per step of the per-token graph at 1 row and at ``rows`` rows."""
    from bsbr_export.bench.profile import per_run_op_totals
    from bsbr_export.runtime.engine import Engine

    eng = Engine(path, threads=threads, profile=prefix)
    rng, spans, n = np.random.default_rng(0), {}, 0
    for B in (1, rows):
        st = filled_state(eng, B, context, rng, context + warmup + steps)
        tok = np.ones(B, np.int64)
        for _ in range(warmup + steps):
            tok = eng.decode(st, tok).argmax(-1).astype(np.int64)
        spans[B] = (n + warmup, n + warmup + steps)
        n += warmup + steps
    runs = per_run_op_totals(json.loads(Path(eng.sessions["decode"].end_profiling()).read_text()))
    runs = [r for r in runs if r["op_types_ms"]]  # closes run in their own session
    return {"spec": eng.spec, **{B: mean_ops(runs[lo:hi]) for B, (lo, hi) in spans.items()}}


def profile_floor(path: Path, rows: int, steps: int, warmup: int, threads: int, prefix: str) -> dict:
    from bsbr_export.bench.profile import per_run_op_totals
    from bsbr_export.runtime import session_from_onnx

    sess = session_from_onnx(str(path), threads, ["CPUExecutionProvider"], profile_prefix=prefix)
    for B in (1, rows):
        for _ in range(warmup + steps):
            sess.run(["logits"], {"input_ids": np.ones((B, 1), np.int64)})
    runs = per_run_op_totals(json.loads(Path(sess.end_profiling()).read_text()))
    n = warmup + steps
    return {1: mean_ops(runs[warmup:n]), rows: mean_ops(runs[n + warmup:2 * n])}


def state_read_bytes(spec, rows: int) -> int:
    """Bytes of K/V window and S that one step's attention reads (every layer and row)."""
    kv = 2 * spec.head * spec.window * spec.head_dim
    return rows * spec.layer * (kv + spec.head * spec.state_dim * spec.state_cols) * 4


def main(argv=None) -> None:
    ap = step_arguments(__doc__, 30, 5, 8448)
    ap.add_argument("--out", type=Path, default=Path("docs/results/decode-profile.md"), help="Markdown to write")
    a = ap.parse_args(argv)
    if a.rows < 2 or a.context < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--rows must be >= 2; --context, --steps and --threads >= 1; --warmup >= 0")
    if a.context + a.warmup + a.steps > a.max_len:
        ap.error(f"--context + --warmup + --steps must fit the export's {a.max_len} tokens")
    path = prepare(a.work, a.max_len, ["bsbr"], None, lambda m: print(m, flush=True), "")["bsbr"]
    with tempfile.TemporaryDirectory() as tmp:
        bsbr = profile_engine(str(path), a.rows, a.context, a.steps, a.warmup, a.threads, f"{tmp}/bsbr")
        floor = profile_floor(floor_graph(a.work), a.rows, a.steps, a.warmup, a.threads, f"{tmp}/floor")
    import onnxruntime as ort

    from bsbr_export.util import atomic_write_text, machine_line, markdown_table

    R = a.rows
    ops = sorted(set(bsbr[1]) | set(bsbr[R]), key=lambda op: -bsbr[R].get(op, 0.0))
    ms = lambda d, op: f"{d.get(op, 0.0):.2f}"  # noqa: E731
    table = [[op, ms(bsbr[1], op), ms(bsbr[R], op), ms(floor[1], op), ms(floor[R], op)] for op in ops]
    total = {k: sum(d.values()) for k, d in (("b1", bsbr[1]), ("bR", bsbr[R]), ("f1", floor[1]), ("fR", floor[R]))}
    table.append(["all nodes", *(f"{total[k]:.2f}" for k in ("b1", "bR", "f1", "fR"))])
    att = {B: sum(bsbr[B].get(op, 0.0) for op in ATTENTION_PRODUCTS) for B in (1, R)}
    read = {B: state_read_bytes(bsbr["spec"], B) for B in (1, R)}
    rate = [[f"{B} row{'s' if B > 1 else ''}", f"{read[B] / 2**20:.1f}", f"{att[B]:.2f}",
             f"{read[B] / (att[B] * 1e-3) / 1e9:.1f}"] for B in (1, R)]
    cmd = shlex.join(["python", "scripts/decode_profile.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        f"## Decode profile: where a step of 1 row and of {R} rows goes", "",
        f"`{cmd}`: GPT-2 small shape, random weights, fp32, the default conversion; the per-token graph "
        f"(ORT profile, mean node time per step over {a.steps} steps after {a.warmup}, states of {a.context} "
        f"random tokens) and the dense floor (attention removed) profiled the same way; onnxruntime "
        f"{ort.__version__}, {a.threads} threads; {machine_line()}. Profiling slows every node: compare "
        f"within a column, and against `decode_rows_paired.py` for step times.", "",
        markdown_table(["op type", "BSBR 1 row ms", f"BSBR {R} rows ms", "floor 1 row ms", f"floor {R} rows ms"], table),
        "", "The state the attention's matrix products (" + ", ".join(ATTENTION_PRODUCTS) + ") read per step "
        "(K/V window and S of every layer and row):", "",
        markdown_table(["rows", "state read MiB", "matrix products ms", "GB/s"], rate),
        "", f"{R} rows / 1 row, all nodes: BSBR {total['bR'] / total['b1']:.2f}x, dense floor "
        f"{total['fR'] / total['f1']:.2f}x; the attention's products add {att[R] - att[1]:.2f} ms from 1 to {R} rows.", ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
