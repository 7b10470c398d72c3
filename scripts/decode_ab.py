"""Decode step time of two BSBR exports, alternating step by step in one process (the fair way to
compare two conversions on a noisy machine: both see the same load).

    python scripts/decode_ab.py DIR_A DIR_B [--batches 1,16] [--contexts 256,8192] [--steps 256]
                                [--threads 2] [--md docs/results/decode-ab.md]

Each export's engine holds ``batch`` rows with a random state of ``context`` tokens (as
``scripts/bench_decode_batch.py`` sets it) and decodes its argmax; the two engines take turns,
one step each, for ``--steps`` steps after ``--warmup``. Reports the mean ms per step (chunk
closes included: any 128 consecutive steps hold one close per row) and the ratio B / A.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode_batch import random_bsbr_state  # noqa: E402
from bsbr_export.runtime.engine import Engine  # noqa: E402
from bsbr_export.util import atomic_write_text, machine_line, markdown_table  # noqa: E402


def conversion(d: Path) -> str:
    c = Engine(d, precision="fp32", threads=1).config  # the export's own record of its conversion
    return f"{c.get('local_window', 'chunk')} window, {c.get('retrieval_weights', 'softmax')} weights"


def stepper(path: Path, B: int, ctx: int, steps: int, threads: int):
    eng = Engine(path, precision="fp32", threads=threads)
    st = eng.new_state(B)
    st.set_rows(slice(None), random_bsbr_state(eng.spec, B, ctx, np.random.default_rng(0)), ctx)
    for r in range(B):
        eng.reserve(st, r, ctx + steps)
    tok = [np.ones(B, np.int64)]

    def step() -> float:
        t = time.perf_counter()
        logits = eng.decode(st, tok[0])
        dt = time.perf_counter() - t
        tok[0] = logits.argmax(-1).astype(np.int64)
        return dt
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="256,8192")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = []
    for ctx in (int(x) for x in a.contexts.split(",")):
        for B in (int(x) for x in a.batches.split(",")):
            sa, sb = (stepper(p, B, ctx, a.steps + a.warmup, a.threads) for p in (a.a, a.b))
            ta, tb = [], []
            for i in range(a.warmup + a.steps):
                da, db = sa(), sb()
                if i >= a.warmup:
                    ta.append(da)
                    tb.append(db)
            ma, mb = 1e3 * np.mean(ta), 1e3 * np.mean(tb)
            rows.append([B, ctx, f"{ma:.1f}", f"{mb:.1f}", f"{mb / ma:.3f}"])
            print(rows[-1], flush=True)
    cmd = shlex.join(["python", "scripts/decode_ab.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "## Decode step: two conversions, alternating step by step", "", f"    {cmd}", "",
        f"- A: {a.a} ({conversion(a.a)}); B: {a.b} ({conversion(a.b)})",
        f"- GPT-2 small shape, random weights, fp32, {a.threads} threads; {machine_line()}",
        f"- mean ms per step over {a.steps} steps after {a.warmup} warm-up, chunk closes included", "",
        markdown_table(["rows", "context", "A ms/step", "B ms/step", "B / A"], rows)])
    if a.md:
        atomic_write_text(a.md, text + "\n")
        print(f"wrote {a.md}")


if __name__ == "__main__":
    main()
