"""TensorRT path: the ChunkAttention plugin, ONNX -> engine, and an engine runner.

Written against TensorRT 10.7+ and 11.x (Python API, strongly typed networks):

* ``register_plugin()`` registers ``bsbr::ChunkAttention`` and
  ``bsbr::ChunkAttentionNormalised`` (the default conversion's op), and their look-back
  forms ``bsbr::ChunkAttention[Normalised]Lookback`` (``local_window="lookback"``: the
  softmax also covers the previous chunk; same inputs and attribute), as quickly deployable
  Python plugins (``tensorrt.plugin``, TensorRT >= 10.7); their implementations launch
  the Triton kernels of ``bsbr_export.ops.kernel`` on TensorRT's stream.
* ``network_from_onnx()`` parses an exported model. Every attention layer there is a
  node ``bsbr::ChunkAttention(q, k, v, S, g)`` (or ``bsbr::ChunkAttentionNormalised(q, k,
  v, qf, S, Z, g)``) with ``chunk_size`` and
  ``plugin_namespace="bsbr"``: an ONNX local function with a standard-op body. When the
  plugin is registered the parser imports the node as the plugin (from TensorRT 10.7 the
  parser prefers a registered plugin over a local function for a node that carries
  ``plugin_namespace``; ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` only exists from 10.15
  and is set only there); otherwise it inlines the function body.
* ``engine_from_onnx()`` builds and writes a serialized engine; ``TensorRTRunner`` runs it.

``tensorrt`` is imported lazily: importing this module never needs it. None of this has
run on TensorRT (it cannot be installed on the machines of this project): it follows
NVIDIA/TensorRT's sources and changelog (10.7 to 11.1), and tests/test_trt.py checks
each version branch against a stand-in ``tensorrt`` that models the difference.
No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the
annotations of the plugin functions at runtime and needs real classes.
"""

import logging
from pathlib import Path
from typing import Tuple

import numpy as np
import numpy.typing as npt

from bsbr_export.util import atomic_write_bytes  # noqa: F401  (re-exported: engines and caches)

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = "bsbr"
PLUGIN_NAME = "ChunkAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_NORMALISED_ID = f"{PLUGIN_NAMESPACE}::ChunkAttentionNormalised"  # the default conversion's op
# The look-back local window's ops (ONNX functions ``...Lookback``): same inputs, kernel lookback=1.
PLUGIN_LOOKBACK_ID = f"{PLUGIN_ID}Lookback"
PLUGIN_NORMALISED_LOOKBACK_ID = f"{PLUGIN_NORMALISED_ID}Lookback"
PLUGIN_IDS = (PLUGIN_ID, PLUGIN_NORMALISED_ID, PLUGIN_LOOKBACK_ID, PLUGIN_NORMALISED_LOOKBACK_ID)
MIN_VERSION = (10, 7)
INSTALL_HINT = (
    "pip install tensorrt (TensorRT >= 10.7, on a Linux or Windows machine with an NVIDIA GPU "
    "that can reach NVIDIA's package index, https://pypi.nvidia.com)"
)

# The ``chunk_size`` attribute of the plugins, declared as a one-element int32 array, not
# ``int``: tensorrt.plugin's creator converts a builtin-typed field with ``int(field.data)``
# on a one-element numpy array (tensorrt/plugin/_lib.py, unchanged 10.6 to 11.0), which
# numpy >= 2.4 rejects (TypeError: only 0-dimensional arrays can be converted to Python
# scalars); an ``NDArray[int32]`` field is converted with ``field.data.astype(np.int32)``,
# which every numpy accepts. The ONNX parser passes an INT attribute as a 1-element kINT32
# field, and the JIT plugin serializes the array as INT32, so engines load the same way.
ChunkSizeAttr = npt.NDArray[np.int32]

_registered = False
_logger_instance = None


def attr_int(value) -> int:
    """The integer in a plugin attribute: a one-element array (what TensorRT passes) or an int."""
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"expected a one-element integer attribute, got {value!r}")
    return int(arr[0])


def tensorrt_version(trt) -> Tuple[int, int]:
    """(major, minor) of an imported ``tensorrt`` module."""
    return tuple(int(p) for p in trt.__version__.split(".")[:2])


