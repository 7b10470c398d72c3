"""Short prompts: the BSBR prefill graph against GPT-2 exported from HF by torch.onnx (dynamo), op type by op type.

    python scripts/profile_short.py [--lengths 1,32,128] [--runs 15] [--threads 2] [--before REV]
                                    [--out docs/results/profile-short.md]

GPT-2 small shape with random weights (the benchmark's ``gpt2-small-random``, seed 0), converted
as the benchmark converts it (chunk 128, retrieval scale 1). Graphs, all fp32 on the same
weights, batch 1:

  hf-ort        HF GPT2LMHeadModel exported by ``torch.onnx.export(..., dynamo=True)`` (bench.hf_export)
  bsbr-before   the BSBR graph as the exporter at git revision REV writes it (``--before``; skipped without)
  bsbr          the BSBR graph as the benchmark times it (no state outputs)
  bsbr-state    ``model.onnx`` as the main command writes it (state outputs), logits fetched only
  floor         the dense floor: the same graph with attention removed

Per length the graphs run alternately, call by call, in one process: first unprofiled (wall
time per call, median), then under ORT's profiler (node time per op type, per-call median).
Run it under ``flock /tmp/bsbr-cpu.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export.bench.hf_export import export_hf_onnx  # noqa: E402
from bsbr_export.bench.prepare import _make_random_hf  # noqa: E402
from bsbr_export.bench.profile import profile_lengths, script_header  # noqa: E402
from bsbr_export.util import atomic_write_text, markdown_table  # noqa: E402

CHUNK, SCALE, SEED = 128, 1.0, 0
EXPORT = """
import sys
from pathlib import Path
from bsbr_export.convert import convert
from bsbr_export.export import ExportSpec, export_onnx
hf, out, states, attention = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
m = convert(hf, chunk_size={chunk}, retrieval_scale={scale})
export_onnx(m, out, ExportSpec(max_seq_len=1024, attention=attention, state_outputs=states), decode=False)
""".format(chunk=CHUNK, scale=SCALE)
LABELS = {"hf-ort": "HF export", "bsbr-before": "BSBR before", "bsbr": "BSBR", "bsbr-state": "BSBR model.onnx",
          "floor": "dense floor"}


def export_with(src_root: Path, hf: Path, out: Path, states: bool, attention: str = "bsbr") -> Path:
    """Export with the package found under ``src_root`` (this checkout or an older revision), in a child."""
    env = dict(os.environ, PYTHONPATH=str(src_root))
    subprocess.run([sys.executable, "-c", EXPORT, str(hf), str(out), "1" if states else "0", attention],
                   check=True, env=env, cwd=str(src_root))
    return out / "model.onnx"


def checkout(rev: str, dest: Path) -> Path:
    """The ``bsbr_export`` package at ``rev`` (git archive), unpacked under ``dest``."""
    raw = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bsbr_export"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(raw)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def fmt(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def op_table(res: dict, names: list, top: int) -> str:
    ops = []
    for n in names:
        ops += [o for o in res[n]["op_types_ms"] if o not in ops]
    ops.sort(key=lambda o: -max(res[n]["op_types_ms"].get(o, 0.0) for n in names))
    rows = [[o] + [f"{fmt(res[n]['op_types_ms'].get(o, 0.0))} ({res[n]['op_counts'].get(o, 0)})" for n in names]
            for o in ops[:top]]
    rest = ops[top:]
    if rest:
        rows.append([f"{len(rest)} other op types"]
                    + [f"{fmt(sum(res[n]['op_types_ms'].get(o, 0.0) for o in rest))} "
                       f"({sum(res[n]['op_counts'].get(o, 0) for o in rest)})" for n in names])
    rows.append(["**nodes, total**"] + [f"{fmt(res[n]['node_total_ms'])} ({sum(res[n]['op_counts'].values())})"
                                        for n in names])
    rows.append(["**run (profiled)**"] + [fmt(res[n]["run_ms"]) for n in names])
    rows.append(["**wall per call (unprofiled)**"] + [fmt(res[n]["wall_ms"]) for n in names])
    return markdown_table(["op type: ms (nodes)"] + [LABELS[n] for n in names], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1,32,128")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", default=None, help="git revision whose exporter writes the 'BSBR before' graph")
    ap.add_argument("--top", type=int, default=16, help="op types shown per table (the rest summed)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/profile-short.md"))
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    lengths = [int(t) for t in args.lengths.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="profile-short-"))
    t0 = time.perf_counter()
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        _make_random_hf("gpt2-small-random", hf, SEED)
    paths = {"hf-ort": export_hf_onnx(hf, work / "hf-ort")}
    if args.before:
        paths["bsbr-before"] = export_with(checkout(args.before, work / "before-src"), hf, work / "bsbr-before",
                                           states=False)
    paths["bsbr"] = export_with(ROOT, hf, work / "bsbr", states=False)
    paths["bsbr-state"] = export_with(ROOT, hf, work / "bsbr-state", states=True)
    paths["floor"] = export_with(ROOT, hf, work / "floor", states=False, attention="none")
    names = list(paths)
    results = profile_lengths(paths, lengths, args.threads, args.runs, args.warmup, work, SEED)
    lines = script_header(ROOT, "profile_short.py", argv, "Short prompts: BSBR prefill vs GPT-2 exported by "
                          "torch.onnx (dynamo), ORT profiles", args.threads, SEED)
    lines[-1] += f"; BSBR chunk {CHUNK}, retrieval scale {SCALE}"
    lines += [f"- per call: median of {args.runs} calls after {args.warmup} warm-up calls, the graphs alternating call "
             f"by call; op-type times are per-call medians from ORT's profiler (node kernel time), counts in "
             f"parentheses are nodes run per call",
             f"- graphs: " + "; ".join(f"{LABELS[n]} = `{n}`" for n in names)
             + " (see the script's docstring)", ""]
    summary = []
    for T in lengths:
        r = results[T]
        summary.append([T] + [fmt(r[n]["wall_ms"]) for n in names]
                       + [f"{r[n]['wall_ms'] / r['hf-ort']['wall_ms']:.2f}x" for n in names if n != "hf-ort"])
    lines += ["#### Wall time per call (ms) and ratio to the HF export", "",
              markdown_table(["T"] + [LABELS[n] for n in names] + [f"{LABELS[n]} / HF" for n in names
                                                                    if n != "hf-ort"], summary)]
    for T in lengths:
        lines += [f"#### T = {T}: node time per op type (ms per call)", "", op_table(results[T], names, args.top)]
    lines.append(f"Whole script: {time.perf_counter() - t0:.0f} s.")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
