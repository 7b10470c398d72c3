"""Study table 8: a long-context retrieval task built from the held-out corpus.

    python scripts/study_retrieval.py [--model models/gpt2-pystdlib] [--quick]
                                      [--calibrated out/study/calibrated-normalised-conversion ...]

Item: an identifier of at least two tokens whose most recent earlier use in the same file
lies more than two chunks back (chunk distance >= 3 on the window's chunk grid), with the
same continuation tokens both times. The model sees the window up to and including the
identifier's first token and must predict every remaining token of it (teacher-forced
argmax; an item counts when all are right). A control runs the original model on only the
last two chunks before the identifier: items it solves need no long-range information;
the rest are the "hard" items. Writes docs/results/study_retrieval.md.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

import studylib as S
from bsbr_export.convert import load_bsbr
from bsbr_export.util import markdown_table

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def options():
    ap = S.parser(__doc__)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--windows", type=int, default=None, help="windows per length (default: all)")
    ap.add_argument("--min-chars", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=["plain", "local", "normalised"],
                    help="rows: studylib variants or baselines ('window W', 'sinks S + window W')")
    ap.add_argument("--calibrated", type=Path, nargs="*", default=[])
    a = ap.parse_args()
    if a.quick:
        a.chunk_size, a.lengths, a.windows = 16, [64, 256], 2
    return a


def token_spans(tok, ids: np.ndarray):
    """(byte-level text of the stream, start offset of every token)."""
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    starts = np.zeros(len(pieces) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(p) for p in pieces])
    return "".join(pieces), starts


def occurrences(text, starts, min_chars):
    """Identifier uses aligned with token ends: (first token a, end token b exclusive, name)."""
    ends = {int(e): i for i, e in enumerate(starts[1:])}  # char end -> token index
    out = []
    for m in IDENT.finditer(text):
        if len(m.group()) < min_chars or m.end() not in ends:
            continue
        b = ends[m.end()] + 1
        a = int(np.searchsorted(starts, m.start(), side="right") - 1)
        if b - a >= 2:
            out.append((a, b, m.group()))
    return out


def build_items(ids, tok, L, T, n_windows, min_chars):
    """Per window: (window start, [(a, b, distance)]), a/b relative to the window start; windows
    spread over the stream as in ``studylib.windows``."""
    eot = tok.convert_tokens_to_ids(S.EOT)
    text, starts = token_spans(tok, ids)
    occ = occurrences(text, starts, min_chars)
    file_of = np.cumsum(ids == eot)
    n_total = len(ids) // T
    idx = (np.arange(n_total) if n_windows is None or n_windows >= n_total
           else np.linspace(0, n_total - 1, n_windows).round().astype(int))
    by_window = {int(w): [] for w in idx}
    last = {}
    for a, b, name in occ:
        key = (int(file_of[a]), name)
        prev = last.get(key)
        last[key] = (a, b)
        if prev is None:
            continue
        w = a // T
        pa, pb = prev
        if w not in by_window or pa < w * T or b > (w + 1) * T:
            continue
        if (a - w * T) // L - (pb - 1 - w * T) // L < 3:
            continue
        if not np.array_equal(ids[a + 1:b], ids[pa + 1:pb]):
            continue
        by_window[w].append((a - w * T, b - w * T, a - pb + 1))
    return [(int(w) * T, by_window[int(w)]) for w in idx]


@torch.no_grad()
def score(logits, x, a, b):
    """(all continuation tokens x[a+1..b-1] predicted by argmax at positions a..b-2,
    their mean negative log-likelihood in nats)."""
    pred, tgt = logits[0, a:b - 1].float(), x[0, a + 1:b]
    nll = -torch.log_softmax(pred, -1).gather(-1, tgt[:, None]).mean().item()
    return bool((pred.argmax(-1) == tgt).all()), nll


@torch.no_grad()  # every model's logits of a window are held at once: no autograd graphs beside them
def main():
    args = options()
    t0, hf, model_dir, ids, data_desc = S.start(args)
    tok = S.tokenizer(model_dir)
    L, N = args.chunk_size, hf.config.n_positions
    rows_ = args.variants + (S.added_rows(L) if args.with_baselines else [])  # names: variants or baselines
    models = {n: S.load_model(args.model, n, L) for n in dict.fromkeys(rows_)}
    for p in args.calibrated:
        if Path(p).is_dir():
            models[f"calibrated: {Path(p).name}"] = load_bsbr(p)
    names = list(models)
    rows, nll_rows = [], []
    for T in args.lengths:
        wins = build_items(ids, tok, L, T, args.windows, args.min_chars)
        res = {n: [] for n in ["original", "control"] + names}
        dist = []
        for w0, items in wins:
            if not items:
                continue
            x = torch.from_numpy(ids[w0:w0 + T].copy())[None]
            outs = {n: m(x) for n, m in models.items()}
            if T <= N:
                outs["original"] = hf(input_ids=x).logits
            for a, b, dd in items:
                dist.append(dd)
                lo = max(0, (a // L - 2) * L)
                ctl = hf(input_ids=x[:, lo:b]).logits
                res["control"].append(score(ctl, x[:, lo:b], a - lo, b - lo))
                for n, lg in outs.items():
                    res[n].append(score(lg, x, a, b))
        if not dist:
            rows.append([T, "none", 0] + [""] * (3 + len(names)))
            continue
        dist = np.asarray(dist)
        hard = ~np.asarray([ok for ok, _ in res["control"]])
        for label, sel in [("all", np.ones_like(hard)), ("hard", hard),
                           (f"source > {N} back", dist > N)]:
            if not sel.any():
                continue

            def acc(n):
                if not res[n]:
                    return "cannot run" if n == "original" else "n/a"
                v = np.asarray([ok for ok, _ in res[n]])[sel]
                return f"{100 * v.mean():.1f}% ({v.sum()}/{len(v)})"

            def nll(n):
                if not res[n]:
                    return "cannot run" if n == "original" else "n/a"
                return f"{np.asarray([x for _, x in res[n]])[sel].mean():.3f}"
            head = [T, label, int(sel.sum()), f"{int(dist[sel].min())}-{int(dist[sel].max())}"]
            rows.append(head + [acc("control"), acc("original")] + [acc(n) for n in names])
            nll_rows.append(head + [nll("control"), nll("original")] + [nll(n) for n in names])
    desc = (f"{data_desc}; non-overlapping windows of T tokens ({args.windows or 'all'} per length), chunk {L}; "
            f"identifiers of ≥ {args.min_chars} characters and ≥ 2 tokens")
    out = ["## Long-context retrieval (table 8)", "",
           "### Table 8: identifier recall from more than two chunks back", "", S.provenance(args, desc),
           markdown_table(["T", "items", "count", "distance (tokens)", "control: original on last 2 chunks",
                           "original (full window)"] + names, rows),
           "Accuracy: the share of items whose every continuation token is the model's argmax. "
           "`hard`: items the control gets wrong, so the answer has to come from more than two chunks back. "
           f"The original cannot run windows longer than its {N} positions. Distance: tokens from the end of the "
           "previous use to the identifier.", "",
           "### Table 8 (cont.): how likely each model finds the identifier", "",
           "Mean over items of the mean negative log-likelihood (nats per token) of the identifier's continuation "
           "tokens, same items and models as above; lower is better. Unlike exact recall this is graded: a model "
           "that uses the earlier occurrence puts more probability on the right tokens even when another token "
           "wins the argmax. The control sees only the last two chunks.", "",
           markdown_table(["T", "items", "count", "distance (tokens)", "control: original on last 2 chunks",
                           "original (full window)"] + names, nll_rows)]
    out.append(f"_study_retrieval wall time: {time.time() - t0:.0f} s_\n")
    S.write_fragment(args, "retrieval", "\n".join(out))


if __name__ == "__main__":
    main()
