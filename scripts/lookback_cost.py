"""What the look-back local window costs in ONNX Runtime: BSBR prefill with each local window
against the dense floor, at long prompts (the condition for a default conversion: ORT prefill
within 1.15x the floor at T=8192).

    python scripts/lookback_cost.py [--lengths 4096,8192] [--runs 3] [--threads 2]
                                    [--out docs/results/lookback-cost.md]

GPT-2 small shape with random weights (the benchmark's ``gpt2-small-random``, seed 0), converted
as the main command converts it (chunk 128, normalised retrieval, elu + 1, g = 0.03), once per
local window. Graphs, fp32 on the same weights, batch 1, no state outputs (as the benchmark times
prefill):

  chunk      BSBR, the local softmax over the token's own chunk
  lookback   BSBR, the local softmax over the token's own chunk and the one before it
  floor      the dense floor: the same graph with attention removed

Per length the graphs run alternately, call by call, in one process (wall time per call,
median), then under ORT's profiler (node time per op type). Run it alone on the machine, e.g.
under ``flock /tmp/bsbr-cpu.lock``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export.bench.prepare import _make_random_hf  # noqa: E402
from bsbr_export.bench.profile import export_prefill, profile_lengths, script_header  # noqa: E402
from bsbr_export.util import atomic_write_text, markdown_table  # noqa: E402

CHUNK, SEED, FLOOR_LIMIT = 128, 0, 1.15
LABELS = {"chunk": "BSBR, chunk window", "lookback": "BSBR, look-back window",
          "lookback-gate": "BSBR, look-back window, gate weights", "floor": "dense floor"}
BSBR = ("chunk", "lookback", "lookback-gate")


def export(hf: Path, out: Path, window: str, attention: str, max_len: int, weights: str = "softmax") -> Path:
    """One export in a child process (its memory is returned before timing starts)."""
    return export_prefill(hf, out, max_len, attention, chunk_size=CHUNK, local_window=window, retrieval_weights=weights)


def op_rows(res: dict, names: list, top: int) -> list:
    ops = sorted({o for n in names for o in res[n]["op_types_ms"]},
                 key=lambda o: -max(res[n]["op_types_ms"].get(o, 0.0) for n in names))
    rows = [[o] + [f"{res[n]['op_types_ms'].get(o, 0.0):.0f} ({res[n]['op_counts'].get(o, 0)})" for n in names]
            for o in ops[:top]]
    rows.append(["**nodes, total**"] + [f"{res[n]['node_total_ms']:.0f} ({sum(res[n]['op_counts'].values())})"
                                        for n in names])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192", help="prompt lengths T, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per graph and length")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10, help="op types shown per profile table")
    ap.add_argument("--out", default=str(ROOT / "docs/results/lookback-cost.md"))
    ap.add_argument("--work", default=None, help="keep the model and graphs here (a temporary directory otherwise)")
    args = ap.parse_args(argv)
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        raise SystemExit(f"error: --lengths must be integers separated by commas, got {args.lengths!r}") from None
    if min(lengths) < 1 or args.runs < 1 or args.warmup < 0:
        raise SystemExit("error: lengths and --runs must be >= 1, --warmup >= 0")
    work = Path(args.work or tempfile.mkdtemp(prefix="lookback-cost-"))
    t0 = time.perf_counter()
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        _make_random_hf("gpt2-small-random", hf, SEED)
    n = max(lengths)
    print("exporting the four graphs", flush=True)
    paths = {"chunk": export(hf, work / "chunk", "chunk", "bsbr", n),
             "lookback": export(hf, work / "lookback", "lookback", "bsbr", n),
             "lookback-gate": export(hf, work / "lookback-gate", "lookback", "bsbr", n, "gate"),
             "floor": export(hf, work / "floor", "chunk", "none", n)}
    names = list(paths)
    results = profile_lengths(paths, lengths, args.threads, args.runs, args.warmup, work, SEED)
    lines = script_header(ROOT, "lookback_cost.py", argv, "Look-back local window: ORT prefill cost against the "
                          "dense floor", args.threads, SEED)
    lines[-1] += f"; BSBR chunk {CHUNK}, the main command's conversion otherwise"
    lines += [f"- per call: median of {args.runs} calls after {args.warmup} warm-up call(s), the graphs alternating "
             "call by call in one process; op-type times from ORT's profiler (node kernel time, per-call median)",
             ""]
    rows = []
    for T in lengths:
        r = results[T]
        rows.append([T] + [f"{r[k]['wall_ms'] / 1e3:.2f}" for k in names]
                    + [f"{r[k]['wall_ms'] / r['floor']['wall_ms']:.2f}x" for k in BSBR]
                    + [f"{r['lookback']['wall_ms'] / r['chunk']['wall_ms']:.2f}x"])
    lines += ["#### Wall time per call (s) and ratios", "",
              markdown_table(["T"] + [LABELS[k] for k in names]
                             + ["chunk / floor", "look-back / floor", "look-back, gate / floor", "look-back / chunk"],
                             rows)]
    r = results[n]
    ok = r["lookback"]["wall_ms"] / r["floor"]["wall_ms"] <= FLOOR_LIMIT
    lines += [f"Condition for a default conversion (look-back prefill within {FLOOR_LIMIT}x the dense floor at "
              f"T={n}): **{'met' if ok else 'missed'}** "
              f"({r['lookback']['wall_ms'] / r['floor']['wall_ms']:.2f}x).", ""]
    lines += [f"#### T = {n}: node time per op type (ms per call, nodes in parentheses)", "",
              markdown_table(["op type"] + [LABELS[k] for k in names], op_rows(r, names, args.top))]
    lines.append(f"Whole script: {time.perf_counter() - t0:.0f} s.")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
