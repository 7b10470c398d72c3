"""Benchmarks: prefill latency, throughput, peak memory, decode and scaling, every backend in one run.

Backends (``BACKENDS``), all fp32 on the same weights, each timed through its runner's ``infer``:
  hf-torch     HF ``GPT2LMHeadModel`` in PyTorch, ``attn_implementation="sdpa"`` (``HFRunner``)
  bsbr-torch   the converted BSBR model in PyTorch, vectorised path (``TorchRunner``)
  hf-ort       HF ``GPT2LMHeadModel`` exported by ``torch.onnx.export(..., dynamo=True)`` (``hf_export``), in
               ONNX Runtime (``ORTRunner``): the prefill graph a user would export themselves
  bsbr-ort     the BSBR graph in ONNX Runtime (``ORTRunner``)
  tensorrt     the BSBR engine in TensorRT, only where TensorRT and a GPU are present (``TensorRTRunner``)
  floor-ort    the dense floor: embeddings, projections, MLP and LM head with no attention,
               in ONNX Runtime; every backend's latency is also given as a ratio to it

Protocol:
  * No benchmark on a red gate: a ``prepare`` child builds the models, exports the graphs and
    checks each backend against its PyTorch reference first (``prepare``); a backend that fails
    is reported "parity FAILED" and never timed.
  * Every (backend, batch, T) prefill case runs in its own child process; its peak memory is that
    process's RSS high-water mark during inference (``prefill``, ``memory``). ``--quick`` shares
    one child per backend.
  * Latency: median of >= 5 timed runs after warm-up (``spec.schedule``); ``--quick`` uses 2.
  * Decode: per-token latency of a random state holding ``context`` tokens, over one full chunk
    of steps; state memory from the state tensors' shapes (``decode``). Decode backends
    (``DECODE_BACKENDS``): HF GPT-2 with its KV cache in torch, GPT-2 with a KV cache in ONNX
    Runtime (kv-ort: Optimum's decoder-with-past graph, ``bsbr_export.kvcache``, run through
    IOBinding with the present outputs fed back as the next step's past), BSBR torch and the BSBR
    runtime engine.
  * Beyond the checkpoint's ``n_positions`` the standard baselines (hf-torch, hf-ort) use an
    extended position table: the comparison is about attention cost.

Modules: ``spec`` (what is measured), ``child`` (the child-process protocol; ``python -m
bsbr_export.bench JOB.json RESULT.json`` is a child), ``prepare``, ``prefill``, ``decode``,
``profile`` (the measurements), ``analysis`` and ``targets`` (fits, ratios, the acceptance
thresholds), ``report``, ``sections`` and ``plots`` (the outputs), ``driver`` (``run_bench``).
"""

from .analysis import analyse, loglog_slope
from .driver import run_bench
from .report import markdown_tables, write_outputs
from .spec import (BACKENDS, DECODE_BACKENDS, KINDS, LABELS, RANDOM_MODELS, SCHEMA, BenchSpec, quick_spec,
                   schedule)
from .targets import THRESHOLDS, targets

__all__ = ["BACKENDS", "DECODE_BACKENDS", "KINDS", "LABELS", "RANDOM_MODELS", "SCHEMA", "THRESHOLDS", "BenchSpec",
           "analyse", "loglog_slope", "markdown_tables", "quick_spec", "run_bench", "schedule", "targets",
           "write_outputs"]
