"""Steppers: generation through a model's prefill and per-token decode.

A stepper has ``prefill(input_ids (B, T)) -> last-position logits (B, V)`` and
``decode(tokens (B,)) -> logits (B, V)``, so ``generate`` drives torch and ONNX Runtime alike.
"""

from __future__ import annotations

from pathlib import Path

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


class TorchEngine:
    """The PyTorch model behind the engine interface (``generate --backend torch``):
    one ``TorchStepper`` per row, so prompts of any lengths batch as in ONNX Runtime."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len
        self.config, self.vocab_size = model.cfg.to_dict(), model.cfg.vocab_size

    def new_state(self, batch: int) -> list:
        return [None] * batch

    def extend(self, st: list, rows, ids_list) -> np.ndarray:
        out = []
        for r, ids in zip(rows, ids_list):
            st[r] = TorchStepper(self.model, self.max_len)
            out.append(st[r].prefill(np.asarray(ids, dtype=np.int64)[None])[0])
        return np.stack(out)

    prefill = extend  # each row's prompt in one torch prefill (``Engine.prefill`` bounds ORT's calls)

    def decode(self, st: list, tokens, active=None) -> np.ndarray:
        rows = range(len(st)) if active is None else np.flatnonzero(active)
        out = np.zeros((len(st), self.vocab_size), dtype=np.float32)
        for r in rows:
            out[r] = st[r].decode(np.asarray(tokens[r:r + 1], dtype=np.int64))[0]
        return out


def torch_runtime(model_dir):
    """A ``Runtime`` over the torch model of a main-command output directory (its ``bsbr/``)."""
    model_dir = Path(model_dir)
    from ..convert import load_bsbr
    from .api import Runtime
    from .engine import read_metadata
    from .text import Tokenizer

    graph = model_dir / "model.onnx"
    model = load_bsbr(model_dir / "bsbr")
    max_len = read_metadata(graph)["max_seq_len"] if graph.is_file() else model.cfg.n_positions
    return Runtime(TorchEngine(model, max_len), Tokenizer.from_dir(model_dir))
