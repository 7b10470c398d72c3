"""Train the bundled GPT-2-architecture reference model on the Python standard library.

The corpus is the ``.py`` sources of the running interpreter's standard library
(``site-packages`` and test suites excluded), split into train / held-out *by file*.
The script trains a byte-level BPE tokenizer, then a small ``GPT2LMHeadModel``,
and writes weights (safetensors), tokenizer files, the corpus manifest, the
held-out token ids and a model card into ``--out``.

    python scripts/train_reference_model.py --out models/gpt2-pystdlib

Everything is seeded; on a 2-core CPU the default budget takes about 45 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"


def corpus_files(root: Path) -> list[Path]:
    """Sorted stdlib ``.py`` files, without site-packages and test suites."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "test") or "tests" in parts or "__pycache__" in parts:
            continue
        out.append(p)
    return out


def is_heldout(rel: str) -> bool:
    # Split by file on a hash of the relative path: stable across machines.
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0


def read_corpus(root: Path):
    train, heldout, manifest = [], [], []
    digest = hashlib.sha256()
    for p in corpus_files(root):
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        h = hashlib.sha256(text.encode()).hexdigest()
        digest.update(f"{rel}\t{h}\n".encode())
        split = "heldout" if is_heldout(rel) else "train"
        manifest.append({"path": rel, "sha256": h, "split": split})
        (heldout if split == "heldout" else train).append(text)
    return train, heldout, manifest, digest.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    return tok


def encode_all(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    tot, cnt = 0.0, 0
    for i in range(n):
        x = torch.from_numpy(data[i * seq_len : (i + 1) * seq_len + 1].astype(np.int64))[None]
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        # HF shifts labels internally: seq_len - 1 predictions per window.
        tot += out.loss.item() * (seq_len - 1)
        cnt += seq_len - 1
    model.train()
    return tot / cnt


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/gpt2-pystdlib"))
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)

    t0 = time.time()
    train_txt, held_txt, manifest, corpus_hash = read_corpus(args.stdlib)
    print(f"corpus: {len(train_txt)} train files, {len(held_txt)} held-out files, sha256 {corpus_hash[:16]}", flush=True)
    tok = train_tokenizer(train_txt, args.vocab_size)
    train_ids = encode_all(tok, train_txt)
    held_ids = encode_all(tok, held_txt)
    print(f"tokens: {len(train_ids)} train, {len(held_ids)} held-out ({time.time() - t0:.0f}s)", flush=True)

    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        bos_token_id=eot, eos_token_id=eot, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = np.random.default_rng(args.seed)
    T = args.seq_len
    t_train = time.time()
    for step in range(args.steps):
        starts = rng.integers(0, len(train_ids) - T - 1, size=args.batch_size)
        x = torch.from_numpy(np.stack([train_ids[s : s + T] for s in starts]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} lr {lr_at(step):.2e} "
                  f"{el:.0f}s elapsed, {el / (step + 1) * (args.steps - step - 1):.0f}s left", flush=True)

    held_loss = evaluate(model, held_ids, T)
    uni = unigram_loss(train_ids, held_ids, vocab)
    tokens_seen = args.steps * args.batch_size * T
    print(f"held-out loss {held_loss:.4f} ppl {math.exp(held_loss):.2f}; unigram ppl {math.exp(uni):.1f}", flush=True)

    # Write everything into a temporary sibling, then rename: never a half-written model dir.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=args.out.name + ".", dir=args.out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tok = GPT2TokenizerFast(tokenizer_object=tok._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                               model_max_length=1024)
    hf_tok.save_pretrained(tmp)
    np.save(tmp / "heldout_ids.npy", held_ids.astype(np.int32))
    stats = {
        "corpus": f"Python {platform.python_version()} standard library .py sources (no site-packages, no test suites)",
        "corpus_sha256": corpus_hash,
        "files_train": len(train_txt), "files_heldout": len(held_txt),
        "tokens_train": int(len(train_ids)), "tokens_heldout": int(len(held_ids)),
        "vocab_size": vocab, "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
        "n_positions": 1024, "parameters": n_params,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": T, "tokens_seen": tokens_seen,
        "heldout_loss": held_loss, "heldout_ppl": math.exp(held_loss),
        "unigram_heldout_loss": uni, "unigram_heldout_ppl": math.exp(uni),
        "train_seconds": time.time() - t_train, "torch": torch.__version__,
        "command": "python scripts/train_reference_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (tmp / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (tmp / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (tmp / "README.md").write_text(model_card(stats))
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if args.out.exists():
        import shutil
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", flush=True)


def model_card(s: dict) -> str:
    return f"""# gpt2-pystdlib: a small GPT-2 trained on the Python standard library

A GPT-2-architecture language model of Python code, bundled so that every test
and the main command run offline. It loads with plain transformers:

```python
from transformers import GPT2LMHeadModel, AutoTokenizer
model = GPT2LMHeadModel.from_pretrained("models/gpt2-pystdlib")
tok = AutoTokenizer.from_pretrained("models/gpt2-pystdlib")
```

| field | value |
|---|---|
| architecture | GPT-2 ({s['n_layer']} layers, width {s['n_embd']}, {s['n_head']} heads of dim {s['n_embd'] // s['n_head']}, n_positions {s['n_positions']}) |
| parameters | {s['parameters']:,} (embeddings tied) |
| tokenizer | byte-level BPE, {s['vocab_size']} tokens, trained on the train split |
| corpus | {s['corpus']} |
| corpus hash | sha256 `{s['corpus_sha256']}` over sorted `path<TAB>sha256(file)` lines; every file is listed in `corpus_manifest.json` |
| split | by file: sha1(relative path) mod 20 == 0 is held out ({s['files_train']} train files, {s['files_heldout']} held-out files) |
| tokens | {s['tokens_train']:,} train, {s['tokens_heldout']:,} held-out |
| training | {s['steps']} steps x {s['batch_size']} sequences x {s['seq_len']} tokens = {s['tokens_seen']:,} tokens seen, AdamW, cosine schedule, {s['train_seconds'] / 60:.0f} min on 2 CPU cores |
| **held-out loss / perplexity** | **{s['heldout_loss']:.3f} nats / {s['heldout_ppl']:.2f}** (non-overlapping {s['seq_len']}-token windows) |
| unigram baseline (add-one, train counts) | {s['unigram_heldout_loss']:.3f} nats / {s['unigram_heldout_ppl']:.1f} |

`heldout_ids.npy` holds the held-out token stream (files joined by `<|endoftext|>`),
used by the parity checks and the research scripts. `training_stats.json` has the
raw numbers above.

Reproduce (the corpus hash depends on the interpreter's exact stdlib):

    {s['command']}
"""


if __name__ == "__main__":
    main()
