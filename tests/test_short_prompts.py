"""Two fast paths for short prompts, each against the path it replaces and against torch:

- the prefill graph's short-prompt If (``ExportSpec.short_prompts``): a prompt within the exact
  span (chunk x (look-back + 1) tokens) takes plain causal attention; the extend graph's, for
  pieces of fresh rows that leave nothing to retrieve;
- the runtime's joined session (``runtime.joined``): the prompt graph and the per-token graph as
  the two branches of one If in one ORT session, so that both read one packed copy of the weights.

A tiny random GPT-2, chunk L = 6, both local windows, plain and normalised retrieval, lengths on
both sides of each chunk boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bsbr_export.convert import convert
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.runtime.engine import Engine
from bsbr_export.runtime.joined import FLAG, joined_model
from bsbr_export.trt import count_plugin_nodes
from conftest import rand_ids

L, MAX = 6, 40
LENGTHS = [1, L - 1, L, L + 1, 2 * L - 1, 2 * L, 2 * L + 1, 3 * L + 2, MAX - 1]
VARIANTS = {
    "chunk-plain": dict(local_window="chunk", retrieval="plain", retrieval_scale=1.0),
    "lookback-normalised": dict(local_window="lookback", retrieval="normalised", feature_map="elu1",
                                retrieval_scale=1.0),
}


@pytest.fixture(scope="module")
def exports(tiny_hf_dir, tmp_path_factory):
    """{variant: (torch model, export with the short path, export without it)}."""
    out = {}
    for name, opts in VARIANTS.items():
        model = convert(tiny_hf_dir, chunk_size=L, **opts)
        dirs = []
        for short in (True, False):
            d = tmp_path_factory.mktemp(f"{name}_{short}")
            export_onnx(model, d, ExportSpec(max_seq_len=MAX, short_prompts=short))
            dirs.append(d)
        out[name] = (model, *dirs)
    return out


def _ifs(path) -> list:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "If"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_prefill_graph_takes_causal_attention_within_the_exact_span(exports, name):
    """One If per layer (and one for the mask) with the short path, none without; its then branch
    holds no fused op. Every output (logits and the state after the prompt) equals the graph
    without the short path at every length, and the logits equal torch's."""
    model, short, full = exports[name]
    n_layer = model.cfg.n_layer
    ifs = _ifs(short / "model.onnx")
    assert len(ifs) == n_layer + 1 and not _ifs(full / "model.onnx")
    assert count_plugin_nodes(short / "model.onnx") == count_plugin_nodes(full / "model.onnx") == n_layer
    for node in ifs[1:]:
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        assert {n.op_type for n in then.node} >= {"Softmax", "MatMul"}
        assert not any(n.domain == "bsbr" for n in then.node)
    a, b = (ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]) for d in (short, full))
    names = [o.name for o in a.get_outputs()]
    for T in LENGTHS:
        ids = rand_ids(T, seed=T).numpy()
        got, want = a.run(None, {"input_ids": ids}), b.run(None, {"input_ids": ids})
        for n, x, y in zip(names, got, want):
            assert x.shape == y.shape, (T, n)
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5, err_msg=f"T={T} {n}")
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(got[0], ref, atol=5e-5, err_msg=f"T={T} torch")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fresh_prompts_through_the_extend_graph_equal_the_general_path(exports, name):
    """Ragged batches of fresh prompts at every length (the extend graph's short path where it
    applies, the general path beyond), then decode steps across a chunk close: the logits equal
    the export without the short path, and torch's."""
    model, short, full = exports[name]
    n_layer = model.cfg.n_layer
    ifs = _ifs(short / "extend.onnx")
    assert len(ifs) == n_layer + 1 and not _ifs(full / "extend.onnx")
    engines = [Engine(d, max_len=MAX) for d in (short, full)]
    ids = rand_ids(MAX, seed=5).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    for T in LENGTHS:
        lengths = [T, max(1, T - 3)]
        states = [e.new_state(2) for e in engines]
        got = [e.extend(st, [0, 1], [ids[0, :lengths[0]], ids[1, :lengths[1]]]) for e, st in zip(engines, states)]
        np.testing.assert_allclose(got[0], got[1], atol=2e-5, err_msg=f"T={T}")
        np.testing.assert_allclose(got[0], ref[[0, 1], [lengths[0] - 1, lengths[1] - 1]], atol=5e-5, err_msg=f"T={T}")
        pos = list(lengths)
        for _ in range(min(L + 1, MAX - 1 - max(pos))):  # a chunk close on the way
            toks = np.array([ids[0, pos[0]], ids[1, pos[1]]])
            got = [e.decode(st, toks) for e, st in zip(engines, states)]
            np.testing.assert_allclose(got[0], got[1], atol=2e-5, err_msg=f"T={T} at {pos}")
            np.testing.assert_allclose(got[0], ref[[0, 1], pos], atol=5e-5, err_msg=f"T={T} at {pos}")
            pos = [x + 1 for x in pos]


