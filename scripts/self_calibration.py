"""Calibration without the user's text: what ``--calibrate self`` buys on held-out real text.

    python scripts/self_calibration.py [--model models/gpt2-pystdlib] [--minutes 4] [--tokens 32768]
                                       [--variants chunk:softmax lookback:gate ...] [--stage2]
                                       [--windows 8] [--out docs/results/self-calibration.md]

Per variant (LOCAL_WINDOW:RETRIEVAL_WEIGHTS, learned feature map, otherwise the main command's
conversion): convert, measure top-1 agreement, mean KL(original || converted) and perplexity against
the original on ``--windows`` held-out windows of 1024 tokens of the model's heldout_ids.npy (text
no calibration sees), calibrate with ``calibrate_run.self_calibrate`` (the main command's
``--calibrate self``: documents sampled from the original, attention transfer early-stopped on
held-out samples, then with ``--stage2`` KL distillation; a budget of ``--minutes``), and measure
again. Per-chunk agreement (chunk 2 and chunk 7 of each 1024-token window, chunk 128) shows whether
the later chunks keep up. Writes one Markdown fragment; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bsbr_export import metrics as M  # noqa: E402
from bsbr_export.calibrate_run import SELF_TOKENS, self_calibrate  # noqa: E402
from bsbr_export.convert import convert  # noqa: E402
from bsbr_export.fidelity import load_original, original_outputs, summarise, window_metrics, windows  # noqa: E402
from bsbr_export.util import atomic_write_text, machine_line, markdown_table  # noqa: E402

CHUNK = 128


def measure(hf_outs, model, wins) -> dict:
    per = [window_metrics(ref, model, x) for ref, x in zip(hf_outs, wins)]
    s = summarise(per)
    chunk = {c: float(np.mean([w["top1"][c * CHUNK:(c + 1) * CHUNK].float().mean().item() for w in per]))
             for c in (2, 7)}
    return {"top1": s["top1"][0], "kl": s["kl"][0], "ppl": s["ppl"], "ppl_ref": s["ppl_ref"], "chunk": chunk}


def long_rows(hf, model, held: np.ndarray, lengths, name: str, calibration: str) -> list:
    """Table 7's measure for each length: every non-overlapping window the held-out stream holds."""
    from studylib import long_perplexity

    out = []
    for T in lengths:
        r = long_perplexity(hf, model, held, T, None)
        if r is not None:
            out.append([name, calibration, T, r["windows"], f"{r['orig_pieces']:.3f}", f"{r['window']:.3f}",
                        M.format_change(r["change"])])
            print(out[-1], flush=True)
    return out


def tables(rows: list, long: list) -> list[str]:
    """The 1024-token table and, when measured, the long-context one (Markdown lines)."""
    lines = [markdown_table(["conversion", "calibration", "top-1", "mean KL (nats)", "perplexity vs original",
                             "top-1, chunk 2", "top-1, chunk 7", "time"], rows)]
    if long:
        lines += ["Long contexts: every non-overlapping window of T tokens the held-out stream holds, the converted "
                  "model over the whole window against the original in 1024-token pieces (the change's 95% "
                  "interval: a paired bootstrap over windows):", "",
                  markdown_table(["conversion", "calibration", "T", "windows", "original, 1024-token pieces",
                                  "converted, one window", "change [95% interval]"], long)]
    return lines


