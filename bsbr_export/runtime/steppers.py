"""Steppers: generation through a model's prefill and per-token decode.

A stepper has ``prefill(input_ids (B, T)) -> last-position logits (B, V)`` and
``decode(tokens (B,)) -> logits (B, V)``, so ``generate`` drives torch and ONNX Runtime alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..ops import state
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

    ``state`` holds the carried state arrays of ``ops.state`` (batch first); after the prompt
    the banks of completed chunks are zero-padded to a fixed capacity ceil(max_len / L) so
    that every step has the same shapes.
    """

    def __init__(self, onnx_dir, max_len: int | None = None, threads: int | None = None):
        d = Path(onnx_dir)
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
        logits, *carried = self.prefill_sess.run(["logits", *state.CARRIED], {"input_ids": input_ids.astype(np.int64)})
        self.state = dict(zip(state.CARRIED, carried))
        for n in (state.BANK_H, state.BANK_F):
            a = self.state[n]
            pad = [(0, 0)] * a.ndim
            pad[state.DIMS[n].index("capacity")] = (0, self.capacity - a.shape[3])
            self.state[n] = np.pad(a, pad)
        self.pos = input_ids.shape[1]
        return logits[:, -1]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self.pos >= self.capacity * self.chunk:
            raise InputError(f"decode state is full ({self.pos} tokens); use a larger max_len")
        st, position = self.state, np.full(len(tokens), self.pos, dtype=np.int64)
        feeds = {"input_ids": tokens.astype(np.int64)[:, None], "position": position}
        outs = self.decode_sess.run(["logits", *map(state.out_name, state.DECODE_OUT)],
                                    feeds | {n: st[n] for n in state.DECODE_IN})
        logits, written = outs[0], dict(zip(state.DECODE_OUT, outs[1:]))
        st[state.K], st[state.V] = written[state.K], written[state.V]
        if self.pos % self.chunk == self.chunk - 1:  # this token closed its chunk
            feeds = {"position": position} | {n: (written[n] if n in written else st[n]) for n in state.CLOSE_IN}
            closed = self.close_sess.run(list(map(state.out_name, state.CLOSE_OUT)), feeds)
            st.update(zip(state.CLOSE_OUT, closed))
        self.pos += 1
        return logits
