"""What a piece of a prompt costs on a row that already holds tokens (``Engine.extend``).

A conversation's next turn, or the part of a prompt a prefix cache entry does not cover, is fed
to a row that holds tokens. ``Engine.extend`` runs it through the extend graph, or, for a piece
of at most ``STEP_PIECES`` tokens while tokens x the state's rows <= ``STEP_ROWS``, as per-token
steps. Per context (the tokens row 0 holds), state rows and piece length: the time of
``extend`` as a user gets it (median of ``--runs``, the state restored before each call), the
route it took, the extend graph's time for the same piece (the steps route switched off), and
one per-token step of the whole state. GPT-2 small shape, random weights, the BSBR export of
``bench_decode_batch.py``.

    python scripts/bench_extend_pieces.py WORK [--contexts 300,4000] [--pieces 1,2,3,4,8,16,128]
        [--rows 1,4,16] [--runs 5] [--max-len 8448] [--out docs/results/extend-pieces.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import prepare  # noqa: E402


def timed(fn, restore, runs: int) -> float:
    """Median ms of ``fn()`` over ``runs`` calls, ``restore()`` (untimed) before each."""
    out = []
    for _ in range(runs + 1):
        restore()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out[1:]))


def measure(path: str, contexts, pieces, rows_list, runs: int, threads: int) -> list[dict]:
    from bsbr_export.runtime import engine as eng_mod

    eng = eng_mod.Engine(path, threads=threads)
    rng = np.random.default_rng(0)
    out = []
    for ctx in contexts:
        held = eng.new_state(1)
        eng.prefill(held, [0], [rng.integers(0, eng.vocab_size, ctx)])
        snapshot = held.rows([0])
        for B in rows_list:
            st = eng.new_state(B)
            restore = lambda: st.set_rows([0], snapshot, ctx)  # noqa: E731
            tok = np.zeros(B, np.int64)
            step = timed(lambda: eng.decode(st, tok), restore, runs)
            for T in pieces:
                ids = rng.integers(0, eng.vocab_size, T)
                steps = T <= eng_mod.STEP_PIECES and T * B <= eng_mod.STEP_ROWS
                ms = timed(lambda: eng.extend(st, [0], [ids]), restore, runs)
                saved = eng_mod.STEP_PIECES
                eng_mod.STEP_PIECES = 0  # the extend graph for every piece
                try:
                    graph = timed(lambda: eng.extend(st, [0], [ids]), restore, runs)
                finally:
                    eng_mod.STEP_PIECES = saved
                out.append({"context": ctx, "rows": B, "piece": T, "route": "per-token steps" if steps else "extend graph",
                            "extend_ms": ms, "graph_ms": graph, "step_ms": step})
                print(f"context {ctx} rows {B} piece {T}: {ms:.1f} ms ({out[-1]['route']}), graph {graph:.1f}, "
                      f"step {step:.1f}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("work", type=Path, help="working directory (models and exports, kept between runs)")
    ap.add_argument("--contexts", default="300,4000", help="tokens row 0 holds before the piece [300,4000]")
    ap.add_argument("--pieces", default="1,2,3,4,8,16,128", help="piece lengths [1,2,3,4,8,16,128]")
    ap.add_argument("--rows", default="1,4,16", help="rows of the state [1,4,16]")
    ap.add_argument("--runs", type=int, default=5, help="timed calls per case [5]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--max-len", type=int, default=8448, help="the BSBR export's maximum length [8448]")
    ap.add_argument("--out", type=Path, default=Path("docs/results/extend-pieces.md"), help="Markdown fragment")
    a = ap.parse_args(argv)
    try:
        contexts, pieces, rows = ([int(x) for x in v.split(",")] for v in (a.contexts, a.pieces, a.rows))
    except ValueError:
        ap.error("--contexts, --pieces and --rows take integers separated by commas")
    if min(contexts + rows) < 1 or min(pieces) < 1 or a.runs < 1 or a.threads < 1 \
            or max(contexts) + max(pieces) > a.max_len:
        ap.error("contexts, pieces, rows, --runs and --threads must be >= 1, and a context plus a piece within "
                 "--max-len")
    path = prepare(a.work, a.max_len, ["bsbr"], None, lambda m: print(m, flush=True))["bsbr"]
    res = measure(path, contexts, pieces, rows, a.runs, a.threads)

    import onnxruntime as ort

    from bsbr_export.util import atomic_write_text, machine_line, markdown_table

    cmd = shlex.join(["python", "scripts/bench_extend_pieces.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "## A piece of a prompt on a row that holds tokens: extend graph or per-token steps", "",
        f"`{cmd}`: GPT-2 small shape, random weights, fp32, the BSBR export of `bench_decode_batch.py` (the default "
        f"conversion, {a.max_len} tokens); row 0 of a state holds the context's tokens (random), then takes the piece "
        f"through `Engine.extend` (median of {a.runs} calls, the state restored before each); the graph column: the "
        f"same piece with the per-token route switched off; a step: one `Engine.decode` of the whole state; "
        f"onnxruntime {ort.__version__}, {a.threads} threads; {machine_line()}.", "",
        markdown_table(["context", "state rows", "piece tokens", "extend ms", "route", "extend graph ms",
                        "one step of the state ms"],
                       [[r["context"], r["rows"], r["piece"], f"{r['extend_ms']:.1f}", r["route"],
                         f"{r['graph_ms']:.1f}", f"{r['step_ms']:.1f}"] for r in res]), ""])
    atomic_write_text(a.out, text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