def row(name: str, calibration: str, m: dict, took: str = "") -> list:
    return [name, calibration, f"{m['top1']:.2%}", f"{m['kl']:.4f}", f"{m['ppl'] / m['ppl_ref'] - 1:+.2%}",
            f"{m['chunk'][2]:.1%}", f"{m['chunk'][7]:.1%}", took]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2-pystdlib")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=SELF_TOKENS, help="sampled training tokens [--calibrate self's]")
    ap.add_argument("--variants", nargs="+", default=["chunk:softmax", "lookback:gate"])
    ap.add_argument("--stage2", action="store_true", help="KL distillation after the transfer")
    ap.add_argument("--long-every", type=int, default=0,
                    help="stage 2: 1 step in N on a window of 4 joined documents, the original's targets from a "
                         "sliding context (0: never; --calibrate self uses calibrate_run.LONG_EVERY)")
    ap.add_argument("--long-len", type=int, default=None, help="tokens of a --long-every window [4 x 1024]")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--feature-map", default="learned", help="the conversion's feature map (learned starts as elu + 1)")
    ap.add_argument("--retrieval-until", default="all",
                    help="the conversion's retrieval_until: tokens, positions or all [all]")
    ap.add_argument("--long", type=int, nargs="*", default=[],
                    help="also perplexity over every non-overlapping window of these lengths the held-out stream "
                         "holds, one window against the original in n_positions pieces (table 7's measure)")
    ap.add_argument("--long-after-only", action="store_true",
                    help="--long for the calibrated model only (not the untrained conversion)")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="measure the conversions only (the retrieval-weights table: no calibration)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/self-calibration.md"))
    ap.add_argument("--title", default=None, help="the section's heading [by what the run measures]")
    ap.add_argument("--save", default=None,
                    help="also write each calibrated model to SAVE/LOCAL_WINDOW-WEIGHTS (a converted checkpoint)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    hf, d = load_original(a.model)
    wins = windows(np.load(d / "heldout_ids.npy"), 1024, a.windows)
    hf_outs = [original_outputs(hf, x[:, :-1]) for x in wins]
    held = np.load(d / "heldout_ids.npy")
    rows, long = [], []
    for v in a.variants:
        window, weights = v.split(":")
        until = int(a.retrieval_until) if a.retrieval_until.isdigit() else a.retrieval_until
        opts = dict(chunk_size=CHUNK, local_window=window, retrieval_weights=weights, feature_map=a.feature_map,
                    retrieval_until=until)
        fm = {"learned": "learned φ", "elu1": "elu + 1", "hedgehog": "hedgehog φ"}.get(a.feature_map, a.feature_map)
        model = convert(a.model, **opts)
        before = measure(hf_outs, model, wins)
        print(f"{v}: before {before}", flush=True)
        if not a.long_after_only or a.no_calibrate:
            long += long_rows(hf, model, held, a.long, f"{window}, {weights} weights, {fm}", "none")
        if a.no_calibrate:
            rows.append(row(f"{window}, {weights} weights, {fm}", "none", before))
            continue
        t_cal = time.time()
        with tempfile.TemporaryDirectory() as work:
            rec = self_calibrate(model, a.model, opts, a.minutes, Path(work) / "w", print, tokens=a.tokens,
                                 stage2=a.stage2, long_every=a.long_every, long_len=a.long_len)
        t_cal = time.time() - t_cal  # sampling, training, the held-out measures: what the user waits
        if a.save:
            from bsbr_export.convert import save_bsbr
            save_bsbr(model, Path(a.save) / f"{window}-{weights}", tokenizer_from=Path(a.model), force=True)
        after = measure(hf_outs, model, wins)
        long += long_rows(hf, model, held, a.long, f"{window}, {weights} weights, {fm}", "self")
        print(f"{v}: after {after}", flush=True)
        steps = " + ".join(f"{s['steps']}" for s in rec["stages"])
        took = f"{rec['seconds']:.0f} s training ({steps} steps), {t_cal:.0f} s in all"
        rows.append(row(f"{window}, {weights} weights, {fm}", "none", before))
        rows.append(row(f"{window}, {weights} weights, {fm}", "self", after, took))
    cmd = shlex.join(["python", "scripts/self_calibration.py", *(argv if argv is not None else sys.argv[1:])])
    title = a.title or ("Retrieval weights: the conversions before any calibration" if a.no_calibrate
                        else "Calibration without the user's text (`--calibrate self`)")
    how = ("no calibration" if a.no_calibrate else
           f"calibration: {a.tokens:,} training tokens sampled from the original (temperature 1), attention "
           f"transfer{' then KL distillation' if a.stage2 else ''}"
           + (f" ({'every step' if a.long_every == 1 else f'1 step in {a.long_every}'} on a window of "
              f"{a.long_len or 4 * 1024} tokens of joined samples, the original's targets over a sliding 1024-token "
              "context)" if a.long_every else "")
           + f", early-stopped on held-out samples, budget {a.minutes:g} min on 2 threads, sampling and measures "
           "included")
    lines = [f"## {title}", "", f"    {cmd.strip()}", "", f"- machine: {machine_line()}",
             f"- model {a.model}; chunk {CHUNK}, normalised retrieval, g = 0.03, retrieval until "
             f"{a.retrieval_until}; {how}",
             f"- measured on {len(wins)} held-out windows of 1024 tokens of heldout_ids.npy (real text the "
             "calibration never sees); perplexity against the original's on the same windows; chunk 2 / chunk 7: "
             "top-1 agreement inside those chunks", "", *tables(rows, long)]
    lines += [f"Whole script: {time.time() - t0:.0f} s."]
    atomic_write_text(a.out, "\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
