"""Write a benchmark's report again from its bench.json, with the report code of this checkout
(tables, plots, the docs fragment), without timing anything:

    python scripts/render_bench.py docs/bench/gpt2-small-random/bench.json --fragment docs/results/bench.md

The report goes beside the JSON (bench.md and the plots) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsbr_export.bench.report import write_outputs  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="a bench.json written by `bsbr-export bench`")
    ap.add_argument("--out", type=Path, default=None, help="where bench.md and the plots go [beside the JSON]")
    ap.add_argument("--fragment", type=Path, default=None, help="also write the docs fragment here")
    args = ap.parse_args(argv)
    try:
        result = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {args.json}: {e}")
    if not result.get("complete"):
        sys.exit(f"error: {args.json}: not a complete benchmark run")
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(result, out, args.fragment)
    print(f"wrote {out}/bench.md" + (f" and {args.fragment}" if args.fragment else ""))


if __name__ == "__main__":
    main()
