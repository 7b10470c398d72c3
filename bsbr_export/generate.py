"""Generation from small pure steps: ``prefill``, ``decode_step``, ``sample``, ``generate``.

A *stepper* is any object with

    prefill(input_ids: np.ndarray[int64, (B, T)]) -> logits of the last position, (B, V)
    decode(tokens: np.ndarray[int64, (B,)]) -> logits (B, V)

so the PyTorch model and the ONNX Runtime sessions generate through the same loop.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Next token per row of logits (B, V): argmax at temperature 0, else seeded sampling."""
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rng = rng or np.random.default_rng()
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def generate(stepper, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, stop_token: int | None = None) -> np.ndarray:
    """Prompt (B, T) -> generated tokens (B, <= max_new_tokens). Stops early when every
    row has produced ``stop_token``; rows already stopped are padded with it."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise InputError(f"prompt must have shape [batch, seq] with seq >= 1, got {ids.shape}")
    if max_new_tokens < 0:
        raise InputError("max_new_tokens must be >= 0")
    rng = np.random.default_rng(seed)
    out = []
    done = np.zeros(ids.shape[0], dtype=bool)
    logits = stepper.prefill(ids)
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, rng)
        if stop_token is not None:
            tok = np.where(done, stop_token, tok)
            done |= tok == stop_token
        out.append(tok)
        if (stop_token is not None and done.all()) or step == max_new_tokens - 1:
            break
        logits = stepper.decode(tok)
    return np.stack(out, 1) if out else np.zeros((ids.shape[0], 0), dtype=np.int64)
