"""The main command at GPT-2 size, measured: wall time and peak RSS, into a RESULTS fragment.

    flock /tmp/bsbr-cpu.lock python scripts/gpt2_size_main_command.py WORKDIR
    python scripts/gpt2_size_main_command.py WORKDIR --log RUN.LOG   # fragment from a finished run

Makes a GPT-2-small-shaped model with random weights (scripts/make_random_gpt2.py), runs
``bsbr-export MODEL --engine onnx --out OUT --max-seq-len 8192`` under ``/usr/bin/time -v``
(the log is WORKDIR/run.log) and writes docs/results/gpt2-size-main-command.md. Exits
non-zero when the command fails, when a grid case is missing, or when the peak RSS exceeds
the 12 GB target.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = ROOT / "docs" / "results" / "gpt2-size-main-command.md"
TARGET_RSS = 12e9
MAX_LEN = 8192


def command(model: Path, out: Path) -> list[str]:
    return ["bsbr-export", str(model), "--engine", "onnx", "--out", str(out), "--max-seq-len", str(MAX_LEN)]


def parse_log(text: str) -> dict:
    """Wall time, peak RSS, exit status, the parity cases and the memory estimate of a run's log."""
    def grab(pattern, cast=str):
        m = re.search(pattern, text, re.M)
        return cast(m.group(1)) if m else None

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
    secs = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cases = re.findall(r"^\s+(\w+)\s+batch (\d+) seq\s+(\d+)\s+max\|diff\| (\S+) \(tol (\S+)\)\s+top-1 (\S+)\s+(ok|FAIL)",
                       text, re.M)
    return {"seconds": secs, "peak_rss_kb": grab(r"Maximum resident set size \(kbytes\): (\d+)", int),
            "exit": grab(r"Exit status: (\d+)", int), "estimate": grab(r"parity memory: (.*)$"),
            "cases": cases, "summary": grab(r"^(\s+parity onnx_fp32 .*)$")}


def fragment(r: dict, cmd: str, machine: str) -> str:
    rss = r["peak_rss_kb"] * 1024
    rows = "\n".join(f"| {s} | {b} | {n} | {d} | {tol} | {t1} | {ok} |" for s, b, n, d, tol, t1, ok in r["cases"])
    return f"""## The main command at GPT-2 size

GPT-2 small shape with random weights (12 layers, 768 wide, 12 heads, vocabulary 50,257,
n_positions 1024; `scripts/make_random_gpt2.py`), exported for 8192 tokens (positions beyond
1024 by the `absolute` policy) and checked on the whole grid, 8192 tokens x batch 3 included.
The checker keeps one candidate output and one reference row at a time and reduces them a
slice of positions at a time (`bsbr_export/check.py`).

- command: `{cmd}` (under `/usr/bin/time -v`; written by `python scripts/gpt2_size_main_command.py`)
- machine: {machine}
- exit status {r['exit']}; wall time **{r['seconds'] / 60:.1f} min**; peak RSS **{rss / 1e9:.2f} GB**
  ({rss / 2**30:.2f} GiB; target <= 12 GB: {'met' if rss <= TARGET_RSS else '**not met**'});
  the command's own estimate: {r['estimate']}
- {len(r['cases'])} grid cases, all {'passed' if all(c[-1] == 'ok' for c in r['cases']) else 'NOT passed'}:

| source | batch | seq | max abs diff | tolerance | top-1 | |
|---|---|---|---|---|---|---|
{rows}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--log", type=Path, default=None, help="write the fragment from this finished run's log")
    ap.add_argument("--fragment", type=Path, default=FRAGMENT)
    args = ap.parse_args(argv)
    model, out = args.work / "gpt2-small-random", args.work / "out"
    if args.log is None:
        args.work.mkdir(parents=True, exist_ok=True)
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_gpt2.py"), str(model)], check=True)
        args.log = args.work / "run.log"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        with open(args.log, "w") as f:
            subprocess.run(["/usr/bin/time", "-v", *command(model, out)], stdout=f,
                           stderr=subprocess.STDOUT)
    r = parse_log(args.log.read_text())
    sys.path.insert(0, str(ROOT))
    from bsbr_export.util import atomic_write_text, machine_line

    cmd = " ".join(command(Path("MODEL"), Path("OUT")))
    atomic_write_text(args.fragment, fragment(r, cmd, machine_line()))
    print(f"wrote {args.fragment}: exit {r['exit']}, {r['seconds']:.0f} s, peak RSS {r['peak_rss_kb'] * 1024 / 1e9:.2f} GB, "
          f"{len(r['cases'])} cases")
    lengths = {int(c[2]) for c in r["cases"]}
    ok = (r["exit"] == 0 and MAX_LEN in lengths and any(c[1] == "3" and int(c[2]) == MAX_LEN for c in r["cases"])
          and all(c[-1] == "ok" for c in r["cases"]) and r["peak_rss_kb"] * 1024 <= TARGET_RSS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