class TensorRTNotInstalled(ImportError):
    """TensorRT (or a recent enough version of it) is not importable."""


class OnnxParseError(RuntimeError):
    """TensorRT's ONNX parser rejected a model; the message lists every parser error."""


def require_tensorrt():
    """Import and return ``tensorrt`` (>= 10.7), or raise TensorRTNotInstalled saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTNotInstalled(f"TensorRT not installed: {INSTALL_HINT}") from exc
    if tensorrt_version(trt) < MIN_VERSION:
        raise TensorRTNotInstalled(
            f"TensorRT not installed: found {trt.__version__}, need >= 10.7 for plugin override; {INSTALL_HINT}"
        )
    return trt


def _logger():
    """One process-wide TensorRT logger (TensorRT 10.x/11.x expect a single ILogger)."""
    global _logger_instance
    if _logger_instance is None:
        trt = require_tensorrt()
        _logger_instance = trt.Logger(trt.Logger.WARNING)
    return _logger_instance


# ------------------------------------------------------------------ the plugin


def register_plugin() -> None:
    """Register ``bsbr::ChunkAttention``, ``bsbr::ChunkAttentionNormalised`` and their
    ``...Lookback`` forms (``PLUGIN_IDS``) with ``tensorrt.plugin`` (TensorRT >= 10.7, 11.x);
    idempotent.

    Shape/dtype descriptor: one output shaped and typed like ``q``; attribute
    ``chunk_size``: a one-element int32 array (``ChunkSizeAttr``, see there why not
    ``int``). The JIT implementation (``@trtp.impl``, body `run_plugin_kernel`) wraps
    TensorRT's buffers as torch CUDA tensors (``__cuda_array_interface__``) and launches
    the Triton kernel on TensorRT's stream, so an engine that uses the plugin needs this
    function called (and Triton installed) in the process that deserializes it.
    No AOT implementation: the kernel's grid and strides depend on T, which would
    need symbolic launch parameters; the JIT path keeps one kernel for all backends.
    """
    global _registered
    if _registered:
        return
    require_tensorrt()
    import tensorrt.plugin as trtp

    from bsbr_export.ops.kernel import require_triton

    require_triton()

    for lookback in (0, 1):
        _register_ops(trtp, lookback)
    _registered = True


def _register_ops(trtp, lookback: int) -> None:
    """Register the plain and the normalised op of one local window (``lookback`` 0 or 1)."""
    plain_id, norm_id = PLUGIN_IDS[2 * lookback:2 * lookback + 2]

    @trtp.register(plain_id)
    def _chunk_attention_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, S: trtp.TensorDesc, g: trtp.TensorDesc,
        chunk_size: ChunkSizeAttr,
    ) -> trtp.TensorDesc:
        if q.ndim != 4 or S.ndim != 5 or g.ndim != 1:
            raise ValueError(f"{plain_id}: expected q (B,H,T,d), S (B,H,C,d,d), g (H,)")
        if attr_int(chunk_size) < 1:
            raise ValueError(f"{plain_id}: chunk_size must be >= 1")
        return q.like()  # o: (B, H, T, d), q's dtype

    @trtp.impl(plain_id)
    def _chunk_attention_impl(
        q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, S: trtp.Tensor, g: trtp.Tensor,
        chunk_size: ChunkSizeAttr, outputs: Tuple[trtp.Tensor], stream: int,
    ) -> None:
        run_plugin_kernel(False, (q, k, v, S, g), chunk_size, outputs, stream, lookback)

    @trtp.register(norm_id)
    def _chunk_attention_normalised_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, qf: trtp.TensorDesc, S: trtp.TensorDesc,
        Z: trtp.TensorDesc, g: trtp.TensorDesc, chunk_size: ChunkSizeAttr,
    ) -> trtp.TensorDesc:
        if q.ndim != 4 or qf.ndim != 4 or S.ndim != 5 or Z.ndim != 4 or g.ndim != 1:
            raise ValueError(f"{norm_id}: expected q, qf (B,H,T,d), S (B,H,C,d,d), Z (B,H,C,d), g (H,)")
        if attr_int(chunk_size) < 1:
            raise ValueError(f"{norm_id}: chunk_size must be >= 1")
        return q.like()

    @trtp.impl(norm_id)
    def _chunk_attention_normalised_impl(
        q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, qf: trtp.Tensor, S: trtp.Tensor, Z: trtp.Tensor,
        g: trtp.Tensor, chunk_size: ChunkSizeAttr, outputs: Tuple[trtp.Tensor], stream: int,
    ) -> None:
        run_plugin_kernel(True, (q, k, v, qf, S, Z, g), chunk_size, outputs, stream, lookback)


def run_plugin_kernel(normalised: bool, inputs, chunk_size, outputs, stream: int, lookback: int = 0) -> None:
    """The plugins' JIT implementation, without TensorRT: wrap each buffer (anything with
    ``__cuda_array_interface__``, as ``tensorrt.plugin.Tensor``) as a torch CUDA tensor and
    launch the kernel on ``stream`` (a raw ``cudaStream_t``), writing into ``outputs[0]``;
    ``lookback``: 1 for the ``...Lookback`` ops."""
    import torch

    from bsbr_export.ops.kernel import chunk_attention_normalised_triton, chunk_attention_triton

    kernel = chunk_attention_normalised_triton if normalised else chunk_attention_triton
    tensors = [torch.as_tensor(t, device="cuda") for t in inputs]
    out = torch.as_tensor(outputs[0], device="cuda")
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        kernel(*tensors, attr_int(chunk_size), out=out, lookback=lookback)


def plugin_layer_count(network) -> int:
    """Number of plugin (IPluginV3) layers in a parsed network: 0 means the function bodies were inlined."""
    trt = require_tensorrt()
    return sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))


# ------------------------------------------------------------- ONNX -> engine


def _parser_errors(parser, onnx_path) -> str:
    """All parser errors as readable lines (node index, name, op, code, description)."""
    lines = [f"TensorRT could not parse {onnx_path} ({parser.num_errors} error(s)):"]
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = []
        for attr, label in (("node", "node"), ("node_name", "name"), ("node_operator", "op")):
            fn = getattr(err, attr, None)  # node_name/node_operator exist from TensorRT 10.x
            value = fn() if callable(fn) else None
            if value not in (None, "", -1):
                where.append(f"{label} {value}")
        lines.append(f"  [{', '.join(where) or 'model'}] {err.code()}: {err.desc()}")
    return "\n".join(lines)


def network_from_onnx(onnx_path, plugin_override: bool = True):
    """Parse an ONNX file into a strongly typed TensorRT network (TensorRT 10.7+ / 11.x).

    With ``plugin_override`` the ChunkAttention plugins are registered, so every
    ``bsbr::ChunkAttention*`` node (it carries ``plugin_namespace``) becomes the plugin;
    ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` is set where it exists (TensorRT 10.15+, see
    `set_plugin_override_flag`), and a node that was inlined all the same is an
    OnnxParseError (`check_plugin_layers`). Without it the function bodies are inlined, provided the
    plugin was not registered earlier in this process (the registry is process-wide and
    the nodes carry ``plugin_namespace``). Returns ``(builder, network, parser)``; keep the
    parser alive until the engine is built (it owns the weights). Raises OnnxParseError.
    """
    trt = require_tensorrt()
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if plugin_override:
        register_plugin()
    elif _registered:
        log.warning("plugin_override=False, but %s is registered: TensorRT will still use it", PLUGIN_ID)
    builder = trt.Builder(_logger())
    # STRONGLY_TYPED: opt-in on 10.x, accepted and always on in 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _logger())
    if plugin_override:
        set_plugin_override_flag(trt, parser)
    if not parser.parse_from_file(str(onnx_path)):
        raise OnnxParseError(_parser_errors(parser, onnx_path))
    if plugin_override:
        check_plugin_layers(trt, network, onnx_path)
    return builder, network, parser


def set_plugin_override_flag(trt, parser) -> bool:
    """Set ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` where it exists; return whether it was set.

    TensorRT 10.7-10.14: the flag does not exist (the Python enum gains it in 10.15, CHANGELOG
    "10.15 GA"); the parser already imports a node as a registered plugin instead of its local
    function when the node carries ``plugin_namespace`` (CHANGELOG "10.7.0 GA": plugins are
    preferred over local functions), which every exported ``bsbr::`` node does.
    TensorRT 10.15+ and 11.x: the flag also lets a plugin win for a node without
    ``plugin_namespace`` (an edited model); set it.
    """
    flag = getattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE", None)
    if flag is None:
        log.info("TensorRT %s has no ENABLE_PLUGIN_OVERRIDE (added in 10.15): the plugin replaces "
                 "the bsbr:: nodes through their plugin_namespace attribute", trt.__version__)
        return False
    parser.set_flag(flag)
    return True


def count_plugin_nodes(onnx_path) -> int:
    """Number of ``bsbr::ChunkAttention*`` nodes in an ONNX file's graph, If branches included
    (weights not loaded)."""
    import onnx

    names = {plugin_id.split("::")[1] for plugin_id in PLUGIN_IDS}

    def count(nodes) -> int:
        return sum((n.domain == PLUGIN_NAMESPACE and n.op_type in names) +
                   sum(count(a.g.node) for a in n.attribute if a.type == a.GRAPH) for n in nodes)

    return count(onnx.load(str(onnx_path), load_external_data=False).graph.node)


def check_plugin_layers(trt, network, onnx_path) -> None:
    """Raise OnnxParseError when a ``bsbr::`` node was inlined instead of becoming the plugin."""
    want, got = count_plugin_nodes(onnx_path), plugin_layer_count(network)
    if got < want:
        hint = ("add plugin_namespace='bsbr' to every bsbr:: node (re-export the model)"
                if tensorrt_version(trt) < (10, 15) else "check that the nodes' names match the plugins")
        raise OnnxParseError(f"{onnx_path}: {want} bsbr:: node(s) but {got} plugin layer(s) after parsing with "
                             f"TensorRT {trt.__version__}: the rest were inlined; {hint}")


def _set_input_profile(builder, network, config, min_seq, opt_seq, max_seq, max_batch, opt_batch) -> None:
    """One optimization profile on ``input_ids`` [batch, seq] (TensorRT 10.x/11.x)."""
    if not 1 <= min_seq <= opt_seq <= max_seq:
        raise ValueError(f"need 1 <= min_seq <= opt_seq <= max_seq, got {min_seq}, {opt_seq}, {max_seq}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != ["input_ids"]:
        raise ValueError(f"expected one network input 'input_ids' [batch, seq], found {names}")
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, min_seq), (opt_batch, opt_seq), (max_batch, max_seq))
    config.add_optimization_profile(profile)


def _load_timing_cache(config, timing_cache_path):
    """Attach a timing cache to ``config``, seeded from ``timing_cache_path`` if it exists
    (TensorRT 10.x/11.x); returns the cache (it must outlive the build).

    ``IBuilderConfig.set_timing_cache`` returns False when it rejects the cache (made on
    another device or TensorRT version, ``ignore_mismatch=False``), and
    ``create_timing_cache`` may return None for unreadable bytes: then the stale file is
    reported and the build starts from an empty cache (the file is rewritten after it).
    An empty cache that is still refused is an error.
    """
    data = b""
    if timing_cache_path is not None and Path(timing_cache_path).is_file():
        data = Path(timing_cache_path).read_bytes()
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if data:
        log.warning("timing cache %s was refused by TensorRT (another GPU or TensorRT version?); "
                    "building with an empty cache, which replaces it", timing_cache_path)
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    raise RuntimeError("TensorRT refused an empty timing cache (IBuilderConfig.set_timing_cache returned False)")


def engine_from_onnx(
    onnx_path, engine_path, min_seq: int, opt_seq: int, max_seq: int, max_batch: int,
    timing_cache_path=None, plugin_override: bool = True, opt_batch: int = 1,
) -> Path:
    """Build a TensorRT engine (10.7+ / 11.x, strongly typed) from ONNX and write it atomically.

    One optimization profile: ``input_ids`` from [1, min_seq] over [opt_batch, opt_seq]
    to [max_batch, max_seq]. The timing cache at ``timing_cache_path`` (if given) is
    loaded before and saved after the build. Returns ``engine_path``.
    """
    # `parser` stays referenced until the build is done: it owns the weights.
    builder, network, parser = network_from_onnx(onnx_path, plugin_override=plugin_override)
    log.info("parsed %s: %d layers, %d ChunkAttention plugin layers",
             onnx_path, network.num_layers, plugin_layer_count(network))
    config = builder.create_builder_config()
    _set_input_profile(builder, network, config, min_seq, opt_seq, max_seq, max_batch, opt_batch)
    cache = _load_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    if timing_cache_path is not None:
        used = config.get_timing_cache() or cache
        atomic_write_bytes(timing_cache_path, memoryview(used.serialize()))
    atomic_write_bytes(engine_path, memoryview(serialized))
    return Path(engine_path)


# --------------------------------------------------------------------- runner


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8,
    }
    if dtype not in table:
        raise TypeError(f"unsupported TensorRT I/O dtype {dtype}")
    return table[dtype]


def device_buffer(shape, dtype, device="cuda"):
    """A tensor of ``shape`` and its address for ``set_tensor_address``, never 0.

    TensorRT requires a non-null address for every input and output before
    ``execute_async_v3`` (NvInferRuntime.h, ``setTensorAddress``), even one with zero
    elements (the prefill's bank outputs at T < L); ``torch.empty(0).data_ptr()`` is 0.
    So the storage holds at least one element and the tensor is a view of its start.
    """
    import torch

    shape = tuple(int(n) for n in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    storage = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return storage[:numel].view(shape), storage.data_ptr()


class TensorRTRunner:
    """Runs a serialized engine (TensorRT 10.x/11.x, ``execute_async_v3``) on torch CUDA tensors.

    Context manager with ``infer(feeds) -> outputs``: feeds map input names to numpy
    arrays (``input_ids``: int64 [B, T]); outputs map output names to numpy arrays
    (``logits``: [B, T, V], floating outputs returned as float32).
    """

    def __init__(self, engine_path, register_plugins: bool = True):
        self.engine_path = Path(engine_path)
        self.register_plugins = register_plugins
        self._engine = self._context = self._stream = None

    def __enter__(self):
        trt = require_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTRunner needs a CUDA GPU visible to torch")
        if self.register_plugins:
            register_plugin()
        runtime = trt.Runtime(_logger())
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.engine_path}; see the TensorRT log above")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._trt = trt
        return self

    def __exit__(self, *exc):
        self._context = self._engine = self._stream = None
        return False

    def _set_address(self, name, address) -> None:
        if not self._context.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT refused the address of tensor {name}")

    def _bind_outputs(self, trt, device="cuda") -> dict:
        """One buffer per output at the shapes the context reports, each bound at a non-null address."""
        outputs = {}
        for name in self._io_names(trt.TensorIOMode.OUTPUT):
            shape = tuple(self._context.get_tensor_shape(name))
            if any(n < 0 for n in shape):
                raise RuntimeError(f"output {name} has a data-dependent shape {shape}: not supported")
            t, address = device_buffer(shape, _torch_dtype(trt, self._engine.get_tensor_dtype(name)), device)
            self._set_address(name, address)
            outputs[name] = t
        return outputs

    def _io_names(self, mode):
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        return [n for n in names if self._engine.get_tensor_mode(n) == mode]

    def infer(self, feeds: dict) -> dict:
        """Run one batch: set shapes and addresses, ``execute_async_v3`` on a private stream, copy back."""
        import torch

        if self._context is None:
            raise RuntimeError("use TensorRTRunner as a context manager: with TensorRTRunner(path) as r: ...")
        trt = self._trt
        inputs = self._io_names(trt.TensorIOMode.INPUT)
        if sorted(feeds) != sorted(inputs):
            raise ValueError(f"feeds {sorted(feeds)} do not match the engine inputs {sorted(inputs)}")
        keep = []
        with torch.cuda.stream(self._stream):
            for name in inputs:
                arr = np.ascontiguousarray(feeds[name])
                t, address = device_buffer(arr.shape, _torch_dtype(trt, self._engine.get_tensor_dtype(name)))
                t.copy_(torch.from_numpy(arr))
                if not self._context.set_input_shape(name, tuple(t.shape)):
                    lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(f"input {name} shape {tuple(t.shape)} outside the engine profile {lo}..{hi}")
                self._set_address(name, address)
                keep.append(t)
            outputs = self._bind_outputs(trt)
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        self._stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outputs.items()}
