"""Steppers: generation through a model's prefill and per-token decode.

A stepper has ``prefill(input_ids (B, T)) -> last-position logits (B, V)`` and
``decode(tokens (B,)) -> logits (B, V)``, so ``generate`` drives torch and ONNX Runtime alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .runners import onnx_metadata, session_from_onnx


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
    """Generation through ONNX Runtime: the prefill graph, then the decode graph per token
    and the chunk-closing graph once per chunk.

    ``state`` holds the five state arrays of ``export.STATE_NAMES``; after the prompt the
    banks of completed chunks are zero-padded to a fixed capacity ceil(max_len / L) so
    that every step has the same shapes.
    """

    def __init__(self, onnx_dir, max_len: int | None = None, threads: int | None = None):
        from ..export import STATE_NAMES

        d = Path(onnx_dir)
        self.names = STATE_NAMES
        self.prefill_sess = session_from_onnx(d / "model.onnx", threads)
        self.decode_sess = session_from_onnx(d / "decode.onnx", threads)
        self.close_sess = session_from_onnx(d / "close.onnx", threads)
        meta = onnx_metadata(self.prefill_sess)
        self.chunk = meta["config"]["chunk_size"]
        self.max_len = max_len or meta["max_seq_len"]
        self.capacity = -(-self.max_len // self.chunk)
        self.state, self.pos = None, 0

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        if input_ids.shape[1] > self.max_len:
            raise InputError(f"prompt of {input_ids.shape[1]} tokens exceeds max_len {self.max_len}")
        out = self.prefill_sess.run(None, {"input_ids": input_ids.astype(np.int64)})
        logits, states = out[0], dict(zip(self.names, out[1:]))
        for n in ("state_bank_h", "state_bank_F"):
            a = states[n]
            pad = [(0, 0)] * a.ndim
            pad[3] = (0, self.capacity - a.shape[3])
            states[n] = np.pad(a, pad)
        self.state, self.pos = states, input_ids.shape[1]
        return logits[:, -1]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self.pos >= self.capacity * self.chunk:
            raise InputError(f"decode state is full ({self.pos} tokens); use a larger max_len")
        st, position = self.state, np.array(self.pos, dtype=np.int64)
        logits, st["state_k"], st["state_v"], xa = self.decode_sess.run(None, {
            "input_ids": tokens.astype(np.int64)[:, None], "position": position,
            "state_k": st["state_k"], "state_v": st["state_v"], "state_S": st["state_S"]})
        if self.pos % self.chunk == self.chunk - 1:  # this token closed its chunk
            st["state_S"], st["state_bank_h"], st["state_bank_F"] = self.close_sess.run(None, {
                "position": position, "state_k": st["state_k"], "state_v": st["state_v"], "state_xa": xa,
                "state_bank_h": st["state_bank_h"], "state_bank_F": st["state_bank_F"]})
        self.pos += 1
        return logits
