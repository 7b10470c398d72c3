"""A decode step of many rows against a step of one row, timed in pairs in one process.

``bench_decode_batch.py`` times each batch in a process of its own; on a shared machine the same
one-row step then differs between processes by more than the target's margin (GPT-2 small,
context 256 against 8192, same work: 25.1 against 20.4 ms in one run). Here one engine holds a
state of 1 row and a state of ``--rows`` rows, both filled with random values of ``--context``
tokens (``bench_decode_batch.filled_state``) and banks reserved for the whole run; each
round steps the one-row state, then the many-row state, back to back. Reported: the median step
of each, the mean (chunk closes included: any 128 consecutive steps hold one close per row), and
the median and mean of the rounds' ratios. With ``--floor``, each round also runs the dense floor
(the same GPT-2 with attention removed: every dense weight read once per step, what no decode
can undercut) on one token of 1 row and of ``--rows`` rows, so the floor's own ratio of rows
stands beside BSBR's.

    python scripts/decode_rows_paired.py WORK [--rows 16] [--context 256] [--steps 128] [--threads 2]
        [--floor] [--out docs/results/decode-rows-paired.md]

WORK: ``bench_decode_batch.py``'s working directory (the random GPT-2 small and its BSBR export,
made there when missing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import filled_state, prepare  # noqa: E402


def floor_graph(work: Path) -> Path:
    """The dense floor of ``work``'s random GPT-2 (attention removed, no state), exported once."""
    from bsbr_export.bench.profile import export_prefill

    out = work / "floor" / "model.onnx"
    return out if out.is_file() else export_prefill(work / "hf", out.parent, 1024, "none")


def stats(one, many) -> dict:
    one, many = np.array(one), np.array(many)
    return {"one_median": float(np.median(one)), "one_mean": float(one.mean()), "many_median": float(np.median(many)),
            "many_mean": float(many.mean()), "ratio_median": float(np.median(many / one)),
            "ratio_of_means": float(many.mean() / one.mean())}


def measure(path: str, rows: int, context: int, steps: int, warmup: int, threads: int, floor=None) -> dict:
    from bsbr_export.runtime.engine import Engine

    # Two sessions stepped in turn: with ORT's thread spinning on, each one's idle threads spin through
    # the other's run (a step then costs about twice as much), so with the floor neither spins.
    quiet = {"session.intra_op.allow_spinning": "0"} if floor else None
    eng = Engine(path, threads=threads, session_options=quiet)
    rng = np.random.default_rng(0)
    states = {B: filled_state(eng, B, context, rng, context + warmup + steps) for B in (1, rows)}
    tok = {B: np.ones(B, np.int64) for B in states}
    times = {B: [] for B in states} | {("floor", B): [] for B in states if floor}
    sess = None
    if floor:
        from bsbr_export.runtime import session_from_onnx

        sess = session_from_onnx(str(floor), threads, ["CPUExecutionProvider"], config=quiet)
    for i in range(warmup + steps):
        for B, st in states.items():
            t0 = time.perf_counter()
            tok[B] = eng.decode(st, tok[B]).argmax(-1).astype(np.int64)
            if i >= warmup:
                times[B].append((time.perf_counter() - t0) * 1e3)
            if sess is not None:  # the floor's step of the same rows, right after
                t0 = time.perf_counter()
                sess.run(["logits"], {"input_ids": tok[B][:, None]})
                if i >= warmup:
                    times[("floor", B)].append((time.perf_counter() - t0) * 1e3)
    out = stats(times[1], times[rows])
    if floor:
        out["floor"] = stats(times[("floor", 1)], times[("floor", rows)])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="bench_decode_batch.py's working directory")
    ap.add_argument("--rows", type=int, default=16, help="rows of the many-row state [16]")
    ap.add_argument("--context", type=int, default=256, help="tokens each row holds at the start [256]")
    ap.add_argument("--steps", type=int, default=128, help="timed rounds [128]")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first [3]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--max-len", type=int, default=8192, help="the BSBR export's maximum length [8192]")
    ap.add_argument("--conversion", default=None, help="conversion options of the export (bench_decode_batch's)")
    ap.add_argument("--floor", action="store_true",
                    help="also the dense floor's one-token step of 1 and --rows rows, in the same rounds")
    ap.add_argument("--out", type=Path, default=Path("docs/results/decode-rows-paired.md"), help="Markdown to write")
    a = ap.parse_args(argv)
    if a.rows < 2 or a.context < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--rows must be >= 2; --context, --steps and --threads >= 1; --warmup >= 0")
    if a.context + a.warmup + a.steps > a.max_len:
        ap.error(f"--context + --warmup + --steps must fit the export's {a.max_len} tokens")
    path = prepare(a.work, a.max_len, ["bsbr"], None, lambda m: print(m, flush=True), a.conversion or "")["bsbr"]
    r = measure(str(path), a.rows, a.context, a.steps, a.warmup, a.threads, floor_graph(a.work) if a.floor else None)
    rows = [["median step", f"{r['one_median']:.1f}", f"{r['many_median']:.1f}",
             f"{r['ratio_median']:.2f}x (median of the rounds' ratios)"],
            ["mean step (closes included)", f"{r['one_mean']:.1f}", f"{r['many_mean']:.1f}",
             f"{r['ratio_of_means']:.2f}x (ratio of the means)"]]
    if a.floor:
        f = r["floor"]
        rows += [["dense floor, median step", f"{f['one_median']:.1f}", f"{f['many_median']:.1f}",
                  f"{f['ratio_median']:.2f}x (median of the rounds' ratios)"],
                 ["BSBR step / dense floor step (medians)", f"{r['one_median'] / f['one_median']:.2f}x",
                  f"{r['many_median'] / f['many_median']:.2f}x", ""]]
    import onnxruntime as ort

    from bsbr_export.util import atomic_write_text, machine_line, markdown_table

    cmd = " ".join(["python scripts/decode_rows_paired.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        f"## Decode: a step of {a.rows} rows against a step of one row, timed in pairs", "",
        f"`{cmd}`: GPT-2 small shape, random weights, fp32, the BSBR export of `bench_decode_batch.py` (its "
        f"conversion: {a.conversion or 'the default'}); one engine, a 1-row and a {a.rows}-row state of "
        f"{a.context} tokens each, stepped alternately, {a.steps} rounds after {a.warmup}"
        + (" (each step followed by the dense floor's step of the same rows: the same GPT-2 exported with "
           "attention removed, one token per row; ORT thread spinning off in both sessions, whose idle threads would "
           "otherwise spin through each other's runs)" if a.floor else "")
        + f"; onnxruntime {ort.__version__}, {a.threads} threads; {machine_line()}.", "",
        markdown_table(["", "1 row ms", f"{a.rows} rows ms", f"{a.rows} rows / 1 row"], rows), ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
