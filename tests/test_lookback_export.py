"""The look-back local window (``local_window="lookback"``) through every backend kind: the ONNX
graphs (prefill, extend, decode, close) in ONNX Runtime, the runtime engine, the Triton kernel
(interpreter, in a subprocess) and the TensorRT plugin registration. Each equals the torch model.

A tiny random GPT-2, chunk L = 6 (not a power of two), sequences up to 40 tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bsbr_export.convert import convert
from bsbr_export.errors import ModelLoadError
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.ops import onnx_graph as ox
from bsbr_export.ops import state as S
from bsbr_export.ops.chunk import chunk_attention, num_chunks
from bsbr_export.runtime import ORTRunner
from bsbr_export.runtime.engine import Engine, read_metadata
from conftest import assert_close, assert_ort_decode_matches, rand_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")

L, MAX = 6, 40
LENGTHS = [1, L - 1, L, L + 1, 2 * L - 1, 2 * L, 2 * L + 1, 4 * L + 5, MAX]  # T < L, L < T < 2L, T > 2L
VARIANTS = {
    "plain": dict(retrieval="plain", retrieval_scale=1.0),
    "normalised": dict(retrieval="normalised", feature_map="elu1", retrieval_scale=1.0, compression=2),
}


@pytest.fixture(scope="module")
def exports(tiny_hf_dir, tmp_path_factory):
    """{variant: (torch model, export directory)}: retrieval at full scale, so it matters."""
    out = {}
    for name, opts in VARIANTS.items():
        model = convert(tiny_hf_dir, chunk_size=L, local_window="lookback", **opts)
        d = tmp_path_factory.mktemp(f"lookback_{name}")
        export_onnx(model, d, ExportSpec(max_seq_len=MAX))
        out[name] = (model, d)
    return out


def ids_np(T, seed, B=2):
    return rand_ids(T, seed, B).numpy()


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids))


# --------------------------------------------------------------------------- graphs and manifest


@pytest.mark.parametrize("name", list(VARIANTS))
def test_graphs_carry_the_window(exports, name):
    """Every graph uses the ...Lookback function and K/V of 2L rows per layer; the manifest records
    the window; the close graph returns no K/V (the engine slides them)."""
    _, d = exports[name]
    fn = "ChunkAttentionNormalisedLookback" if name == "normalised" else "ChunkAttentionLookback"
    for g in ("model", "extend", "decode", "close"):
        m = onnx.load(d / f"{g}.onnx", load_external_data=False)
        assert [f.name for f in m.functions] == [fn]
        meta = read_metadata(d / f"{g}.onnx")
        assert meta["state"]["format"] == S.FORMAT == 5
        assert meta["state"]["sizes"]["window"] == 2 * L and meta["config"]["local_window"] == "lookback"
        assert meta["state"]["dims"][S.K][3] == "window"
        for vi in list(m.graph.input) + list(m.graph.output):
            if vi.name.startswith((S.K + ".", S.V + ".", S.K + S.OUT_SUFFIX, S.V + S.OUT_SUFFIX)):
                assert vi.type.tensor_type.shape.dim[2].dim_value == 2 * L, (g, vi.name)
    close = onnx.load(d / "close.onnx", load_external_data=False)
    assert not [o.name for o in close.graph.output if o.name.startswith((S.K, S.V))]


def test_chunk_window_graphs_unchanged(tiny_hf_dir, tmp_path):
    """The chunk window keeps its function, its L-row K/V and a close graph without K/V."""
    model = convert(tiny_hf_dir, chunk_size=L, local_window="chunk")
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX))
    meta = read_metadata(tmp_path / "close.onnx")
    assert meta["state"]["sizes"]["window"] == L and meta["state"]["dims"][S.K][3] == "chunk"
    close = onnx.load(tmp_path / "close.onnx", load_external_data=False)
    n_layer = model.cfg.n_layer
    assert [o.name for o in close.graph.output] == [S.layer_name(S.out_name(n), i) for n in S.CLOSE_OUT
                                                    for i in range(n_layer)]
    assert [f.name for f in close.functions] == [ox.FUNCTION_NORMALISED]


# --------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_prefill_equals_torch_reference(exports, name):
    """Logits of model.onnx equal the torch loop reference at lengths below, between and past
    one and two chunks, and its state equals the torch prefill's."""
    model, d = exports[name]
    names = ["logits"] + [S.layer_name(n, i) for n in S.CARRIED for i in range(model.cfg.n_layer)]
    with ORTRunner(d / "model.onnx", outputs=names) as r:
        for T in LENGTHS:
            ids = ids_np(T, T)
            out = dict(zip(names, r.session.run(names, {"input_ids": ids})))
            out |= S.stack(out, S.CARRIED, model.cfg.n_layer)  # (B, layer, ...) as torch holds it
            with torch.no_grad():
                ref = model(torch.from_numpy(ids), impl="reference")
                _, st = model.prefill(torch.from_numpy(ids), max_len=T)
            assert_close(torch.from_numpy(out["logits"]), ref, 1e-4, f"{name} T={T}")
            n_done = T // L
            for key, t_ in (("state_k", st.k), ("state_v", st.v), ("state_S", st.S),
                            ("state_bank_h", st.bank_h[:, :, :, :n_done]),
                            ("state_bank_F", st.bank_F[:, :, :, :n_done])):
                assert out[key].shape == tuple(t_.shape), (key, out[key].shape)
                if t_.numel():
                    assert_close(torch.from_numpy(out[key]), t_, 1e-5, f"{name} T={T} {key}")


