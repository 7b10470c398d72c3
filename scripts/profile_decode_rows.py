"""Where a decode step's time goes by rows: ORT's profiler over the runtime engine's per-token
graph, one process per row count, node time per op type (ms per step, nodes per step).

    python scripts/profile_decode_rows.py EXPORT_DIR --rows 1,16 --context 200 --steps 20

EXPORT_DIR: an fp32 export with decode graphs (e.g. GPT-2 small shape,
``bsbr-export export HF_DIR --out EXPORT_DIR``). Profiling adds its own cost to every node, so
compare the rows with each other, not with unprofiled step times. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(export: str, rows: int, context: int, steps: int, prefix: str) -> None:
    import time

    import numpy as np
    import onnxruntime as ort

    base = ort.SessionOptions

    class Profiled(base):  # every session the engine opens writes a profile under ``prefix``
        def __init__(self):
            super().__init__()
            self.enable_profiling, self.profile_file_prefix = True, prefix

    ort.SessionOptions = Profiled
    from bsbr_export.runtime.engine import Engine

    eng = Engine(export, threads=2, max_len=context + steps + 8)
    st = eng.new_state(rows)
    rng = np.random.default_rng(0)
    vocab = eng.vocab_size
    eng.extend(st, list(range(rows)), [rng.integers(0, vocab, context) for _ in range(rows)])
    tok = rng.integers(0, vocab, rows)
    for _ in range(3):
        eng.decode(st, tok)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.decode(st, tok)
        times.append(time.perf_counter() - t)
    files = [s.end_profiling() for s in {id(s): s for s in eng.sessions.values()}.values()]  # one session runs two graphs
    print(json.dumps({"files": files, "median_ms": float(np.median(times) * 1e3)}))


def op_times(path: str, steps: int) -> tuple[dict, dict]:
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    ms, count = collections.Counter(), collections.Counter()
    for e in events:
        # An If's time holds its branch's nodes, which are listed too (the joined session's graphs).
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"] \
                and e["args"]["op_name"] != "If":
            ms[e["args"]["op_name"]] += e["dur"] / 1000 / steps
            count[e["args"]["op_name"]] += 1
    return ms, {k: v // steps for k, v in count.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="an fp32 export directory with decode graphs")
    ap.add_argument("--rows", default="1,16", help="row counts, comma-separated [1,16]")
    ap.add_argument("--context", type=int, default=200, help="tokens each row holds before the steps [200]")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps per row count [20]")
    ap.add_argument("--top", type=int, default=12, help="op types shown [12]")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        export, rows, context, prefix = args.child
        return child(export, int(rows), int(context), args.steps, prefix)
    rows = [int(r) for r in args.rows.split(",")]
    if not Path(args.export, "decode.onnx").is_file():
        sys.exit(f"error: {args.export}: no decode.onnx (an fp32 export with decode graphs)")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            out = subprocess.run([sys.executable, __file__, args.export, "--steps", str(args.steps), "--child",
                                  args.export, str(r), str(args.context), f"{tmp}/r{r}"],
                                 capture_output=True, text=True, check=True)
            info = json.loads(out.stdout.strip().splitlines()[-1])
            # the per-token graph's profile: the session that ran the most steps
            prof = max(info["files"], key=lambda f: sum(e.get("name") == "model_run"
                                                       for e in json.loads(Path(f).read_text())))
            result[r] = (op_times(prof, args.steps), info["median_ms"])
    ops = sorted({k for (ms, _), _ in result.values() for k in ms}, key=lambda k: -result[rows[-1]][0][0].get(k, 0))
    print(f"decode step over {args.context} tokens of context, {args.steps} profiled steps; ms per step (nodes)")
    print("| op type | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in ops[:args.top]:
        cells = [f"{result[r][0][0].get(k, 0):.2f} ({result[r][0][1].get(k, 0)})" for r in rows]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("| **nodes, total** | " + " | ".join(f"{sum(result[r][0][0].values()):.2f}" for r in rows) + " |")
    print("| **step, profiled (median)** | " + " | ".join(f"{result[r][1]:.2f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
