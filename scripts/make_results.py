"""Assemble docs/RESULTS.md from the fragments in docs/results/*.md (fixed order).

    python scripts/make_results.py                     # assemble what exists
    python scripts/make_results.py --run [--model M]   # run every study script first (full study)
    python scripts/make_results.py --run --quick       # every script on tiny inputs (CI)
    python scripts/make_results.py --run --bench       # also both benchmark sections (the whole document)

Fragments: study_fidelity (tables 1, 2, 7), study_attention (3, 4), study_sweeps (5, 6),
study_retrieval (8), study_calibration (9), study_external (10), study_cost (the tables' ORT
cost column, run first), then bench.md and
platforms.md (written by the benchmark and platform jobs), then any other fragment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_summary import fill

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS, DEFAULT_FIGURES = ROOT / "docs" / "results", ROOT / "docs" / "figures"
ORDER = ["study_fidelity", "study_attention", "study_sweeps", "study_retrieval", "study_calibration",
         "study_external", "study_cost", "bench", "bench-gpt2-pystdlib", "platforms", "gpu-h200", "gpt2-size-main-command"]
LAST = ["regeneration"]
SUMMARY = "summary"
# Run order: calibration before the scripts that also evaluate its checkpoints.
# The cost run first: the other scripts read its ratios (study_cost.json) for their cost columns.
RUN_ORDER = ["study_cost", "study_fidelity", "study_attention", "study_calibration", "study_sweeps", "study_retrieval",
             "study_external"]
USES_CALIBRATED = ("study_sweeps", "study_retrieval")
# The full study's sample counts, sized so that the whole run fits in two hours on 2 CPU
# cores (measured: see the "Regeneration" section it writes). Each script alone defaults
# to every window of the held-out text, for anyone with more time.
FULL_ARGS = {
    "study_cost": [],
    "study_fidelity": ["--windows", "64", "--long-windows", "8", "8", "4"],
    "study_attention": ["--windows", "32"],
    # Round one's and two's best runs, then the main command's --calibrate self (10 minutes). Earlier
    # runs of this table also had normalised:full, normalised:conversion:4096,
    # normalised:output+conversion and "normalised, learned φ:weights+conversion" (--runs reruns them).
    "study_calibration": ["--runs", "normalised:conversion", "normalised, look-back:conversion",
                          "normalised, look-back, learned φ:weights+conversion",
                          "default, hedgehog φ, decay weights:self:10",
                          "--budget", "65536",
                          "--eval-windows", "32", "--long-windows", "8", "8", "4"],
    "study_sweeps": ["--windows", "16", "--repeats", "3"],
    "study_retrieval": ["--windows", "24"],
    "study_external": [],
}

INTRO = """# BSBR conversion study: results

