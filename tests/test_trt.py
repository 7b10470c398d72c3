"""TensorRT path: lazy import and clear errors (always run), plugin and engines (need TensorRT + GPU)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import bsbr_export.trt as bt

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    monkeypatch.setattr(bt, "_registered", False)
    monkeypatch.setattr(bt, "_logger_instance", None)


# ------------------------------------------------------- without TensorRT


def test_import_does_not_import_tensorrt_or_triton():
    code = (
        "import sys, bsbr_export.trt\n"
        "heavy = [m for m in ('tensorrt', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_require_tensorrt_raises_clear_error(no_tensorrt):
    with pytest.raises(bt.TensorRTNotInstalled) as info:
        bt.require_tensorrt()
    assert isinstance(info.value, ImportError)
    msg = str(info.value)
    assert msg.startswith("TensorRT not installed: ")
    assert "pip install tensorrt" in msg and "pypi.nvidia.com" in msg


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    with pytest.raises(bt.TensorRTNotInstalled, match="need >= 10.7"):
        bt.require_tensorrt()


def test_entry_points_need_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(bt.TensorRTNotInstalled):
        bt.register_plugin()
    with pytest.raises(bt.TensorRTNotInstalled):
        bt.network_from_onnx(tmp_path / "m.onnx")
    with pytest.raises(bt.TensorRTNotInstalled):
        bt.engine_from_onnx(tmp_path / "m.onnx", tmp_path / "m.engine", 1, 8, 16, 1)
    with pytest.raises(bt.TensorRTNotInstalled):
        with bt.TensorRTRunner(tmp_path / "m.engine"):
            pass


class _FakePluginAPI(types.ModuleType):
    """Stands in for ``tensorrt.plugin``: records what register_plugin declares."""

    TensorDesc = type("TensorDesc", (), {})
    Tensor = type("Tensor", (), {})

    def __init__(self):
        super().__init__("tensorrt.plugin")
        self.descs, self.impls = {}, {}

    def register(self, plugin_id):
        return lambda fn: self.descs.setdefault(plugin_id, fn)

    def impl(self, plugin_id):
        return lambda fn: self.impls.setdefault(plugin_id, fn)


@needs_triton
def test_plugins_match_the_exported_functions(monkeypatch):
    """Without TensorRT: each plugin register_plugin declares has the ID, the inputs (in order)
    and the attribute of the ONNX local function the exporter writes, so the parser's plugin
    override can map the nodes to it; and the implementation takes the same inputs."""
    import inspect

    from bsbr_export.ops import onnx_graph as ex

    fake = _FakePluginAPI()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0", plugin=fake))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", fake)
    monkeypatch.setattr(bt, "_registered", False)
    bt.register_plugin()
    monkeypatch.setattr(bt, "_registered", False)
    assert set(fake.descs) == set(fake.impls) == set(bt.PLUGIN_IDS)
    for plugin_id in bt.PLUGIN_IDS:  # ChunkAttention[Normalised][Lookback]
        fn = ex.chunk_attention_function(18, normalised="Normalised" in plugin_id,
                                         lookback=int(plugin_id.endswith("Lookback")))
        assert plugin_id == f"{fn.domain}::{fn.name}"
        desc = list(inspect.signature(fake.descs[plugin_id]).parameters)
        impl = list(inspect.signature(fake.impls[plugin_id]).parameters)
        assert desc == list(fn.input) + list(fn.attribute), (plugin_id, desc)
        assert impl == desc + ["outputs", "stream"], (plugin_id, impl)


def test_engines_are_written_by_the_shared_atomic_writer():
    from bsbr_export import util

    assert bt.atomic_write_bytes is util.atomic_write_bytes


# ------------------------------------- stand-ins for each TensorRT version branch


class _Flags:
    """``trt.OnnxParserFlag`` of one TensorRT version: ENABLE_PLUGIN_OVERRIDE from 10.15 on."""

    NATIVE_INSTANCENORM = 0

    def __init__(self, has_override: bool):
        if has_override:
            self.ENABLE_PLUGIN_OVERRIDE = 3


class _Layer:
    def __init__(self, type_):
        self.type = type_


class _Network:
    def __init__(self, plugin_layers: int):
        self.layers = [_Layer("PLUGIN_V3")] * plugin_layers + [_Layer("MATRIX_MULTIPLY")]
        self.num_layers = len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class _Parser:
    def __init__(self, network, logger):
        self.flags, self.num_errors = [], 0

    def set_flag(self, flag):
        self.flags.append(flag)

    def parse_from_file(self, path):
        return Path(path).is_file()


def fake_tensorrt(version: str, plugin_layers: int = 1):
    """A stand-in ``tensorrt`` of ``version``: what differs across 10.7-10.14, 10.15+ and 11.x
    here is only whether ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` exists (CHANGELOG 10.15 GA)."""
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    trt = types.SimpleNamespace(__version__=version, OnnxParserFlag=_Flags(major_minor >= (10, 15)))
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.Builder = lambda logger: types.SimpleNamespace(create_network=lambda flags: _Network(plugin_layers))
    trt.OnnxParser = _Parser
    return trt


@pytest.fixture
def stand_in(monkeypatch):
    """Install a stand-in ``tensorrt`` (and ``tensorrt.plugin``) for one test."""

    def install(version: str, plugin_layers: int = 1):
        trt = fake_tensorrt(version, plugin_layers)
        trt.plugin = _FakePluginAPI()
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
        monkeypatch.setattr(bt, "_registered", False)
        monkeypatch.setattr(bt, "_logger_instance", None)
        return trt

    return install


@needs_triton
@pytest.mark.parametrize("version,flag_set", [("10.7.0", False), ("10.14.1", False), ("10.15.1", True),
                                              ("11.0.0", True), ("11.1.0", True)])
def test_plugin_override_per_version(stand_in, tmp_path, version, flag_set):
    """10.7-10.14: no ENABLE_PLUGIN_OVERRIDE (AttributeError before this fix); the nodes'
    plugin_namespace does it. 10.15+/11.x: the flag is set. Every version: parsing succeeds
    when each bsbr:: node became a plugin layer."""
    stand_in(version)
    onnx_path = tmp_path / "ca.onnx"
    _chunk_attention_onnx(onnx_path, 1, 2, 10, 16, 4)
    builder, network, parser = bt.network_from_onnx(onnx_path, plugin_override=True)
    assert parser.flags == ([3] if flag_set else [])
    assert bt.plugin_layer_count(network) == bt.count_plugin_nodes(onnx_path) == 1


@needs_triton
@pytest.mark.parametrize("version", ["10.8.0", "10.15.1"])
def test_inlined_plugin_nodes_are_an_error(stand_in, tmp_path, version):
    stand_in(version, plugin_layers=0)
    onnx_path = tmp_path / "ca.onnx"
    _chunk_attention_onnx(onnx_path, 1, 2, 10, 16, 4)
    hint = "plugin_namespace" if version.startswith("10.8") else "names match"
    with pytest.raises(bt.OnnxParseError, match=f"1 bsbr:: node.*0 plugin layer.*{hint}"):
        bt.network_from_onnx(onnx_path, plugin_override=True)


def _creator_converts(annotation, field_data):
    """What tensorrt.plugin's creator does with one plugin field before calling the plugin's
    functions (``_TemplatePluginCreator.create_plugin``, TensorRT 10.6-11.0): numpy-array
    annotations ``NDArray[dtype]`` get ``data.astype(dtype)``, builtin ones ``annotation(data)``."""
    import typing

    if typing.get_origin(annotation) is np.ndarray:
        np_type = typing.get_args(typing.get_args(annotation)[1])[0]
        return field_data.astype(np_type)
    return annotation(field_data)


@needs_triton
def test_chunk_size_attribute_survives_the_creator_on_any_numpy(stand_in):
    """The ONNX parser passes chunk_size as a one-element kINT32 field; a deserialized JIT
    plugin passes back the array it serialized. Through the creator's conversion both reach
    the plugin functions as a one-element array that `attr_int` reads; an ``int``
    annotation would do ``int(array([L]))``, a TypeError from numpy 2.4 on."""
    import inspect

    trt = stand_in("10.8.0")
    bt.register_plugin()
    bt._registered = False
    desc_like = types.SimpleNamespace(ndim=4, like=lambda: "o")
    for plugin_id, n_inputs in ((bt.PLUGIN_ID, 5), (bt.PLUGIN_NORMALISED_ID, 7)):
        desc_fn, impl_fn = trt.plugin.descs[plugin_id], trt.plugin.impls[plugin_id]
        annotation = inspect.signature(desc_fn).parameters["chunk_size"].annotation
        assert annotation == inspect.signature(impl_fn).parameters["chunk_size"].annotation  # checked by trtp.impl
        for field in (np.array([24], dtype=np.int32), np.array([24], dtype=np.int64)):  # parser / serialized
            value = _creator_converts(annotation, field)
            assert bt.attr_int(value) == 24
        shapes = [types.SimpleNamespace(ndim=n) for n in ((4, 4, 4, 5, 1) if n_inputs == 5 else (4, 4, 4, 4, 5, 4, 1))]
        shapes[0] = desc_like
        assert desc_fn(*shapes, _creator_converts(annotation, np.array([24], dtype=np.int32))) == "o"
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":  # the defect the annotation avoids, reproduced
        with pytest.raises(TypeError):
            _creator_converts(int, np.array([24], dtype=np.int32))
    with pytest.raises(ValueError, match="one-element"):
        bt.attr_int(np.array([1, 2]))


# --------------------------------------------------- runner and timing cache, no GPU


class _FakeEngine:
    def __init__(self, outputs):
        self.outputs = outputs  # name -> shape
        self.num_io_tensors = len(outputs)

    def get_tensor_name(self, i):
        return list(self.outputs)[i]

    def get_tensor_mode(self, name):
        return "OUTPUT"

    def get_tensor_dtype(self, name):
        return "FLOAT"


class _FakeContext:
    def __init__(self, outputs):
        self.outputs, self.addresses = outputs, {}

    def get_tensor_shape(self, name):
        return self.outputs[name]

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True


def test_runner_binds_non_null_buffers_for_empty_outputs(monkeypatch):
    """At T < L the prefill's bank outputs have zero elements: each still gets a non-null
    address (TensorRT requires one for every output), and the returned array has the
    zero-element shape."""
    shapes = {"logits": (1, 7, 11), "bank_k": (1, 2, 0, 16), "bank_z": (0,), "scalar": ()}
    runner = bt.TensorRTRunner("unused.engine")
    runner._engine, runner._context = _FakeEngine(shapes), _FakeContext(shapes)
    monkeypatch.setattr(runner, "_io_names", lambda mode: list(shapes))
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(OUTPUT="OUTPUT"),
                                DataType=types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16", INT32="INT32",
                                                               INT64="INT64", INT8="INT8", BOOL="BOOL", UINT8="UINT8"))
    outputs = runner._bind_outputs(trt, device="cpu")
    assert set(runner._context.addresses) == set(shapes)
    assert all(addr != 0 for addr in runner._context.addresses.values()), runner._context.addresses
    assert {n: tuple(t.shape) for n, t in outputs.items()} == shapes
    assert torch.empty(0).data_ptr() == 0  # why: what the old code bound


class _FakeConfig:
    """``IBuilderConfig``'s timing-cache calls; ``accept(data)`` decides set_timing_cache's result."""

    def __init__(self, accept):
        self.accept, self.attached = accept, None

    def create_timing_cache(self, data):
        return None if data == b"garbage" else types.SimpleNamespace(data=data)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        ok = self.accept(cache.data)
        if ok:
            self.attached = cache
        return ok


@pytest.mark.parametrize("content", [b"from another gpu", b"garbage"])
def test_refused_timing_cache_starts_fresh(tmp_path, caplog, content):
    path = tmp_path / "timing.cache"
    path.write_bytes(content)
    config = _FakeConfig(accept=lambda data: data == b"")
    cache = bt._load_timing_cache(config, path)
    assert cache is config.attached and cache.data == b""
    assert "refused" in caplog.text


def test_accepted_timing_cache_is_used_and_refusal_of_empty_is_an_error(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"good")
    config = _FakeConfig(accept=lambda data: True)
    assert bt._load_timing_cache(config, path).data == b"good"
    assert bt._load_timing_cache(_FakeConfig(accept=lambda data: True), None).data == b""
    with pytest.raises(RuntimeError, match="set_timing_cache returned False"):
        bt._load_timing_cache(_FakeConfig(accept=lambda data: False), path)


# ------------------------------------------------ the plugin's kernel path on a GPU


class _TrtTensor:
    """What TensorRT's JIT impl receives (tensorrt.plugin.Tensor): a raw device buffer that
    exposes ``__cuda_array_interface__`` v3 (byte strides, its stream), nothing else."""

    def __init__(self, t, stream):
        self._t, self._stream = t, stream

    @property
    def __cuda_array_interface__(self):
        return {"shape": tuple(self._t.shape), "typestr": np.dtype(str(self._t.dtype).split(".")[1]).str,
                "data": (self._t.data_ptr(), False), "version": 3, "stream": self._stream,
                "strides": tuple(s * self._t.element_size() for s in self._t.stride())}


@needs_cuda
@needs_triton
@pytest.mark.parametrize("normalised", [False, True])
def test_plugin_kernel_path_on_a_side_stream(normalised):
    """bt.run_plugin_kernel (the body of both plugins' @trtp.impl) on buffers seen only through
    __cuda_array_interface__ and a non-default stream matches the reference."""
    from bsbr_export.ops.naive import chunk_attention_normalised_ref, chunk_attention_ref, compare_to_baseline

    B, H, T, d, L = 1, 4, 333, 64, 100
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    C = math.ceil(T / L)
    S = torch.randn(B, H, C, d, d, generator=gen) / d**0.5
    if normalised:
        qf, Z, g = torch.nn.functional.elu(q) + 1, torch.rand(B, H, C, d, generator=gen) * L, torch.rand(H) * 0.5
        args32, ref_fn = (q, k, v, qf, S, Z), chunk_attention_normalised_ref
    else:
        g, args32, ref_fn = torch.rand(H, generator=gen) + 0.5, (q, k, v, S), chunk_attention_ref
    low = [x.half().cuda() for x in args32] + [g.cuda()]
    side = torch.cuda.Stream()
    out = torch.empty_like(low[0])
    torch.cuda.synchronize()
    bt.run_plugin_kernel(normalised, [_TrtTensor(t, side.cuda_stream) for t in low], np.array([L], np.int32),
                         (_TrtTensor(out, side.cuda_stream),), side.cuda_stream)
    side.synchronize()
    ref32 = ref_fn(*args32, g, L)
    nums = compare_to_baseline(out.cpu(), ref32, ref_fn(*[x.half() for x in args32], g, L))
    assert nums["ok"], nums


# ---------------------------------------------------------- with TensorRT


def _chunk_attention_onnx(path: Path, B, H, T, d, L) -> None:
    """A one-node model: bsbr::ChunkAttention(q, k, v, S, g) -> o, fp16 (g fp32)."""
    import onnx
    from onnx import TensorProto, helper

    C = math.ceil(T / L)
    f16 = TensorProto.FLOAT16
    inputs = [
        helper.make_tensor_value_info("q", f16, [B, H, T, d]),
        helper.make_tensor_value_info("k", f16, [B, H, T, d]),
        helper.make_tensor_value_info("v", f16, [B, H, T, d]),
        helper.make_tensor_value_info("S", f16, [B, H, C, d, d]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, [H]),
    ]
    node = helper.make_node("ChunkAttention", ["q", "k", "v", "S", "g"], ["o"], domain=bt.PLUGIN_NAMESPACE,
                            chunk_size=L, plugin_namespace=bt.PLUGIN_NAMESPACE)
    graph = helper.make_graph([node], "chunk_attention", inputs, [helper.make_tensor_value_info("o", f16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(bt.PLUGIN_NAMESPACE, 1)])
    onnx.save(model, path)


def _ids_to_logits_onnx(path: Path) -> None:
    """input_ids int64 [B, T] -> logits float [B, T, 1] = float(input_ids): exercises profiles and I/O."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [-1])),
        helper.make_node("Unsqueeze", ["f", "axes"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "ids_to_logits",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@needs_triton
@needs_trt
def test_plugin_is_registered():
    trt = bt.require_tensorrt()
    bt.register_plugin()
    bt.register_plugin()  # idempotent
    assert trt.get_plugin_registry().get_creator(bt.PLUGIN_NAME, "1", bt.PLUGIN_NAMESPACE) is not None


@needs_cuda
@needs_trt
def test_parse_errors_are_readable(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(bt.OnnxParseError, match="could not parse .*bad.onnx"):
        bt.network_from_onnx(bad, plugin_override=False)


@needs_cuda
@needs_trt
def test_engine_from_onnx_profile_cache_and_runner(tmp_path):
    onnx_path, engine, cache = tmp_path / "m.onnx", tmp_path / "m.engine", tmp_path / "timing.cache"
    _ids_to_logits_onnx(onnx_path)
    bt.engine_from_onnx(onnx_path, engine, min_seq=1, opt_seq=16, max_seq=32, max_batch=2,
                        timing_cache_path=cache, plugin_override=False)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    ids = np.arange(2 * 20, dtype=np.int64).reshape(2, 20)
    with bt.TensorRTRunner(engine, register_plugins=False) as runner:
        out = runner.infer({"input_ids": ids})
        np.testing.assert_array_equal(out["logits"], ids[..., None].astype(np.float32))
        with pytest.raises(ValueError, match="outside the engine profile"):
            runner.infer({"input_ids": np.zeros((1, 33), dtype=np.int64)})
        with pytest.raises(ValueError, match="do not match"):
            runner.infer({"ids": ids})


@needs_cuda
@needs_triton
@needs_trt
def test_plugin_engine_matches_reference(tmp_path):
    from bsbr_export.ops.naive import chunk_attention_ref, compare_to_baseline

    B, H, T, d, L = 1, 2, 77, 16, 24
    onnx_path, engine = tmp_path / "ca.onnx", tmp_path / "ca.engine"
    _chunk_attention_onnx(onnx_path, B, H, T, d, L)
    builder, network, parser = bt.network_from_onnx(onnx_path, plugin_override=True)
    assert bt.plugin_layer_count(network) == 1
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None
    bt.atomic_write_bytes(engine, memoryview(serialized))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))  # (B, H, T, d)
    S = torch.randn(B, H, math.ceil(T / L), d, d, generator=gen) / d**0.5  # (B, H, C, d, d)
    g = torch.rand(H, generator=gen) + 0.5  # (H,)
    h16 = [x.half() for x in (q, k, v, S)]
    with bt.TensorRTRunner(engine) as runner:
        feeds = {n: x.numpy() for n, x in zip("qkvS", h16)} | {"g": g.numpy()}
        out = torch.from_numpy(runner.infer(feeds)["o"])
    nums = compare_to_baseline(out, chunk_attention_ref(q, k, v, S, g, L), chunk_attention_ref(*h16, g, L))
    print(nums)
    assert nums["ok"], nums
