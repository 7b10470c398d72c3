"""Runners: one interface over PyTorch (BSBR, BSBR in fp16, HF GPT-2), ONNX Runtime (and TensorRT in
``bsbr_export.trt``).

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

from ..errors import InputError, ModelLoadError


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


class _InProcess:
    """A runner over a model already in this process: nothing to open or close."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TorchRunner(_InProcess):
    """The PyTorch BSBR model as a runner (fp32 on CPU unless told otherwise)."""

    name = "torch"

    def __init__(self, model, impl: str = "vectorised", max_seq_len: int | None = None):
        self.model, self.impl, self.max_seq_len = model, impl, max_seq_len

    def infer(self, feeds: dict) -> dict:
        import torch

        ids = check_feeds(feeds, self.max_seq_len, self.model.cfg.vocab_size)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids), impl=self.impl)
        return {"logits": logits.float().numpy()}


class TorchHalfRunner(_InProcess):
    """Torch in fp16: the measured low-precision baseline for fp16 tolerances."""

    name = "torch fp16"

    def __init__(self, model):
        import copy

        self.model = copy.deepcopy(model).half()

    def infer(self, feeds):
        import torch

        with torch.no_grad():
            return {"logits": self.model(torch.from_numpy(feeds["input_ids"])).float().numpy()}


class HFRunner(_InProcess):
    """HF ``GPT2LMHeadModel`` in PyTorch (SDPA attention unless told otherwise), no KV cache.

    ``model`` is a loaded model or an HF checkpoint directory (loaded on construction).
    """

    name = "hf-torch"

    def __init__(self, model, attn_implementation: str = "sdpa", max_seq_len: int | None = None):
        if isinstance(model, (str, os.PathLike)):
            from transformers import GPT2LMHeadModel

            model = GPT2LMHeadModel.from_pretrained(model, attn_implementation=attn_implementation).eval()
        self.model = model
        self.max_seq_len = max_seq_len or model.config.n_positions

    def infer(self, feeds: dict) -> dict:
        import torch

        ids = check_feeds(feeds, self.max_seq_len, self.model.config.vocab_size)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids), use_cache=False).logits
        return {"logits": logits.float().numpy()}


def available_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []
    return [p for p in order if p in have] + ["CPUExecutionProvider"]


def check_providers(providers) -> list:
    """The execution providers to use: ``providers`` (names or (name, options) pairs, as
    onnxruntime takes them, checked against the installed onnxruntime's) or, when None, the GPU
    ones present and the CPU."""
    import onnxruntime as ort

    if providers is None:
        return available_providers()
    items = [providers] if isinstance(providers, (str, tuple)) else list(providers)
    have = ort.get_available_providers()
    if not items:
        raise InputError(f"providers is empty (available: {', '.join(have)})")
    for p in items:
        if isinstance(p, tuple) and (len(p) != 2 or not isinstance(p[1], dict)):
            raise InputError(f"a provider with options is a (name, dict) pair, got {p!r}")
        name = provider_name(p)
        if not isinstance(name, str) or name not in have:
            raise InputError(f"unknown execution provider {name!r}: not available in this onnxruntime "
                             f"(available: {', '.join(have)})")
    return items


def provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def session_from_onnx(path, threads: int | None = None, providers: list[str] | None = None,
                      optimization: str = "all", profile_prefix: str | None = None, config: dict | None = None,
                      initializers: dict | None = None, arena: bool = True, model=None):
    """An ONNX Runtime session: GPU execution providers when present, CPU otherwise.

    ``profile_prefix``: profile every run into ``<prefix>_<date>.json`` (``end_profiling`` names it).
    ``config``: session configuration entries (``SessionOptions.add_session_config_entry``).
    ``initializers``: {name: OrtValue} that the session uses in place of its own copy of those
    weights (several sessions then share one copy).
    ``arena=False``: no CPU memory arena and no memory pattern, so a single large run hands its
    memory back (the parity check's longest case at GPT-2 size holds ~3 GiB less).
    ``model``: a ModelProto to load in place of the file (``path`` names it in errors).
    """
    import onnxruntime as ort

    p = Path(path)
    if model is None and not p.is_file():
        raise ModelLoadError(f"{p}: no such ONNX file")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if profile_prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    so.log_severity_level = 3
    if not arena:
        so.enable_cpu_mem_arena = so.enable_mem_pattern = False
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    if model is not None:  # its external weights lie beside ``path``
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(p.parent))
    try:
        source = str(p) if model is None else model.SerializeToString()
        return ort.InferenceSession(source, so, providers=providers or available_providers())
    except Exception as e:  # ORT raises its own exception types for corrupt files / missing data
        raise ModelLoadError(f"{p}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None


def onnx_metadata(session) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    return json.loads(meta["bsbr_export"]) if "bsbr_export" in meta else {}


class ORTRunner:
    """An exported prefill graph in ONNX Runtime; returns ``logits`` only unless asked."""

    name = "onnxruntime"

    def __init__(self, onnx_path, threads: int | None = None, providers=None, outputs=("logits",),
                 optimization: str = "all", arena: bool = True, config: dict | None = None):
        self.path, self.threads, self.providers = Path(onnx_path), threads, providers
        self.outputs, self.optimization, self.arena = list(outputs), optimization, arena
        self.config = config
        self.session = None

    def __enter__(self):
        self.session = session_from_onnx(self.path, self.threads, self.providers, self.optimization,
                                         arena=self.arena, config=self.config)
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
