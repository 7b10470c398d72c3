"""How far a conversion is from its original GPT-2: next-token agreement and KL on held-out text.

Both torch: the original (HF ``GPT2LMHeadModel``, eager attention) and the converted BSBR
model read the same windows. The study's tables (scripts/study_fidelity.py, table 2 of
docs/RESULTS.md) and the main command's fidelity line come from the functions here:
``window_metrics`` per window, ``summarise`` over windows; ``agreement`` is the two together.
The parity check compares the exported graphs with the *converted* torch model; this is the
conversion's own change, which no export undoes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .errors import BSBRExportError, ConfigError

WINDOW = 1024  # tokens of one window (at most the original's n_positions)
WINDOWS = 4  # held-out windows the main command reads, spread evenly over the stream


def windows(ids: np.ndarray, T: int, n: int | None) -> list[torch.Tensor]:
    """Up to ``n`` non-overlapping windows of T + 1 tokens (inputs + shifted targets), spread
    evenly over the stream (all of them when n is None)."""
    total = (len(ids) - 1) // T
    if total < 1:
        return []
    idx = np.arange(total) if n is None or n >= total else np.linspace(0, total - 1, n).round().astype(int)
    return [torch.from_numpy(ids[i * T: i * T + T + 1].copy())[None] for i in idx]


def load_original(source):
    """(the original GPT-2 in torch, its directory), as the study loads it."""
    from transformers import GPT2LMHeadModel

    from .convert import resolve_model_dir

    d = resolve_model_dir(source)
    return GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval(), d


@torch.no_grad()
def original_outputs(hf, x: torch.Tensor):
    """(logits (1, T, V), hidden states: embeddings, after each block, final after ln_f)."""
    out = hf(input_ids=x, output_hidden_states=True)
    return out.logits, list(out.hidden_states)


@torch.no_grad()
def converted_outputs(model, x: torch.Tensor):
    return model(x, output_hidden_states=True)


def compare(ref_logits, ref_hidden, logits, hidden, targets) -> dict:
    """Per-position metrics of one window, as 1-D tensors over positions."""
    r = {"kl": M.kl_next_token(ref_logits[0], logits[0]),
         "mse": M.mse(ref_hidden[-1][0], hidden[-1][0]),
         "cos_final": M.cosine(ref_hidden[-1][0], hidden[-1][0]),
         "nll_ref": M.nll(ref_logits[0], targets[0]),
         "nll": M.nll(logits[0], targets[0])}
    for i in range(1, len(hidden) - 1):
        r[f"cos_layer{i}"] = M.cosine(ref_hidden[i][0], hidden[i][0])
    for k in (1, 5, 10):
        r[f"top{k}"] = M.topk_agreement(ref_logits[0], logits[0], k)
    return r


@torch.no_grad()
def window_metrics(reference_outputs, model, x: torch.Tensor) -> dict:
    """``compare`` of one window of T + 1 tokens: ``reference_outputs`` are the original's
    ``original_outputs`` on its first T tokens, ``model`` reads the same T."""
    logits, hidden = converted_outputs(model, x[:, :-1])
    return compare(*reference_outputs, logits, hidden, x[:, 1:])


def summarise(per_window: list[dict]) -> dict:
    """Mean +- std over windows of each window's mean; perplexities over all predictions."""
    out = {}
    for key in per_window[0]:
        if key.startswith("nll"):
            continue
        out[key] = M.mean_std([w[key].mean().item() for w in per_window])
    out["ppl_ref"] = M.perplexity([w["nll_ref"] for w in per_window])
    out["ppl"] = M.perplexity([w["nll"] for w in per_window])
    return out


def agreement(hf, model, wins: list[torch.Tensor]) -> dict:
    """``summarise`` of ``window_metrics`` over the windows: what a row of tables 1 and 2 holds."""
    return summarise([window_metrics(original_outputs(hf, x[:, :-1]), model, x) for x in wins])


# --------------------------------------------------------------------------- the main command's line

