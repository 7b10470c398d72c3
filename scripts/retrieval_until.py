"""Retrieval beyond the position table: each conversion over long windows with every chunk
retrieving, and with the retrieval stopped at n_positions (``retrieval_until``).

    python scripts/retrieval_until.py [--model models/gpt2-pystdlib] [--conversions default self DIR ...]
                                      [--self-minutes 10] [--lengths 2048 4096 8192]
                                      [--out docs/results/retrieval-until.md]

A conversion is ``default`` (the main command's conversion, untrained), ``self`` (the main
command's ``--calibrate self``: its conversion options, calibrated here on samples of the original
for ``--self-minutes``) or a converted checkpoint directory. Per conversion and length: perplexity over every non-overlapping
window of that length the held-out stream holds, the converted model over the whole window, against
the original in n_positions pieces (table 7's measure, with its paired bootstrap interval), once
with ``retrieval_until`` all and once at the position table. The weights are the same; only the
config differs. Writes one Markdown fragment; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export import metrics as M  # noqa: E402
from bsbr_export.calibrate_run import calibration_options, self_calibrate  # noqa: E402
from bsbr_export.convert import build_model, convert, load_bsbr  # noqa: E402
from bsbr_export.fidelity import load_original, windows  # noqa: E402
from bsbr_export.util import atomic_write_text, machine_line, markdown_table  # noqa: E402


def describe(cfg) -> str:
    fm = {"elu1": "elu + 1", "hedgehog": "hedgehog φ", "learned": "learned φ"}.get(cfg.feature_map, cfg.feature_map)
    return f"{cfg.local_window}, {cfg.retrieval_weights} weights, {fm}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2-pystdlib", help="the original (its held-out stream)")
    ap.add_argument("--conversions", nargs="+", default=["default"],
                    help="'default' (the main command's conversion), 'self' (--calibrate self) or converted "
                         "checkpoint directories")
    ap.add_argument("--self-minutes", type=float, default=10.0, help="the budget of 'self' [10, --calibrate self's]")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--out", default=str(ROOT / "docs/results/retrieval-until.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    hf, d = load_original(a.model)
    held = np.load(d / "heldout_ids.npy")
    N = hf.config.n_positions
    models = []
    for c in a.conversions:
        if c == "self":
            import tempfile

            opts = calibration_options(a.model, {})
            m = convert(a.model, **opts)
            with tempfile.TemporaryDirectory() as work:
                self_calibrate(m, a.model, opts, a.self_minutes, Path(work) / "w", print)
            name, calibrated = "--calibrate self: " + describe(m.cfg), f"self, {a.self_minutes:g} min"
        else:
            m = convert(a.model) if c == "default" else load_bsbr(c)
            name = ("default: " if c == "default" else f"{Path(c).name}: ") + describe(m.cfg)
            calibrated = "none" if c == "default" else "calibrated"
        models.append((name, calibrated, m.eval()))
    rows = []
    with torch.no_grad():
        for T in a.lengths:
            wins = windows(held, T, None)
            if not wins:
                print(f"T={T}: the held-out stream holds no window; skipped", flush=True)
                continue
            orig = [torch.cat([M.nll(hf(input_ids=x[:, s:min(s + N, T)]).logits[0], x[0, s + 1:min(s + N, T) + 1])
                               for s in range(0, T, N)]) for x in wins]
            for name, calibrated, m in models:
                for until in (None, N):
                    mu = build_model(m.state_dict(), dataclasses.replace(m.cfg, retrieval_until=until)).eval()
                    nll = [M.nll(mu(x[:, :-1])[0], x[0, 1:]) for x in wins]
                    ch = M.perplexity_change(orig, nll)
                    rows.append([name, calibrated, "all" if until is None else f"{until} (positions)", T, len(wins),
                                 f"{M.perplexity(orig):.3f}", f"{M.perplexity(nll):.3f}", M.format_change(ch)])
                    print(rows[-1], flush=True)
    cmd = shlex.join(["python", "scripts/retrieval_until.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["## Retrieval beyond the position table (`retrieval_until`)", "", f"    {cmd}", "",
             f"- machine: {machine_line()}",
             f"- model {a.model}; every non-overlapping window of T tokens of its heldout_ids.npy; the converted "
             f"model over the whole window against the original in {N}-token pieces (the change's 95% interval: a "
             "paired bootstrap over windows); `retrieval until` all: every chunk retrieves, "
             f"{N}: chunks that start at or after token {N} keep the local softmax alone (same weights)", "",
             markdown_table(["conversion", "calibration", "retrieval until", "T", "windows",
                             f"original, {N}-token pieces", "converted, one window", "change [95% interval]"], rows),
             "", f"Whole script: {time.time() - t0:.0f} s."]
    atomic_write_text(a.out, "\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
