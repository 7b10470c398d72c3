"""Echoed prompt log-probabilities in bounded memory: wall time and peak RSS of ``Runtime.score``.

What the server's ``echo`` with ``logprobs`` (and an evaluation harness's loglikelihood request)
costs: every position's log-probability of a prompt of T random tokens, with the top-1 token
(``rt.score([ids], top_logprobs=1)``), against the plain prefill of the same prompt
(``Engine.prefill``, the last token's logits only). Each (mode, length) runs in a process of its
own, so each peak RSS (VmHWM) is that run's alone; "after load" is the RSS once the export is
loaded, before the prompt. The whole logits of the prompt would take T x vocab x 4 bytes; the
scorer keeps one piece's (``scoring.SCORE_LOGIT_BYTES``) at a time.

    bsbr-export export /tmp/g2/hf --out /tmp/score-g2/exp --max-seq-len 8192   # GPT-2 small shape
    python scripts/bench_echo.py /tmp/score-g2/exp [--lengths 256,4096] [--logit-mib 64,256] [--threads 2]

The export needs the ``logit_rows`` input of this version's extend graph. Writes
docs/results/echo-memory.md (``--out``) with the command and the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "gpt2-pystdlib"  # a tokenizer for exports without one (ids are random anyway)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def one(export: Path, mode: str, T: int, threads: int, logit_mib: int) -> dict:
    """One measurement in this process: load, then score (or prefill) T random tokens."""
    from bsbr_export.runtime import scoring
    from bsbr_export.runtime.api import Runtime
    from bsbr_export.runtime.engine import Engine
    from bsbr_export.runtime.scoring import score_tokens
    from bsbr_export.runtime.text import Tokenizer

    scoring.SCORE_LOGIT_BYTES = logit_mib << 20
    eng = Engine(export, threads=threads)
    tok_dir = export if any((q / "tokenizer.json").is_file() for q in (export, export / "bsbr")) else BUNDLED
    rt = Runtime(eng, Tokenizer.from_dir(tok_dir))
    ids = np.random.default_rng(0).integers(0, eng.vocab_size, T)
    loaded = _rss("VmRSS")
    t0 = time.perf_counter()
    if mode == "echo":
        s = rt.score([ids.tolist()], top_logprobs=1)[0]
        check = float(s.total)
    else:
        st = eng.new_state(1)
        eng.reserve(st, 0, T)
        check = float(eng.prefill(st, [0], [ids])[0].max())
    wall = time.perf_counter() - t0
    return {"mode": mode, "T": T, "wall_s": wall, "loaded": loaded, "peak": _rss("VmHWM"), "vocab": eng.vocab_size,
            "piece": score_tokens(eng.vocab_size, 1024) if mode == "echo" else 1024, "logit_mib": logit_mib,
            "shape": f"{eng.config['n_layer']} layers x {eng.config['n_embd']}, chunk {eng.chunk}, "
                     f"exported for {eng.max_len} tokens", "check": check}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("export", type=Path, help="an export directory (extend graph with logit_rows)")
    ap.add_argument("--lengths", default="256,4096", help="prompt lengths [256,4096]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--logit-mib", default="64,256",
                    help="scoring.SCORE_LOGIT_BYTES to try, in MiB (the default is 64) [64,256]")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/echo-memory.md", help="Markdown to write")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)  # a child's measurement
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.export, a.one[0], int(a.one[1]), a.threads, int(a.logit_mib))))
        return
    try:
        lengths, mibs = [int(x) for x in a.lengths.split(",")], [int(x) for x in a.logit_mib.split(",")]
    except ValueError:
        ap.error("--lengths and --logit-mib must be integers separated by commas")
    rows = []
    for T in lengths:
        for mode, mib_ in [("prefill", mibs[0])] + [("echo", m) for m in mibs]:
            r = subprocess.run([sys.executable, __file__, str(a.export), "--threads", str(a.threads), "--logit-mib",
                                str(mib_), "--one", mode, str(T)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{mode} T={T} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            print(f"{mode} T={T} ({x['logit_mib']} MiB): {x['wall_s']:.2f} s, peak RSS {x['peak'] / 2**20:.0f} MiB "
                  f"(after load {x['loaded'] / 2**20:.0f} MiB)", flush=True)
    import onnxruntime as ort

    from bsbr_export.util import machine_line, markdown_table

    V = rows[0]["vocab"]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    cmd = " ".join(["python scripts/bench_echo.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["## Echoed prompt log-probabilities: wall time and peak memory", "",
             f"`{cmd}` on `{a.export}` ({rows[0]['shape']}, vocabulary {V}): `Runtime.score([ids], top_logprobs=1)` (echo: every "
             f"position's log-probability and top-1, in pieces whose logits stay within the given bytes, "
             f"`scoring.SCORE_LOGIT_BYTES`) against `Engine.prefill` of the same random prompt (pieces of 1,024 "
             f"tokens, last logits only); each row in a process of its own; peak = VmHWM; onnxruntime "
             f"{ort.__version__}, {a.threads} threads; {machine_line()}. The machine's 2 cores were shared with "
             f"other jobs: wall times are noisy, peak memory is not.", "",
             markdown_table(["prompt tokens", "mode", "logits per piece (at most)", "wall s", "RSS after load MiB",
                             "peak RSS MiB", "peak - after load MiB", "whole [T, vocab] logits MiB"],
                            [[r["T"], r["mode"], f"{r['piece']} tokens, {mib(r['piece'] * V * 4)} MiB"
                              if r["mode"] == "echo" else "-", f"{r['wall_s']:.2f}", mib(r["loaded"]),
                              mib(r["peak"]), mib(r["peak"] - r["loaded"]),
                              mib(r["T"] * V * 4) if r["mode"] == "echo" else "-"] for r in rows])]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
