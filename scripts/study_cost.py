"""The cost column of the study's tables: ONNX Runtime prefill of each conversion against the dense floor.

    python scripts/study_cost.py [--length 8192] [--runs 2] [--quick] [--work DIR]

What a conversion costs does not depend on its trained values, only on the graph it exports
to: the local window, the retrieval, its feature map and weights, where the retrieval stops.
Every distinct such shape among the study's rows (studylib: VARIANTS, the look-back and
learned-φ variants, round three's and --calibrate self's) is exported at GPT-2 small shape
(random weights, seed 0, chunk 128, fp32, no state outputs, as the benchmark times prefill),
and timed in ORT at ``--length`` tokens beside the dense floor (the same graph with attention
removed): up to four graphs per child process, the floor among them, alternating call by call,
the ratio per round against the floor of the same round, median over rounds. Writes
docs/results/study_cost.md and the ratios the other study scripts read (``study_cost.json``
beside it, by ``studylib.cost_key``). Run it alone on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import studylib as S
from bsbr_export.bench.prepare import _make_random_hf
from bsbr_export.bench.profile import export_prefill
from bsbr_export.util import atomic_write_text, machine_line, markdown_table

SEED, PER_CHILD = 0, 3
TIME = """
import json, sys
import numpy as np
from bsbr_export.bench.profile import alternating_wall
paths, T, runs, threads, vocab = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = np.random.default_rng(T).integers(0, vocab, size=(1, T), dtype=np.int64)
wall = alternating_wall(paths, {"input_ids": ids}, threads, runs, 1)
floor = np.array(wall["floor"])
print(json.dumps({n: {"ms": float(np.median(v)), "ratio": float(np.median(np.array(v) / floor))}
                  for n, v in wall.items()}))
"""


def child(code: str, *argv: str) -> str:
    """One child process (its memory is returned when it ends); its stdout's last line."""
    res = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(S.ROOT)), cwd=str(S.ROOT))
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


def shapes(model: str, L: int) -> dict:
    """{cost key: (converter options of the shape, [row names])} over every BSBR row of the study."""
    names = [*S.VARIANTS, *S.LOOKBACK_VARIANTS, *S.LEARNED_VARIANTS, *S.ROUND_THREE, *S.SELF_RECIPE]
    out: dict = {}
    for n in names:
        key, opts = S.cost_key(model, S.row_spec(n), L)
        out.setdefault(key, (opts, []))[1].append(n)
    return out


def main():
    ap = S.parser(__doc__)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--length", type=int, default=S.COST_CONTEXT, help="prompt tokens timed")
    ap.add_argument("--runs", type=int, default=2, help="timed rounds per child (after one warm-up)")
    ap.add_argument("--work", type=Path, default=None, help="keep the graphs here (a temporary directory otherwise)")
    args = ap.parse_args()
    hf_name = "tiny-random" if args.quick else "gpt2-small-random"
    if args.quick:
        args.chunk_size, args.length, args.runs = 16, 64, 1  # the other scripts' quick chunk
    t0 = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="study-cost-"))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        _make_random_hf(hf_name, hf, SEED)
    found = shapes(args.model, args.chunk_size)
    paths = {"floor": export_prefill(hf, work / "floor", args.length, "none", chunk_size=args.chunk_size)}
    for i, (key, (opts, rows)) in enumerate(found.items()):
        print(f"[{i + 1}/{len(found)}] export {key} ({', '.join(rows)})", flush=True)
        paths[key] = export_prefill(hf, work / f"g{i}", args.length, chunk_size=args.chunk_size, **opts)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    keys, res = list(found), {}
    for a in range(0, len(keys), PER_CHILD):
        group = {"floor": str(paths["floor"])} | {k: str(paths[k]) for k in keys[a:a + PER_CHILD]}
        out = json.loads(child(TIME, json.dumps(group), str(args.length), str(args.runs), str(args.threads),
                               str(vocab)))
        for k in keys[a:a + PER_CHILD]:
            res[k] = out[k] | {"floor_ms": out["floor"]["ms"]}
            print(f"  {k}: {out[k]['ms'] / 1e3:.2f} s, {out[k]['ratio']:.2f}x the floor "
                  f"({out['floor']['ms'] / 1e3:.2f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"length": args.length, "chunk_size": args.chunk_size, "model": hf_name,
              "shapes": {k: res[k] | {"rows": found[k][1]} for k in keys}}
    atomic_write_text(args.out / S.COST_FILE, json.dumps(record, indent=1) + "\n")
    rows = [[k, ", ".join(found[k][1]), f"{res[k]['ms'] / 1e3:.2f}", f"{res[k]['floor_ms'] / 1e3:.2f}",
             f"{res[k]['ratio']:.2f}x"] for k in keys]
    lines = ["## Cost of each conversion in ONNX Runtime (the tables' cost column)", "",
             f"- command: `{S.command_line()}`",
             f"- machine: {machine_line()}",
             f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- {hf_name} (random weights, seed {SEED}), chunk {args.chunk_size}, fp32, batch 1, {args.threads} ORT "
             f"threads; prefill of {args.length} tokens without state outputs; per child process the dense floor "
             f"and up to {PER_CHILD} conversions alternating call by call, one warm-up round and {args.runs} timed; "
             "ratio: the median over rounds of the conversion's time over the floor's in the same round", "",
             markdown_table(["graph shape (local window / retrieval / φ / weights / retrieval until)", "rows",
                             f"ORT prefill s at T={args.length}", "dense floor s (same child)", "against the floor"],
                            rows),
             "The dense floor is the same graph with attention removed (what no attention can undercut). "
             "Trained values do not change a graph's cost, so a row and its calibrated forms share a shape.",
             "", f"_study_cost wall time: {time.time() - t0:.0f} s_", ""]
    S.write_fragment(args, "cost", "\n".join(lines))


if __name__ == "__main__":
    main()