def test_inlined_prefill_equals_torch(exports, tmp_path):
    """The standard-ops graph (function bodies inlined: what TensorRT parses without the plugin)."""
    model, _ = exports["normalised"]
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX, inline=True), decode=False)
    m = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    assert not m.functions and all(n.domain == "" for n in m.graph.node)
    with ORTRunner(tmp_path / "model.onnx") as r:
        for T in (L - 1, L + 1, 2 * L + 3, MAX):
            ids = ids_np(T, 50 + T)
            assert_close(torch.from_numpy(r.infer({"input_ids": ids})["logits"]), full_logits(model, ids), 1e-4,
                         f"inlined T={T}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_model_is_causal(exports, name):
    model, d = exports[name]
    with ORTRunner(d / "model.onnx") as r:
        for t in (L - 1, L, 2 * L - 1, 2 * L, 3 * L + 2):
            ids = ids_np(5 * L, t, B=1)
            ids2 = ids.copy()
            ids2[0, t + 1:] = (ids2[0, t + 1:] + 1 + np.arange(5 * L - t - 1)) % 101
            a, b = (r.infer({"input_ids": x})["logits"] for x in (ids, ids2))
            assert np.abs(a[0, :t + 1] - b[0, :t + 1]).max() <= 1e-5, (name, t)
            assert np.abs(a[0, t + 1:] - b[0, t + 1:]).max() > 1e-4, (name, t)


# --------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("prompt", [1, L - 1, L, L + 1, 2 * L + 3])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ort_decode_step_by_step_equals_torch(exports, name, prompt):
    """Prefill (extend graph), then one token at a time across several chunk closes (decode and
    close graphs): every position's logits equal the torch prefill's."""
    model, d = exports[name]
    ids = ids_np(MAX, prompt)
    assert_ort_decode_matches(full_logits(model, ids), d, ids, prompt, 1e-4, name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_extend_in_pieces_equals_prefill(exports, name):
    """Rows fed ragged pieces (together, and one row alone) end where a prefill of the whole
    sequence does, at every piece's last token; pieces of a few tokens on held rows (per-token
    steps, ``engine.STEP_PIECES``) among them, one of them closing a chunk."""
    model, d = exports[name]
    ids = ids_np(MAX, 3)
    full = full_logits(model, ids)
    eng = Engine(d, max_len=MAX)
    st = eng.new_state(2)
    pieces = [(3, 8), (7, 2), (2, 1), (1, 9), (12, 1), (1, 3), (2, 9)]  # tokens per row and call
    for a, b in pieces:
        pos = st.positions.copy()
        logits = eng.extend(st, [0, 1], [ids[0, pos[0]:pos[0] + a], ids[1, pos[1]:pos[1] + b]])
        for row, n in ((0, a), (1, b)):
            assert_close(torch.from_numpy(logits[row]), full[row, pos[row] + n - 1], 1e-4,
                         f"{name} row {row} at {pos[row] + n}")
    pos = int(st.positions[1])
    logits = eng.extend(st, [1], [ids[1, pos:pos + 4]])  # a sub-batch
    assert_close(torch.from_numpy(logits[0]), full[1, pos + 3], 1e-4, "sub-batch")
    # ... and decoding row 1 on from there (row 0 sits out) crosses a chunk close correctly.
    for t in range(pos + 4, MAX):
        out = eng.decode(st, np.array([0, ids[1, t]]), np.array([False, True]))
        assert_close(torch.from_numpy(out[1]), full[1, t], 1e-4, f"decode t={t}")


def test_rows_close_at_different_steps_and_pause(exports):
    """Rows whose chunks close at different steps (the per-row close) and a row that sits out
    steps, one of them where its chunk would close, keep exact states."""
    model, d = exports["normalised"]
    ids = ids_np(MAX, 9)
    full = full_logits(model, ids)
    eng = Engine(d, max_len=MAX)
    st = eng.new_state(2)
    eng.extend(st, [0, 1], [ids[0, :4], ids[1, :9]])
    paused = {17, 18, 19}  # steps row 0 sits out, at position 17 (slot L - 1: a close if it ran)
    for step in range(4, 30):
        active = np.array([step not in paused, True])
        p0, p1 = st.positions
        out = eng.decode(st, np.array([ids[0, p0], ids[1, p1]]), active)
        assert_close(torch.from_numpy(out[1]), full[1, p1], 1e-4, f"row 1 at {p1}")
        if active[0]:
            assert_close(torch.from_numpy(out[0]), full[0, p0], 1e-4, f"row 0 at {p0}")


def test_loader_refuses_a_mismatching_state(exports, tmp_path):
    """A graph whose recorded window or format differs from what this runtime reads: one line."""
    _, d = exports["plain"]
    for change, msg in ((lambda st: st["sizes"].update(window=L), "records 6 K/V rows"),
                        (lambda st: st.update(format=2), "state format 2")):
        bad = tmp_path / msg.split()[0]
        shutil.copytree(d, bad)
        m = onnx.load(bad / "extend.onnx", load_external_data=False)
        props = {p.key: p for p in m.metadata_props}
        meta = json.loads(props["bsbr_export"].value)
        change(meta["state"])
        props["bsbr_export"].value = json.dumps(meta)
        onnx.save(m, bad / "extend.onnx")
        with pytest.raises(ModelLoadError, match=msg) as info:
            Engine(bad)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the fused op alone


def _function_model(normalised: bool, T: int, d: int = 16, H: int = 2):
    """One bsbr::ChunkAttention[Normalised]Lookback node (the op the TensorRT plugin replaces)."""
    from onnx import TensorProto, helper

    C = num_chunks(T, L)
    fn = ox.chunk_attention_function(18, normalised=normalised, lookback=1)
    shapes = {"q": [2, H, T, d], "k": [2, H, T, d], "v": [2, H, T, d], "qf": [2, H, T, d],
              "S": [2, H, C, d, d], "Z": [2, H, C, d], "g": [H]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in fn.input]
    node = helper.make_node(fn.name, list(fn.input), ["o"], domain=ox.DOMAIN, chunk_size=L)
    graph = helper.make_graph([node], "op", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, shapes["q"])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ox.DOMAIN, 1)],
                          functions=[fn], ir_version=10)
    onnx.checker.check_model(m)
    return m, shapes


