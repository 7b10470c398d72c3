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

    from bsbr_export import export as ex

    fake = _FakePluginAPI()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0", plugin=fake))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", fake)
    monkeypatch.setattr(bt, "_registered", False)
    bt.register_plugin()
    monkeypatch.setattr(bt, "_registered", False)
    assert set(fake.descs) == set(fake.impls) == {bt.PLUGIN_ID, bt.PLUGIN_NORMALISED_ID}
    for normalised, plugin_id in ((False, bt.PLUGIN_ID), (True, bt.PLUGIN_NORMALISED_ID)):
        fn = ex.chunk_attention_function(18, normalised=normalised)
        assert plugin_id == f"{fn.domain}::{fn.name}"
        desc = list(inspect.signature(fake.descs[plugin_id]).parameters)
        impl = list(inspect.signature(fake.impls[plugin_id]).parameters)
        assert desc == list(fn.input) + list(fn.attribute), (plugin_id, desc)
        assert impl == desc + ["outputs", "stream"], (plugin_id, impl)


def test_atomic_write_replaces_or_leaves_old_file(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    bt.atomic_write_bytes(path, b"first")
    bt.atomic_write_bytes(path, memoryview(b"second"))
    assert path.read_bytes() == b"second"
    with pytest.raises(TypeError):
        bt.atomic_write_bytes(path, object())  # the write fails half-way
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]


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
