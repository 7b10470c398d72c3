"""Runners: one interface over PyTorch, ONNX Runtime (and TensorRT in ``trt``).

A runner is a context manager with ``infer(feeds) -> outputs``: feeds map input
names to numpy arrays (``input_ids`` int64 [batch, seq]); outputs map names to
numpy arrays (``logits`` float32 [batch, seq, vocab]). Names read
``<target>_from_<source>``: ``session_from_onnx``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError, ModelLoadError


def check_feeds(feeds: dict, max_seq_len: int | None, vocab_size: int | None = None) -> np.ndarray:
    """Validate ``input_ids`` before any backend sees it; returns it as int64."""
    if set(feeds) != {"input_ids"}:
        raise InputError(f"expected exactly the feed 'input_ids', got {sorted(feeds)}")
    ids = feeds["input_ids"]
    if not isinstance(ids, np.ndarray):
        raise InputError(f"input_ids must be a numpy array, got {type(ids).__name__}")
    if ids.dtype not in (np.int64, np.int32):
        raise InputError(f"input_ids must be int64, got {ids.dtype}")
    if ids.ndim != 2:
        raise InputError(f"input_ids must have shape [batch, seq], got rank {ids.ndim} {ids.shape}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InputError(f"input_ids must be non-empty, got shape {ids.shape}")
    if max_seq_len is not None and ids.shape[1] > max_seq_len:
        raise InputError(f"sequence of {ids.shape[1]} tokens exceeds the export's maximum of {max_seq_len}")
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InputError(f"input_ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64, copy=False)


class TorchRunner:
    """The PyTorch BSBR model as a runner (fp32 on CPU unless told otherwise)."""

    name = "torch"

    def __init__(self, model, impl: str = "vectorised", max_seq_len: int | None = None):
        self.model, self.impl, self.max_seq_len = model, impl, max_seq_len

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def infer(self, feeds: dict) -> dict:
        import torch

        ids = check_feeds(feeds, self.max_seq_len, self.model.cfg.vocab_size)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(ids), impl=self.impl)
        return {"logits": logits.float().numpy()}


def available_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []
    return [p for p in order if p in have] + ["CPUExecutionProvider"]


def session_from_onnx(path, threads: int | None = None, providers: list[str] | None = None,
                      optimization: str = "all"):
    """An ONNX Runtime session: GPU execution providers when present, CPU otherwise."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such ONNX file")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), so, providers=providers or available_providers())
    except Exception as e:  # ORT raises its own exception types for corrupt files / missing data
        raise ModelLoadError(f"{p}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None


def onnx_metadata(session) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    return json.loads(meta["bsbr_export"]) if "bsbr_export" in meta else {}


class ORTRunner:
    """An exported prefill graph in ONNX Runtime; returns ``logits`` only unless asked."""

    name = "onnxruntime"

    def __init__(self, onnx_path, threads: int | None = None, providers=None, outputs=("logits",),
                 optimization: str = "all"):
        self.path, self.threads, self.providers = Path(onnx_path), threads, providers
        self.outputs, self.optimization = list(outputs), optimization
        self.session = None

    def __enter__(self):
        self.session = session_from_onnx(self.path, self.threads, self.providers, self.optimization)
        meta = onnx_metadata(self.session)
        self.max_seq_len = meta.get("max_seq_len")
        self.vocab_size = meta.get("config", {}).get("vocab_size")
        return self

    def __exit__(self, *exc):
        self.session = None
        return False

    def infer(self, feeds: dict) -> dict:
        if self.session is None:
            raise RuntimeError("ORTRunner used outside its 'with' block")
        ids = check_feeds(feeds, self.max_seq_len, self.vocab_size)
        vals = self.session.run(self.outputs, {"input_ids": ids})
        return dict(zip(self.outputs, vals))


class ORTStepper:
    """Generation through ONNX Runtime: the prefill graph, then the decode graph per token
    and the chunk-closing graph once per chunk.

    ``state`` holds the five state arrays of ``export.STATE_NAMES``; after the prompt the
    banks of completed chunks are zero-padded to a fixed capacity ceil(max_len / L) so
    that every step has the same shapes.
    """

    def __init__(self, onnx_dir, max_len: int | None = None, threads: int | None = None):
        from .export import STATE_NAMES

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


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