@pytest.mark.parametrize("normalised", [False, True])
def test_onnx_function_equals_torch_op(normalised):
    import onnxruntime as ort

    for T in (1, L - 1, L + 1, 2 * L + 3, 3 * L):
        m, shapes = _function_model(normalised, T)
        gen = torch.Generator().manual_seed(T)
        x = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
        x["g"] = torch.rand(2, generator=gen) + 0.5
        if normalised:
            x["qf"], x["Z"] = x["qf"].abs(), x["Z"].abs() + 1.0
            x["S"] = x["S"].abs()
            ref = chunk_attention(x["q"], x["k"], x["v"], x["S"], x["g"], L, qf=x["qf"], Z_full=x["Z"], lookback=1)
        else:
            ref = chunk_attention(x["q"], x["k"], x["v"], x["S"], x["g"], L, lookback=1)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {n: x[n].numpy() for n in (i.name for i in sess.get_inputs())}
        assert_close(torch.from_numpy(sess.run(None, feeds)[0]), ref, 1e-5, f"normalised={normalised} T={T}")


# --------------------------------------------------------------------------- Triton kernel


KERNEL_LENGTHS = [1, L - 1, L + 1, 2 * L + 3, 3 * L + 4]


def kernel_cases(model_dir: str) -> dict:
    """Kernel (lookback=1) vs the torch op, and the model with impl="triton" vs vectorised; runs
    under TRITON_INTERPRET=1 in the worker subprocess."""
    from bsbr_export.ops.kernel import chunk_attention_normalised_triton, chunk_attention_triton

    out = {}
    for T in KERNEL_LENGTHS:
        gen = torch.Generator().manual_seed(T)
        C = num_chunks(T, L)
        q, k, v, qf = (torch.randn(2, 2, T, 16, generator=gen) for _ in range(4))
        S_ = torch.randn(2, 2, C, 16, 16, generator=gen) / 4
        Z = torch.rand(2, 2, C, 16, generator=gen) + 1.0
        g = torch.rand(2, generator=gen) + 0.5
        plain = chunk_attention_triton(q, k, v, S_, g, L, lookback=1)
        out[f"plain T={T}"] = (plain - chunk_attention(q, k, v, S_, g, L, lookback=1)).abs().max().item()
        qf, S_ = qf.abs(), S_.abs()
        norm = chunk_attention_normalised_triton(q, k, v, qf, S_, Z, g, L, lookback=1)
        ref = chunk_attention(q, k, v, S_, g, L, qf=qf, Z_full=Z, lookback=1)
        out[f"normalised T={T}"] = (norm - ref).abs().max().item()
    model = convert(model_dir, chunk_size=L, local_window="lookback", retrieval_scale=1.0)
    ids = rand_ids(3 * L + 4, 1)
    with torch.no_grad():
        out["model"] = (model(ids, impl="triton") - model(ids)).abs().max().item()
    return out