def _nodes_run(path, position: int, T: int = 3) -> int:
    """Nodes ORT runs for one extend call of 2 rows, ``T`` new tokens each on ``position`` held."""
    import json

    so = ort.SessionOptions()
    so.enable_profiling = True
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.ones((2, T), np.int64), "lengths": np.full(2, T, np.int64),
            "position": np.full(2, position, np.int64), "logit_rows": np.array([T - 1, 2 * T - 1])}
    for i in sess.get_inputs():
        if i.name not in feed:
            feed[i.name] = np.zeros([2 if d == "batch" else d if isinstance(d, int) else 1 for d in i.shape],
                                    np.float32)
    sess.run(None, feed)
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    return sum(e.get("cat") == "Node" and e["name"].endswith("_kernel_time") for e in events)


def test_the_extend_graph_takes_the_short_path_for_fresh_rows_only(exports, tmp_path, monkeypatch):
    """A piece of fresh rows runs a fraction of the nodes that the same piece on top of held
    tokens runs (the general path); the export without the short path runs as many either way."""
    monkeypatch.chdir(tmp_path)  # ORT writes its profile to the working directory
    _, short, full = exports["lookback-normalised"]
    fresh, held = _nodes_run(short / "extend.onnx", 0), _nodes_run(short / "extend.onnx", 2)
    assert fresh < held / 2, (fresh, held)
    assert _nodes_run(full / "extend.onnx", 0) > held * 0.9


def test_the_short_path_is_off_for_tensorrt_and_int8_graphs(exports, tmp_path):
    """``short_prompts=False`` (what the pipeline sets when it builds a TensorRT engine) writes no
    If; nor do int8 graphs, whose prompts give the same bits fed whole or in pieces."""
    model, _, full = exports["lookback-normalised"]
    assert not _ifs(full / "model.onnx")
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX, int8=True))
    assert not _ifs(tmp_path / "model_int8.onnx") and not _ifs(tmp_path / "extend_int8.onnx")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_joined_session_equals_separate_sessions(exports, name):
    """load(DIR)'s engine runs extend and decode in one session (an If on ``extend``); prompts in
    pieces of every length, then decode steps across chunk closes, give the logits of the
    engine with a session per graph, and torch's."""
    model, d, _ = exports[name]
    joined, separate = Engine(d, max_len=MAX), Engine(d, max_len=MAX, join=False)
    assert joined.sessions["extend"] is joined.sessions["decode"] is not joined.sessions["close"]
    assert FLAG in {i.name for i in joined.sessions["decode"].get_inputs()}
    assert separate.sessions["extend"] is not separate.sessions["decode"]
    ids = rand_ids(MAX, seed=3).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    states = {e: e.new_state(2) for e in (joined, separate)}
    pieces = [(3, 1), (L + 1, 2 * L - 1)]  # row 0 and row 1 take pieces of these lengths
    pos = [0, 0]
    for a, b in pieces:
        out = {e: e.extend(st, [0, 1], [ids[0, pos[0]:pos[0] + a], ids[1, pos[1]:pos[1] + b]])
               for e, st in states.items()}
        pos = [pos[0] + a, pos[1] + b]
        np.testing.assert_allclose(out[joined], out[separate], atol=1e-5)
        np.testing.assert_allclose(out[joined], ref[[0, 1], [pos[0] - 1, pos[1] - 1]], atol=5e-5)
    while max(pos) < MAX - 1:
        toks = np.array([ids[0, pos[0]], ids[1, pos[1]]])
        active = np.array([pos[0] < MAX - 1, True])
        out = {e: e.decode(st, toks, active) for e, st in states.items()}
        np.testing.assert_allclose(out[joined], out[separate], atol=1e-5, err_msg=f"{pos}")
        for r in np.flatnonzero(active):
            np.testing.assert_allclose(out[joined][r], ref[r, pos[r]], atol=5e-5, err_msg=f"row {r} at {pos[r]}")
            pos[r] += 1


def test_a_joined_model_refuses_graphs_that_do_not_fit(exports, tmp_path):
    """A per-token graph with an input the prompt graph lacks is refused in one line."""
    from bsbr_export.errors import ModelLoadError

    _, d, _ = exports["chunk-plain"]
    m = onnx.load(str(d / "decode.onnx"), load_external_data=False)
    m.graph.input.append(onnx.helper.make_tensor_value_info("stray", onnx.TensorProto.FLOAT, [1]))
    onnx.save(m, str(tmp_path / "decode.onnx"))
    with pytest.raises(ModelLoadError, match="stray"):
        joined_model(d / "extend.onnx", tmp_path / "decode.onnx")
