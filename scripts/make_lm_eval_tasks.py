"""Write the small lm-eval tasks of tests/data/lm_eval/ from the bundled model's held-out text.

The held-out text is ``models/gpt2-pystdlib/heldout_ids.npy`` decoded (Python standard library
files the model never trained on, joined by ``<|endoftext|>``). Three tasks, each a JSONL file
beside its YAML (deterministic: the same files on every run):

- ``nextline.jsonl`` (multiple choice, ``pystdlib_nextline``): 12 lines of code as context; the
  true next line and 3 other non-blank lines of the held-out text as choices.
- ``heldout.jsonl`` (``loglikelihood_rolling``, ``pystdlib_heldout``): 4 passages of held-out
  code, one longer than a 512-token window (so lm-eval scores it in two windows).
- ``complete.jsonl`` (``generate_until``, ``pystdlib_complete``): up to 4 contexts ending inside a
  line, whose rest is generated up to a newline.

    python scripts/make_lm_eval_tasks.py [--out tests/data/lm_eval]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "gpt2-pystdlib"


def heldout_files() -> list[str]:
    """The held-out files' texts (split at <|endoftext|>), long ones only."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    ids = np.load(BUNDLED / "heldout_ids.npy").astype(np.int64)
    eos = tok.token_to_id("<|endoftext|>")
    cuts = [-1, *np.flatnonzero(ids == eos).tolist(), len(ids)]
    texts = [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:]) if b - a > 400]
    return [t for t in texts if t.isascii()]


def code_lines(text: str) -> list[str]:
    return [x for x in text.split("\n") if x.strip() and len(x) < 100]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "lm_eval")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    files = heldout_files()
    pool = [x for f in files for x in code_lines(f)]
    nextline, complete = [], []
    for i, f in enumerate(files[:16]):  # 12 multiple-choice docs, then up to 4 completions
        lines = code_lines(f)
        at = int(rng.integers(12, len(lines) - 1))
        context, gold = "\n".join(lines[at - 12:at]) + "\n", lines[at]
        if i < 12:
            others = []
            while len(others) < 3:
                x = pool[int(rng.integers(len(pool)))]
                if x != gold and x not in others:
                    others.append(x)
            k = int(rng.integers(4))
            choices = others[:k] + [gold] + others[k:]
            nextline.append({"context": context, "choices": choices, "gold": k})
        else:  # the rest of a line begun in the context, cut at its middle space (a natural token boundary)
            body = gold.lstrip()
            spaces = [j for j, c in enumerate(body) if c == " "]
            if spaces:
                cut = len(gold) - len(body) + min(spaces, key=lambda j: abs(j - len(body) // 2))
                complete.append({"context": context + gold[:cut], "target": gold[cut:]})
    heldout = []
    for f, chars in zip(files[16:20], (900, 1200, 1500, 3000)):  # the last spans two 512-token windows
        start = f.find("\n", len(f) // 3) + 1
        heldout.append({"text": f[start:start + chars].rsplit("\n", 1)[0] + "\n"})
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("nextline", nextline), ("heldout", heldout), ("complete", complete)):
        with open(a.out / f"{name}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"wrote {a.out / name}.jsonl ({len(rows)} docs)")


if __name__ == "__main__":
    main()
