"""Steppers: generation through a model's prefill and per-token decode.

A stepper has ``prefill(input_ids (B, T)) -> last-position logits (B, V)`` and
``decode(tokens (B,)) -> logits (B, V)``, so ``generate`` drives torch and ONNX Runtime alike.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


class TorchStepper:
    """Streams a ``BSBRGPT2`` through its preallocated decode state."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len, self.state = model, max_len, None

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        logits, self.state = self.model.prefill(torch.as_tensor(input_ids, dtype=torch.int64), self.max_len)
        return logits[:, -1].float().numpy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        return self.model.decode_step(torch.as_tensor(tokens, dtype=torch.int64), self.state).float().numpy()


class ORTStepper:
    """The ONNX Runtime engine (``runtime.engine``) as a stepper: rows of equal-length prompts,
    then one token per row."""

    def __init__(self, onnx_dir, max_len: int | None = None, threads: int | None = None):
        from .engine import Engine

        self.engine = Engine(onnx_dir, threads=threads, max_len=max_len)
        self.max_len, self.chunk = self.engine.max_len, self.engine.chunk
        self.state = None

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must have shape [batch, seq], got {ids.shape}")
        self.state = self.engine.new_state(ids.shape[0])
        return self.engine.extend(self.state, list(range(ids.shape[0])), list(ids))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.engine.decode(self.state, np.asarray(tokens))
