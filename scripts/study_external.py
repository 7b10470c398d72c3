"""Study table 10: summarisation (ROUGE) and long-context QA, on datasets given by path.

    python scripts/study_external.py [--model models/gpt2-pystdlib]
        [--summarisation FILE.jsonl] [--qa FILE.jsonl] [--limit N] [--quick]

Summarisation lines: {"article": ..., "summary": ...}; the model continues
``article + "\\nTL;DR:"`` greedily for --new-tokens tokens, scored by ROUGE-1/2/L F1 on
whitespace tokens. QA lines: {"context": ..., "question": ..., "answer": ...}; the model
continues ``context + "\\nQuestion: " + question + "\\nAnswer:"``; an item counts when the
generated text, stripped, starts with the answer. The original runs only prompts within
its position table. Without a dataset path the rows are written as unrun.
Writes docs/results/study_external.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import studylib as S
from bsbr_export import metrics as M
from bsbr_export.generate import generate
from bsbr_export.runtime import TorchStepper
from bsbr_export.util import markdown_table


def options():
    ap = S.parser(__doc__)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--summarisation", type=Path, default=None)
    ap.add_argument("--qa", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", nargs="*", default=["local", "normalised"])
    ap.add_argument("--calibrated", type=Path, nargs="*", default=[])
    a = ap.parse_args()
    if a.quick:
        a.limit, a.new_tokens, a.chunk_size = 2, 4, 16
    return a


def read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


class HFStepper:
    """Greedy generation with the original model, recomputing the prefix (no cache)."""

    def __init__(self, hf):
        self.hf, self.ids = hf, None

    @torch.no_grad()
    def prefill(self, ids):
        self.ids = torch.as_tensor(ids)
        return self.hf(input_ids=self.ids).logits[:, -1].numpy()

    @torch.no_grad()
    def decode(self, tok):
        self.ids = torch.cat([self.ids, torch.as_tensor(tok)[:, None]], 1)
        return self.hf(input_ids=self.ids).logits[:, -1].numpy()


def run(models, hf, tok, prompts, new_tokens, N):
    """{model name: [generated text or None when the model cannot run the prompt]}."""
    out = {n: [] for n in ["original", *models]}
    for p in prompts:
        ids = np.asarray([tok(p)["input_ids"]], dtype=np.int64)
        T = ids.shape[1] + new_tokens
        out["original"].append(tok.decode(generate(HFStepper(hf), ids, new_tokens)[0]) if T <= N else None)
        for n, m in models.items():
            out[n].append(tok.decode(generate(TorchStepper(m, max_len=T), ids, new_tokens)[0]))
    return out


def main():
    args = options()
    t0, hf, model_dir, _, _ = S.start(args, with_heldout=False)
    tok = S.tokenizer(model_dir)
    N = hf.config.n_positions
    models = {n: S.load_converted(args.model, chunk_size=args.chunk_size, **S.VARIANTS[n]) for n in args.variants}
    for p in args.calibrated:
        if Path(p).is_dir():
            from bsbr_export.convert import load_bsbr

            models[f"calibrated: {Path(p).name}"] = load_bsbr(p)
    names = ["original", *models]
    out = ["## Summarisation and long-context QA (table 10)", ""]
    if args.summarisation is None and args.qa is None:
        out += ["**Unrun here.** These rows need datasets that are not available offline (the study used news "
                "articles for summarisation and a long-context question set). The script takes them by path:", "",
                "    python scripts/study_external.py --summarisation articles.jsonl --qa questions.jsonl", "",
                S.provenance(args, "none given (no dataset path)"),
                markdown_table(["task", "metric"] + names,
                               [["summarisation", "ROUGE-1 / ROUGE-2 / ROUGE-L F1"] + ["unrun"] * len(names),
                                ["long-context QA", "accuracy"] + ["unrun"] * len(names)])]
    if args.summarisation is not None:
        data = read_jsonl(args.summarisation, args.limit)
        gen = run(models, hf, tok, [d["article"] + "\nTL;DR:" for d in data], args.new_tokens, N)
        row = ["summarisation", f"ROUGE-1 / 2 / L F1 ({len(data)} articles)"]
        for n in names:
            pairs = [(d["summary"].split(), g.split()) for d, g in zip(data, gen[n]) if g is not None]
            if not pairs:
                row.append("cannot run (prompts exceed the position table)")
                continue
            r = [np.mean([f(a, b) for a, b in pairs]) for f in
                 (lambda a, b: M.rouge_n(a, b, 1), lambda a, b: M.rouge_n(a, b, 2), M.rouge_l)]
            row.append(" / ".join(f"{v:.3f}" for v in r) + f" (n={len(pairs)})")
        out += ["### Table 10a: summarisation", "", S.provenance(args, f"`{args.summarisation}`"),
                markdown_table(["task", "metric"] + names, [row])]
    if args.qa is not None:
        data = read_jsonl(args.qa, args.limit)
        prompts = [d["context"] + "\nQuestion: " + d["question"] + "\nAnswer:" for d in data]
        gen = run(models, hf, tok, prompts, args.new_tokens, N)
        row = ["long-context QA", f"accuracy ({len(data)} questions)"]
        for n in names:
            ok = [g.strip().startswith(d["answer"].strip()) for d, g in zip(data, gen[n]) if g is not None]
            row.append(f"{100 * np.mean(ok):.1f}% (n={len(ok)})" if ok else "cannot run (prompts too long)")
        out += ["### Table 10b: long-context QA", "", S.provenance(args, f"`{args.qa}`"),
                markdown_table(["task", "metric"] + names, [row])]
    out.append(f"_study_external wall time: {time.time() - t0:.0f} s_\n")
    S.write_fragment(args, "external", "\n".join(out))


if __name__ == "__main__":
    main()