Every table below is written by a script in `scripts/` (the command, model, data and
machine stand above each table) and every figure under `docs/figures/` by
`scripts/study_attention.py`. This file is assembled from the fragments in
`docs/results/` by `python scripts/make_results.py`; `python scripts/make_results.py --run`
reruns the whole study first (the sample counts of `FULL_ARGS` in that script, sized to
fit two hours on 2 CPU cores; the measured time is in the last section), `--run --quick`
runs every script on tiny inputs; `--bench` adds the two benchmark runs (sections
"Benchmark: ...", whose headers give each run's wall time), so one command rebuilds the
whole document. Every script takes `--model`, a local
GPT-2 directory or a hub name such as `gpt2` where the hub is reachable. Sample counts in
each table's header are the ones of that run.

## Definitions

- **Original**: the HF GPT-2 as loaded; **converted**: the same weights with BSBR attention
  (docs/bsbr-math.md), chunk `L`, meta projections initialised from the layer's query/key.
- **Variants.** (a) `plain`: `o_t = a_t + g φ(q_t) S_c(t)` with `g = 1`, `φ` = identity;
  (b) `local`: `g = 0`, block-local attention only; (c) `normalised`: the local softmax and the
  retrieval share one denominator,
  `o_t = (Σ_s e^{q_t·k_s/√d} v_s + g φ(q_t) S_c(t)) / (Σ_s e^{q_t·k_s/√d} + g φ(q_t) Z_c(t))`,
  `Z_i = Σ_{j<i} p_ij z_j`, `z_j = Σ_{s∈j} φ(k_s)`, `φ(x) = elu(x) + 1`, initial `g = 0.03`
  (picked from the sweep of initial g in table 1); (d) calibrated models (table 9). All are
  causal and exactly GPT-2 for sequences within one chunk (`tests/test_variants.py`).
- **Round two.** `…, look-back`: the local softmax of token t covers its own chunk and the
  previous one, retrieval the chunks before (exactly GPT-2 up to two chunks,
  `tests/test_lookback.py`); `…, learned φ`: the retrieval's feature map
  `elu(x W_h + b_h) + 1`, per head, starting as `elu + 1` (`tests/test_transfer.py`); **attention
  transfer** (table 9): before the KL distillation, every layer's conversion parameters learn
  to imitate that layer's softmax attention with the original's hidden states as inputs,
  `weights` (KL of the attention weights, Hedgehog's objective) or `output` (MSE of the
  attention outputs, LoLCATs' first stage). **Baselines**: `window W`, the original's attention
  over the W most recent tokens; `sinks 4 + window W`, plus the first 4 tokens (StreamingLLM).
- **Round three.** Retrieval weights (docs/bsbr-math.md, "Retrieval weights"): `softmax` (the
  tables above), `sum`, `decay` and `gate` (an unnormalised sigmoid of the meta scores). **The
  default conversion** is the look-back window with softmax weights: before calibration it keeps
  the original's next token far better than the chunk window (section "Retrieval weights"; gate
  weights a little better still at 1024 tokens, but worse at longer contexts: sections "Long
  contexts"), its ORT prefill is within 1.15x the dense floor at 8192 tokens (section "Look-back
  local window"), and its batch-1 decode costs what the chunk window's does. Chunks that start at
  or after GPT-2's 1024 positions retrieve nothing (`retrieval_until`, section "Retrieval beyond
  the position table"); rounds one and two retrieve from every earlier chunk. In the tables the
  main command's conversion is the row `default`, and `default, W weights` the same with the
  retrieval weights W (tables 1, 2, 5, 7 and 8). **`--calibrate self`**: calibration on text sampled from
  the original, by default of a conversion with the hedgehog feature map
  `φ(x) = [softmax(x W), softmax(−x W)]`, which only training makes a good retrieval, and decay
  retrieval weights; one KL step in four on a long window of joined samples, the original's
  targets over a sliding 1024-token context (sections "Calibration without the user's text").
  **`calibrate --data`**: the same on the user's own text (section "`bsbr-export calibrate
  --data`"); in table 9 it is the row `default, hedgehog φ, decay weights (--calibrate self, 10 min)`.
- **Cost** beside fidelity (tables 1, 2 and 9): prefill seconds of the torch model at T = 4096,
  each row's ONNX Runtime prefill at T = 8192 against the dense floor (GPT-2 small shape; section
  "Cost of each conversion in ONNX Runtime", `scripts/study_cost.py`) and the decode state one
  sequence carries at T = 8192; table 5 times every chunk size in torch.
- **Position policy** beyond the original's table: `absolute` (default) keeps GPT-2's
  positions below `n_positions` and reuses the table's last `L` positions per chunk beyond;
  `chunk` restarts positions every chunk.
- **Cosine similarity** of hidden states at each position, `a·b / (|a||b|)`; layer `i` is the
  residual stream after block `i`, *final* is after `ln_f`. **MSE**: mean over hidden dims of
  the squared difference. **KL**: `KL(P_original ‖ P_converted)` of the next-token
  distributions (softmax of the logits), in nats. Each is averaged over the positions of a
  window; tables give mean ± sample standard deviation over windows.
- **Top-k agreement**: the share of positions where the original's top-1 token is among the
  converted model's k highest logits (top-1: both pick the same token).
- **Perplexity**: `exp(mean NLL)` of the next token over every prediction of every window.
- **Attention density**: the share of the causal query-key pairs `T(T+1)/2` that the local
  softmax scores.
- **ROUGE-N / ROUGE-L**: F1 of clipped n-gram overlap / of the longest common subsequence.

The functions are in `bsbr_export/metrics.py`; `tests/test_metrics.py` checks each on a
hand-computed case.
"""


def fragments(results: Path) -> list[Path]:
    have = {p.stem: p for p in sorted(results.glob("*.md")) if p.stem != SUMMARY}
    ordered = [have.pop(n) for n in ORDER if n in have]
    last = [have.pop(n) for n in LAST if n in have]
    return ordered + list(have.values()) + last


def plain_headings(paths) -> dict[str, str]:
    """{heading: the fragment that keeps it as it is}: of fragments under one heading, the one
    with the shortest name (the document: "decode-memory", not "decode-memory-chunk"), whose
    anchor the summary reads; the others are named by their fragment."""
    keeps = {}
    for p in paths:
        heading = p.read_text().strip().partition("\n")[0]
        if heading not in keeps or len(p.stem) < len(keeps[heading]):
            keeps[heading] = p.stem
    return keeps


def assemble(results: Path, out: Path) -> Path:
    title, _, rest = INTRO.partition("\n\n")
    parts, keeps = [rest], plain_headings(fragments(results))
    for p in fragments(results):
        text = p.read_text().strip()
        # Another run of the same script (a recheck, other options) is named by its fragment, so
        # that two sections never share a title.
        heading, _, body = text.partition("\n")
        if keeps.get(heading) != p.stem:
            text = f"{heading} ({p.stem})\n{body}"
        # Fragments link figures relative to docs/; RESULTS.md lives in docs/ too.
        parts.append(text)
    body = "\n\n".join(parts)
    # The document opens with its one-screen summary: docs/results/summary.md, a template whose
    # figures are read from the sections' tables (results_summary.fill).
    summary = results / f"{SUMMARY}.md"
    head = [title] + ([fill(summary.read_text(), body).strip()] if summary.is_file() else [])
    out.write_text("\n\n".join(head + [body]).rstrip() + "\n")
    print(f"wrote {out} from {len(parts) - 1} fragments")
    return out


def run_all(args) -> None:
    common = ["--model", args.model]
    # Only where they differ from the scripts' own defaults: the commands above the tables stay short.
    if args.results != DEFAULT_RESULTS:
        common += ["--out", str(args.results)]
    if args.figures != DEFAULT_FIGURES:
        common += ["--figures", str(args.figures)]
    if args.quick:
        common.append("--quick")
    if args.data:
        common += ["--data", args.data]
    if not args.no_baselines:
        common.append("--with-baselines")
    save = args.results / ".calibrated" if args.quick else ROOT / "out" / "study"
    times = []
    for name in [n for n in RUN_ORDER if not args.scripts or n in args.scripts]:
        cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *common]
        if not args.quick:
            cmd += FULL_ARGS[name]
        if name == "study_calibration" and args.quick:
            cmd += ["--save", str(save)]  # the full run keeps the script's default, out/study
        if name in USES_CALIBRATED:
            cals = sorted(p for p in save.glob("calibrated-*") if p.is_dir()) if save.is_dir() else []
            if cals:
                cmd += ["--calibrated", *map(str, cals)]
        t0 = time.time()
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        times.append((name, time.time() - t0))
        record_time(args, name, times[-1][1])
        print(f"  {name}: {times[-1][1]:.0f} s", flush=True)
    if args.bench:
        for name, cmd in bench_commands(args):
            t0 = time.time()
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            times.append((name, time.time() - t0))
    write_regeneration(args, times)


def bench_commands(args) -> list[tuple[str, list[str]]]:
    """The benchmark runs behind the "Benchmark" sections, each one process tree of its own."""
    bench = [sys.executable, "-m", "bsbr_export.cli", "bench"]
    if args.quick:
        return [("bench --quick", bench + ["--quick", "--out", str(args.results / ".bench-quick"),
                                           "--fragment", str(args.results / "bench.md")])]
    # The plots the fragments link to live in docs/bench/<model> (bench's own default is ./bench-out).
    tag = Path(args.model).name
    return [("bench", bench + ["--out", str(ROOT / "docs" / "bench" / "gpt2-small-random")]),
            (f"bench --model {args.model}", bench + ["--model", args.model, "--out", str(ROOT / "docs" / "bench" / tag)])]


def record_time(args, name: str, seconds: float) -> None:
    """Each script's wall time as soon as it finishes (``.times.json`` beside the fragments), so
    that a run resumed with ``--scripts`` still accounts for the scripts it did not rerun."""
    f = args.results / ".times.json"
    times = json.loads(f.read_text()) if f.is_file() else {}
    times[name] = {"seconds": round(seconds, 1), "run": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    f.write_text(json.dumps(times, indent=1) + "\n")


def write_regeneration(args, times) -> None:
    """The last section of RESULTS.md: how long the whole study took, script by script (the
    scripts of an earlier run that ``--scripts`` left alone with that run's time and date)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import studylib

    flags = (" --quick" if args.quick else "") + (" --bench" if args.bench else "")
    recorded = json.loads((args.results / ".times.json").read_text()) if (args.results / ".times.json").is_file() else {}
    ran = dict(times)
    rows, total_all = [], 0.0
    for name in RUN_ORDER + [n for n, _ in times if n not in RUN_ORDER]:
        if name in ran:
            rows.append(f"| `{name}` | {ran[name] / 60:.1f} min | this run |")
            total_all += ran[name]
        elif args.scripts and name in recorded:
            rows.append(f"| `{name}` | {recorded[name]['seconds'] / 60:.1f} min | {recorded[name]['run']} |")
            total_all += recorded[name]["seconds"]
    lines = ["## Regeneration", "",
             f"- command: `python scripts/make_results.py --run{flags} --model {args.model}`"
             + (f" (this run: `--scripts {' '.join(args.scripts)}`)" if args.scripts else ""),
             f"- machine: {studylib.machine()}",
             f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| script | wall time | run |", "|---|---|---|"]
    lines += rows
    lines.append(f"| **total** | **{total_all / 60:.1f} min** | |")
    (args.results / "regeneration.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run every study script first")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench", action="store_true", help="with --run: also rerun both benchmarks")
    ap.add_argument("--model", default="models/gpt2-pystdlib")
    ap.add_argument("--data", default=None)
    ap.add_argument("--no-baselines", action="store_true",
                    help="with --run: leave out the look-back variants and the baselines (sliding window, "
                         "sinks + window) that every script otherwise adds")
    ap.add_argument("--scripts", nargs="+", choices=RUN_ORDER, default=None,
                    help="with --run: rerun only these study scripts (e.g. to resume a run that stopped), "
                         "keeping the other fragments; the regeneration section takes the others' times from "
                         "the run that wrote them (.times.json beside the fragments)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--figures", type=Path, default=DEFAULT_FIGURES)
    ap.add_argument("--output", type=Path, default=None, help="default: RESULTS.md next to the results folder")
    args = ap.parse_args(argv)
    if args.run:
        run_all(args)
    assemble(args.results, args.output or args.results.parent / "RESULTS.md")


if __name__ == "__main__":
    main()
