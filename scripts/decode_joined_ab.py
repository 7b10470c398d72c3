"""What the joined session costs a decode step: ``Engine()`` (the prompt and per-token graphs as
one ORT session, an If on a bool input: ``runtime.joined``) against ``Engine(join=False)`` (a
session per graph), stepped alternately in one process, made in each order in two fresh processes.

Both engines hold a state of ``--rows`` rows filled with random values of ``--context`` tokens
(``bench_decode_batch.filled_state``). ORT's thread spinning is off in both
(``session.intra_op.allow_spinning = 0``; ``--spin`` leaves it on): with it on, the idle
engine's threads spin while the other runs and slow it. Reported per row count: median and
mean step of each, and the median of the rounds' ratios (joined / separate).

    python scripts/decode_joined_ab.py WORK [--rows 1,16] [--context 256] [--steps 100]
        [--out docs/results/decode-joined.md]

WORK: ``bench_decode_batch.py``'s working directory (its BSBR export is made there when missing).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import filled_state, prepare  # noqa: E402


def steps_of(path: str, rows: int, context: int, steps: int, threads: int, spin: bool, reverse: bool = False) -> dict:
    """{"joined": ms per step, "separate": ...}: the two engines made in the given order (the
    joined one first; ``reverse``: the separate one), stepped alternately, each round starting
    with the other engine than the round before."""
    from bsbr_export.bench.profile import QUIET
    from bsbr_export.runtime.engine import Engine

    so = {} if spin else QUIET
    order = ["separate", "joined"] if reverse else ["joined", "separate"]
    engines = {n: Engine(path, threads=threads, session_options=so, join=n == "joined") for n in order}
    rng = np.random.default_rng(0)
    states = {name: filled_state(eng, rows, context, rng, context + steps + 3) for name, eng in engines.items()}
    tok, times = np.ones(rows, np.int64), {n: [] for n in engines}
    for i in range(steps + 3):
        for name in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            engines[name].decode(states[name], tok)
            if i >= 3:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: np.array(t) for n, t in times.items()}


def measure(path: str, rows: int, context: int, steps: int, threads: int, spin: bool = False) -> dict:
    """``steps_of`` in both construction orders (``bench.jobs.in_both_orders``), steps pooled."""
    from bsbr_export.bench.jobs import in_both_orders

    runs = in_both_orders(steps_of, path, rows, context, steps, threads, spin)
    j, s = (np.concatenate([r[n] for r in runs]) for n in ("joined", "separate"))
    return {"rows": rows, "joined": float(np.median(j)), "separate": float(np.median(s)),
            "joined_mean": float(j.mean()), "separate_mean": float(s.mean()), "ratio": float(np.median(j / s))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="bench_decode_batch.py's working directory")
    ap.add_argument("--rows", default="1,16", help="row counts, comma-separated [1,16]")
    ap.add_argument("--context", type=int, default=256, help="tokens each row holds [256]")
    ap.add_argument("--steps", type=int, default=100, help="timed rounds [100]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--max-len", type=int, default=8192, help="the BSBR export's maximum length [8192]")
    ap.add_argument("--spin", action="store_true", help="leave ORT's thread spinning on (its default)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/decode-joined.md"), help="Markdown to write")
    a = ap.parse_args(argv)
    try:
        rows = [int(r) for r in a.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be integers separated by commas, got {a.rows!r}")
    if min(rows) < 1 or a.context < 1 or a.steps < 1 or a.threads < 1 or a.context + a.steps + 3 > a.max_len:
        ap.error("--rows, --context, --steps and --threads must be >= 1, and the run must fit --max-len")
    path = str(prepare(a.work, a.max_len, ["bsbr"], None, lambda m: print(m, flush=True))["bsbr"])
    res = [measure(path, r, a.context, a.steps, a.threads, a.spin) for r in rows]
    import onnxruntime as ort

    from bsbr_export.util import atomic_write_text, machine_line, markdown_table

    cmd = shlex.join(["python", "scripts/decode_joined_ab.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "## Decode step: the joined prompt + per-token session against a session per graph", "",
        f"`{cmd}`: GPT-2 small shape, random weights, fp32, the default conversion, exported by "
        f"`bench_decode_batch.py`; two engines in one process stepped alternately (each round starting with "
        f"the other), {a.steps} rounds after 3, "
        f"in each of two fresh processes that make them in opposite orders, the rounds pooled; "
        f"{a.context} tokens of context, ORT thread spinning {'on' if a.spin else 'off'}; onnxruntime {ort.__version__}, {a.threads} "
        f"threads; {machine_line()}.", "",
        markdown_table(["rows", "joined ms (median)", "separate ms (median)", "joined ms (mean)",
                        "separate ms (mean)", "joined / separate (median of the rounds' ratios)"],
                       [[r["rows"], f"{r['joined']:.1f}", f"{r['separate']:.1f}", f"{r['joined_mean']:.1f}",
                         f"{r['separate_mean']:.1f}", f"{r['ratio']:.3f}x"] for r in res]), ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