@pytest.fixture(scope="module")
def kernel_results(tiny_hf_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tiny_hf_dir)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"kernel worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_triton_kernel_lookback_equals_torch_op(kernel_results):
    for T in KERNEL_LENGTHS:
        for op in ("plain", "normalised"):
            err = kernel_results[f"{op} T={T}"]
            print(f"triton-interp lookback {op} T={T}: max|diff| {err:.2e}")
            assert err <= 1e-5, (op, T, err)


@needs_triton
def test_model_impl_triton_runs_the_lookback_kernel(kernel_results):
    assert kernel_results["model"] <= 1e-5, kernel_results["model"]


# --------------------------------------------------------------------------- TensorRT plugin


@needs_triton
def test_plugin_registration_covers_lookback(monkeypatch):
    """Without TensorRT (a stand-in ``tensorrt.plugin``): the look-back plugins have the ONNX
    functions' IDs, inputs and attribute, and their implementation launches the kernel with
    lookback=1."""
    import inspect

    import bsbr_export.trt as bt

    fake = types.ModuleType("tensorrt.plugin")
    fake.TensorDesc, fake.Tensor, fake.descs, fake.impls = object, object, {}, {}
    fake.register = lambda pid: (lambda fn: fake.descs.setdefault(pid, fn))
    fake.impl = lambda pid: (lambda fn: fake.impls.setdefault(pid, fn))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0", plugin=fake))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", fake)
    monkeypatch.setattr(bt, "_registered", False)
    bt.register_plugin()
    for normalised, pid in ((False, bt.PLUGIN_LOOKBACK_ID), (True, bt.PLUGIN_NORMALISED_LOOKBACK_ID)):
        fn = ox.chunk_attention_function(18, normalised=normalised, lookback=1)
        assert pid == f"{fn.domain}::{fn.name}"
        assert list(inspect.signature(fake.descs[pid]).parameters) == list(fn.input) + list(fn.attribute)
        calls = []
        monkeypatch.setattr(bt, "run_plugin_kernel", lambda *a: calls.append(a))
        fake.impls[pid](*([None] * len(fn.input)), np.array([L], np.int32), (None,), 0)
        assert calls[0][0] is normalised and calls[0][-1] == 1
    monkeypatch.setattr(bt, "_registered", False)


def test_lookback_nodes_count_as_plugin_nodes(exports):
    import bsbr_export.trt as bt

    model, d = exports["normalised"]
    assert bt.count_plugin_nodes(d / "model.onnx") == model.cfg.n_layer


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed (pip install tensorrt, needs an NVIDIA GPU)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_tensorrt_parses_lookback_nodes_as_plugins(exports):
    import bsbr_export.trt as bt

    model, d = exports["normalised"]
    _, network, _parser = bt.network_from_onnx(d / "model.onnx")
    assert bt.plugin_layer_count(network) == model.cfg.n_layer


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("command", [["run"], ["convert"], ["export"]])
def test_cli_offers_the_local_window(command):
    from click.testing import CliRunner

    from bsbr_export.cli import main

    res = CliRunner().invoke(main, [*command, "--help"])
    assert res.exit_code == 0 and "--local-window [chunk|lookback]" in res.output, res.output


def test_export_command_writes_lookback_graphs(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from bsbr_export.cli import main

    res = CliRunner().invoke(main, ["export", str(tiny_hf_dir), "--out", str(tmp_path), "--chunk-size", str(L),
                                    "--max-seq-len", str(MAX), "--local-window", "lookback", "--no-decode"])
    assert res.exit_code == 0, res.output
    assert read_metadata(tmp_path / "model.onnx")["config"]["local_window"] == "lookback"


if __name__ == "__main__":
    print(json.dumps(kernel_cases(sys.argv[1])))