def eval_ids(path, model_dir: Path, T: int, least: int) -> np.ndarray:
    """The first T + 1 token ids of a UTF-8 text file (the model's tokenizer), checked: a missing
    or unreadable file, one that is empty or not UTF-8, or fewer than ``least`` + 1 tokens raise
    ``ConfigError`` with one line."""
    from .runtime.text import Tokenizer

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"--eval-text {p}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--eval-text {p}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    if not text.strip():
        raise ConfigError(f"--eval-text {p}: empty file")
    try:
        tok = Tokenizer.from_dir(model_dir)
    except BSBRExportError as e:
        raise ConfigError(f"--eval-text needs the model's tokenizer: {str(e).splitlines()[0]}") from None
    ids = tok.encode(text)
    if len(ids) < least + 1:
        raise ConfigError(f"--eval-text {p}: {len(ids)} tokens, too short: the fidelity check needs at least "
                          f"{least + 1} (two chunks and the next token)")
    return np.asarray(ids[:T + 1], dtype=np.int64)


def peak_bytes(cfg) -> int:
    """Estimated peak of the fidelity step: the original's and the converted model's fp32
    weights, both models' logits and hidden states of one window, the float64 log-softmaxes of
    ``compare``, one layer's eager attention weights, and the process (as ``check.peak_bytes``)."""
    from .check import n_params

    T, V, E = min(WINDOW, cfg.n_positions), cfg.vocab_size, cfg.n_embd
    outputs = 2 * (T * V + (cfg.n_layer + 1) * T * E) * 4
    return 2 * n_params(cfg) * 4 + outputs + 4 * T * V * 8 + 2 * cfg.n_head * T * T * 4 + (15 << 28)


def plan(cfg, model_dir: Path, eval_text=None, heldout=None) -> dict:
    """What the fidelity step will read, decided (and ``--eval-text`` checked) before any work:
    ``{"ids", "windows", "tokens", "source"}``, or ``{"skipped": reason}`` without a text or
    without the memory to hold the original GPT-2 beside the conversion."""
    from .check import available_bytes, gib

    T = min(WINDOW, cfg.n_positions)
    least = min(2 * cfg.chunk_size, T)  # past the first chunk, which is exact by construction
    if eval_text is not None:
        ids = eval_ids(eval_text, model_dir, T, least)
        p = {"ids": ids, "windows": 1, "tokens": len(ids) - 1, "source": str(eval_text)}
    elif heldout is not None and len(heldout) > least:
        T = min(T, len(heldout) - 1)
        n = min(WINDOWS, (len(heldout) - 1) // T)
        p = {"ids": heldout, "windows": n, "tokens": T, "source": "heldout_ids.npy"}
    else:
        what = "ships no heldout_ids.npy" if heldout is None else f"has {len(heldout)} held-out tokens only"
        return {"skipped": f"the model {what}; pass --eval-text FILE (a UTF-8 text of {T}+ tokens) to "
                           f"compare the conversion with the original GPT-2"}
    need, have = peak_bytes(cfg), available_bytes()
    if have is not None and need > have:
        return {"skipped": f"the original GPT-2 beside the conversion needs about {gib(need)}, more than the "
                           f"{gib(have)} available"}
    return p


def measure(source, model, p: dict) -> dict:
    """Top-1 agreement and mean KL(original || converted) over the planned windows, for the manifest."""
    import gc

    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command's log has its own progress lines
    try:
        hf, _ = load_original(source)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    wins = windows(p["ids"], p["tokens"], p["windows"])
    s = agreement(hf, model, wins)
    del hf
    gc.collect()
    return {"reference": "original GPT-2 (torch)", "candidate": "converted BSBR model (torch)",
            "text": p["source"], "windows": len(wins), "tokens_per_window": p["tokens"],
            "top1": s["top1"][0], "top1_std": s["top1"][1], "kl_mean_nats": s["kl"][0], "kl_std": s["kl"][1]}


def summary_line(f: dict) -> str:
    if "skipped" in f:
        return f"skipped: {f['skipped']}"
    return (f"converted vs original GPT-2 (torch): top-1 agreement {f['top1']:.1%}, mean KL "
            f"{f['kl_mean_nats']:.3f} nats ({f['windows']} window{'s' if f['windows'] > 1 else ''} of "
            f"{f['tokens_per_window']} tokens, {f['text']})")
