"""Text sampled from the original GPT-2 itself: calibration data for a user who has nothing but
the checkpoint.

``sample_windows`` runs the original (HF ``GPT2LMHeadModel``) with its KV cache, ``batch`` rows
at a time, each row a document that starts from the BOS token and is sampled at temperature 1
(optionally nucleus-truncated), so the windows follow the model's own next-token distribution:
what the conversion is calibrated to imitate. Seeded, so the same call gives the same tokens.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import numpy as np
import torch

from .errors import ConfigError


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside the smallest set of probability >= top_p set to -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@torch.no_grad()
def sample_windows(hf, n_windows: int, seq_len: int, batch: int = 16, seed: int = 0, top_p: float | None = None,
                   bos: int | None = None, progress: Callable[[str], None] | None = None) -> np.ndarray:
    """(n_windows, seq_len) int64 token ids sampled from ``hf``; each row a fresh document after
    BOS (the config's ``bos_token_id``, else ``eos_token_id``, else token 0; BOS itself not kept)."""
    cfg = hf.config
    if n_windows < 1 or seq_len < 1 or batch < 1:
        raise ConfigError(f"need n_windows, seq_len and batch >= 1, got {n_windows}, {seq_len}, {batch}")
    if seq_len >= cfg.n_positions:
        raise ConfigError(f"sampled windows must fit the original's {cfg.n_positions} positions "
                          f"(BOS included), got {seq_len} tokens")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if bos is None:
        bos = next((t for t in (cfg.bos_token_id, cfg.eos_token_id) if t is not None), 0)
    # transformers 5 names the KV cache ``cache``; 4.x ``past_key_values``.
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((n_windows, seq_len), dtype=np.int64)
    t0 = time.time()
    for start in range(0, n_windows, batch):
        rows = min(batch, n_windows - start)
        x = torch.full((rows, 1), bos, dtype=torch.long)
        past = None
        for t in range(seq_len):
            o = hf(input_ids=x, use_cache=True, **{key: past})
            past = o[key]
            logits = o.logits[:, -1].float()
            if top_p is not None and top_p < 1.0:
                logits = _nucleus(logits, top_p)
            x = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # (rows, 1)
            out[start:start + rows, t] = x[:, 0].numpy()
        if progress is not None:
            done = start + rows
            rate = done * seq_len / max(time.time() - t0, 1e-9)
            progress(f"sampled {done}/{n_windows} windows of {seq_len} tokens from the original "
                     f"({rate:,.0f} tokens/s)")
    return out
