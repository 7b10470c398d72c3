"""Generation from small pure steps: ``prefill``, ``decode_step``, ``sample``, ``generate``.

A *stepper* is any object with

    prefill(input_ids: np.ndarray[int64, (B, T)]) -> logits of the last position, (B, V)
    decode(tokens: np.ndarray[int64, (B,)]) -> logits (B, V)

so the PyTorch model and the ONNX Runtime sessions generate through the same loop. The sampling
code is ``bsbr_export.runtime.sampling`` (shared with the runtime's ``Runtime.generate``).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .runtime.sampling import SamplingOptions, sample

__all__ = ["generate", "sample"]


def generate(stepper, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, stop_token: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Prompt (B, T) -> generated tokens (B, <= max_new_tokens). Stops early when every
    row has produced ``stop_token``; rows already stopped are padded with it."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise InputError(f"prompt must have shape [batch, seq] with seq >= 1, got {ids.shape}")
    if max_new_tokens < 0:
        raise InputError("max_new_tokens must be >= 0")
    SamplingOptions(temperature, top_k, top_p)  # one-line errors before the stepper runs
    rng = np.random.default_rng(seed)
    out = []
    done = np.zeros(ids.shape[0], dtype=bool)
    logits = stepper.prefill(ids)
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, rng, top_p)
        if stop_token is not None:
            tok = np.where(done, stop_token, tok)
            done |= tok == stop_token
        out.append(tok)
        if (stop_token is not None and done.all()) or step == max_new_tokens - 1:
            break
        logits = stepper.decode(tok)
    return np.stack(out, 1) if out else np.zeros((ids.shape[0], 0), dtype=np.int64)
