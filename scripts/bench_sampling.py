"""Time choosing the next token from GPT-2-sized logits: the old per-row float64 path against the
batched float32 path of ``bsbr_export.runtime.sampling.choose_rows``.

    old            per row: argmax, then a float64 log_softmax over the vocabulary, then the
                   token's entry (what every step paid before, logprobs asked or not)
    new greedy     choose_rows, greedy, no log-probabilities: one argmax over the batch
    new +logprobs  choose_rows, greedy, every row asking for its token's log-probability
                   (float32 row max / exponentials / sum, a few rows per pass)

Each figure is the median of ``--runs`` timed calls (after ``--warmup`` untimed ones) on the
same float32 logits (normal, std 3); ratio = old / new. Only ``sampling.py`` is loaded (from its
file, without the package's ``runtime/__init__``, which imports the engine), so this runs
beside any rewrite of the engine or the exporter.

    python scripts/bench_sampling.py                      # batch 1, 16, 32 over vocab 50257
    python scripts/bench_sampling.py --batch 8 64 --runs 100
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Modules this benchmark must not pull in (being rewritten elsewhere); checked after loading.
NOT_IMPORTED = ("bsbr_export.runtime.engine", "bsbr_export.ops.state", "bsbr_export.export",
                "bsbr_export.ops.onnx_graph", "bsbr_export.cli", "bsbr_export.runtime.api")


def load_sampling():
    """``bsbr_export/runtime/sampling.py`` as a module, loaded from its file (its one package import,
    ``bsbr_export.errors``, comes through the package's trivial ``__init__``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    name = "bsbr_export.runtime.sampling"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bsbr_export" / "runtime" / "sampling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    leaked = [m for m in NOT_IMPORTED if m in sys.modules]
    if leaked:
        raise SystemExit(f"bench_sampling imported {', '.join(leaked)}")
    return mod


def old_path(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The old per-row step: argmax and the token's entry of a float64 log_softmax over the row."""
    toks, lps = np.empty(len(logits), np.int64), np.empty(len(logits))
    for i, row in enumerate(logits):
        toks[i] = row.argmax()
        z = row.astype(np.float64)
        z = z - z.max()
        lps[i] = (z - np.log(np.exp(z).sum()))[toks[i]]
    return toks, lps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32], help="batch sizes (rows of logits)")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary size (GPT-2: 50257)")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per figure (the median is reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before the timed ones")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random logits")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.vocab < 2 or args.runs < 1 or args.warmup < 0:
        ap.error("--batch >= 1, --vocab >= 2, --runs >= 1, --warmup >= 0")

    sampling = load_sampling()
    from bsbr_export.util import median_ms  # ROOT is on the path now
    greedy = sampling.SamplingOptions()
    rng = np.random.default_rng(args.seed)
    print(f"vocab {args.vocab}, median of {args.runs} runs (ms); ratio = old / new")
    print(f"{'batch':>5}  {'old f64 per row':>15}  {'new greedy':>10}  {'ratio':>6}  {'new +logprobs':>13}  "
          f"{'ratio':>6}  {'max |dlogprob|':>14}")
    for b in args.batch:
        z = (rng.standard_normal((b, args.vocab)) * 3).astype(np.float32)
        toks_old, lps_old = old_path(z)
        got = sampling.choose_rows(z, greedy, logprobs=True)
        assert (got.tokens == toks_old).all()
        err = float(np.abs(got.logprobs - lps_old).max())
        t_old = median_ms(lambda z=z: old_path(z), args.runs, args.warmup)
        t_greedy = median_ms(lambda z=z: sampling.choose_rows(z, greedy), args.runs, args.warmup)
        t_lp = median_ms(lambda z=z: sampling.choose_rows(z, greedy, logprobs=True), args.runs, args.warmup)
        print(f"{b:>5}  {t_old:>15.3f}  {t_greedy:>10.3f}  {t_old / t_greedy:>5.1f}x  {t_lp:>13.3f}  "
              f"{t_old / t_lp:>5.1f}x  {err:>14.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
