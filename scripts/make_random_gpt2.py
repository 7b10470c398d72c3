"""Write a GPT-2-small-shaped HF model with random weights (12 layers, 768 wide, 12 heads,
vocabulary 50,257, n_positions 1024) into a directory, for the main command at GPT-2 size:

    python scripts/make_random_gpt2.py /tmp/gpt2-small-random
    bsbr-export /tmp/gpt2-small-random --engine onnx --out OUT --max-seq-len 8192

Reuses the benchmark's generator (``gpt2-small-random``, same seed as the benchmark).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def make_random_hf():
    """The benchmark's ``_make_random_hf(name, out, seed)``, wherever the bench module keeps it."""
    for mod in ("bsbr_export.bench.prepare", "bsbr_export.bench"):
        try:
            fn = getattr(importlib.import_module(mod), "_make_random_hf", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise SystemExit("error: bsbr_export.bench has no _make_random_hf")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists")
    make_random_hf()("gpt2-small-random", args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
