"""Retrieval weights (``retrieval_weights``): softmax (the default), sum, decay (a learned per-head
lambda) and gate (an unnormalised sigmoid), with both local windows and both retrievals, through
every backend: the torch chunk form against the loop reference, the recurrent decode against the
prefill, the ONNX prefill against torch, and the runtime engine (per-token, close and extend
graphs) against torch. A tiny random GPT-2, chunk L = 8, lengths that are not multiples of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bsbr_export.calibrate import trainable
from bsbr_export.config import BSBRConfig
from bsbr_export.convert import convert, load_bsbr, save_bsbr
from bsbr_export.errors import ConfigError
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.ops import state as S
from bsbr_export.ops.chunk import bsbr_attention
from bsbr_export.ops.naive import bsbr_attention_reference, normalised_log_weights
from bsbr_export.runtime.engine import Engine, read_metadata
from conftest import (assert_close, assert_decode_matches, assert_extend_pieces, assert_ort_decode_matches,
                      export_each, onnx_prefill_cases, rand_ids, op_inputs as shared_op_inputs)

L, MAX = 8, 29
LENGTHS = [5, 13, 29]
WEIGHTS = ["sum", "decay", "gate"]
WINDOWS = ["chunk", "lookback"]
RETRIEVALS = {"normalised": dict(retrieval="normalised", feature_map="elu1", retrieval_scale=1.0),
              "plain": dict(retrieval="plain", retrieval_scale=0.5)}
DECAY = torch.tensor([0.5, 0.9, 1.0])  # per head: fast, slow, none


def op_inputs(T, seed):
    return shared_op_inputs(T, seed, L, d=16, scale=0.5, g_min=0.5)


def model_opts(weights, window, retrieval, **extra):
    return dict(chunk_size=L, local_window=window, retrieval_weights=weights, retrieval_decay=0.8,
                **RETRIEVALS[retrieval], **extra)


# --------------------------------------------------------------------------- torch


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("weights", ["softmax", *WEIGHTS])
def test_chunk_form_equals_loop_reference(weights, window, retrieval, T):
    q, k, v, r, h, g = op_inputs(T, T)
    kw = dict(retrieval=retrieval, feature_map=RETRIEVALS[retrieval]["feature_map"] if retrieval == "normalised"
              else "identity", local_window=window, retrieval_weights=weights, decay=DECAY)
    vec = bsbr_attention(q, k, v, r, h, g, L, **kw)
    ref = bsbr_attention_reference(q, k, v, r, h, g, L, **kw)
    assert_close(vec, ref, 1e-5, f"{weights} {window} {retrieval} T={T}", rtol=4e-6)


def test_weights_differ_from_softmax_past_the_window():
    """Each variant changes the output where a chunk retrieves more than one chunk (and nowhere
    before the first retrieval)."""
    T = 29
    q, k, v, r, h, g = op_inputs(T, 1)
    kw = dict(retrieval="normalised", feature_map="elu1")
    base = bsbr_attention(q, k, v, r, h, g, L, **kw)
    for weights in WEIGHTS:
        out = bsbr_attention(q, k, v, r, h, g, L, retrieval_weights=weights, decay=DECAY, **kw)
        assert_close(out[:, :, :L], base[:, :, :L], 1e-6, f"{weights} chunk 0")
        assert (out[:, :, 2 * L:] - base[:, :, 2 * L:]).abs().max() > 1e-3, weights


@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
@pytest.mark.parametrize("window", WINDOWS)
def test_sum_equals_decay_of_one(window, retrieval):
    q, k, v, r, h, g = op_inputs(29, 2)
    kw = dict(retrieval=retrieval, feature_map="elu1" if retrieval == "normalised" else "identity",
              local_window=window)
    a = bsbr_attention(q, k, v, r, h, g, L, retrieval_weights="sum", **kw)
    b = bsbr_attention(q, k, v, r, h, g, L, retrieval_weights="decay", decay=torch.ones(3), **kw)
    c = bsbr_attention_reference(q, k, v, r, h, g, L, retrieval_weights="decay", decay=torch.ones(3), **kw)
    assert_close(a, b, 1e-6, "sum == decay(1)")
    assert_close(a, c, 1e-5, "sum == reference decay(1)")


def test_decay_is_a_recurrence():
    """S_i = lambda S_{i-1} + F_{i-1-lookback}: the retrieved states of ``retrieve`` obey it."""
    from bsbr_export.ops.chunk import chunk_states, retrieve

    T = 6 * L
    q, k, v, r, h, _ = op_inputs(T, 3)
    Fs = chunk_states(k, v, L, None, "elu1", True)
    for n in (0, 1):
        Ss = retrieve(r, h, Fs, n, "decay", DECAY)
        lam = DECAY.view(1, -1, 1, 1)
        for i in range(1, Ss.shape[2]):
            prev = Fs[:, :, i - 1 - n] if i - 1 - n >= 0 else torch.zeros_like(Fs[:, :, 0])
            assert_close(Ss[:, :, i], lam * Ss[:, :, i - 1] + prev, 1e-5, f"n={n} i={i}")


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("weights", ["softmax", *WEIGHTS])
def test_log_weights_rows_sum_to_one_and_give_the_op(weights, window):
    for T in LENGTHS:
        q, k, v, r, h, g = op_inputs(T, 10 + T)
        log_w = normalised_log_weights(q, k, r, h, g, L, "elu1", window, weights, DECAY)
        assert_close(log_w.exp().sum(-1), torch.ones(log_w.shape[:-1]), 1e-5, f"{weights} rows T={T}")
        out = bsbr_attention(q, k, v, r, h, g, L, retrieval="normalised", feature_map="elu1", local_window=window,
                             retrieval_weights=weights, decay=DECAY)
        assert_close(log_w.exp() @ v, out, 1e-5, f"{weights} {window} exp(log w) @ v T={T}")


def test_log_weights_train_the_decay():
    """Attention transfer reaches lambda: the log weights are differentiable in it."""
    q, k, v, r, h, g = op_inputs(29, 4)
    lam = DECAY.clone().clamp(max=0.99).requires_grad_(True)
    normalised_log_weights(q, k, r, h, g, L, "elu1", "chunk", "decay", lam).exp().mul(v[..., :1].mT).sum().backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["weights", "output"])
def test_transfer_trains_the_decay_within_its_range(tiny_hf_dir, tiny_hf, loss):
    """Attention transfer moves lambda (started at 1, the range's edge) and leaves it in (0, 1]."""
    from bsbr_export.calibrate import transfer

    model = convert(tiny_hf_dir, **model_opts("decay", "chunk", "normalised") | {"retrieval_decay": 1.0})
    wins = [rand_ids(4 * L + 1, s, B=1) for s in range(2)]
    transfer(model, lambda x: tiny_hf(input_ids=x, output_hidden_states=True).hidden_states, wins, passes=3,
             loss=loss, lr=3e-2, warmup=1)
    lam = torch.stack([b.attn.decay for b in model.h])
    assert (lam > 0).all() and (lam <= 1).all() and (lam < 1).any(), lam


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    return {(w, win, ret): convert(tiny_hf_dir, **model_opts(w, win, ret))
            for w in WEIGHTS for win in WINDOWS for ret in RETRIEVALS}


@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_model_paths_and_decode(models, weights, window, retrieval):
    """The model's vectorised and reference forwards agree; a prefill of any prompt, then one
    token at a time across chunk closes, gives the full forward's logits."""
    model = models[(weights, window, retrieval)]
    ids = rand_ids(MAX, 7)
    with torch.no_grad():
        assert_close(model(ids), model(ids, impl="reference"), 1e-5, "reference")
    for prompt in (1, 5, L, 13):
        assert_decode_matches(model, ids, prompt, 1e-5, 2e-5, f"{weights} {window} {retrieval} prompt={prompt}")


def test_decay_parameter_is_converted_saved_and_trained(models, tmp_path):
    model = models[("decay", "chunk", "normalised")]
    assert torch.equal(model.h[0].attn.decay, torch.full((2,), 0.8))
    assert "h.1.attn.decay" in dict(trainable(model))
    assert "attn.decay" not in str([n for n, _ in trainable(models[("gate", "chunk", "normalised")])])
    for p in model.parameters():
        p.requires_grad_(True)
    save_bsbr(model, tmp_path / "m")
    back = load_bsbr(tmp_path / "m")
    assert back.cfg == model.cfg and back.cfg.retrieval_weights == "decay"
    ids = rand_ids(MAX, 1)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


# --------------------------------------------------------------------------- ONNX and the runtime

EXPORTED = [(w, win, "normalised") for w in WEIGHTS for win in WINDOWS] + [("decay", "lookback", "plain"),
                                                                           ("gate", "chunk", "plain")]


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    return export_each(models, EXPORTED, tmp_path_factory, "rw_", MAX)


def ids_np(T, seed, B=2):
    return rand_ids(T, seed, B).numpy()


@pytest.mark.parametrize("key", EXPORTED, ids=["-".join(k) for k in EXPORTED])
def test_onnx_prefill_equals_torch(exports, key):
    model, d = exports[key]
    assert read_metadata(d / "model.onnx")["config"]["retrieval_weights"] == key[0]
    for T, ids, out, ref, st in onnx_prefill_cases(model, d, [*LENGTHS, 2 * L, 3 * L], lambda T: ids_np(T, T)):
        assert_close(torch.from_numpy(out["logits"]), ref, 1e-4, f"{key} T={T}")
        n_done = T // L
        for name, t_ in ((S.K, st.k), (S.V, st.v), (S.S, st.S), (S.BANK_H, st.bank_h[:, :, :, :n_done]),
                         (S.BANK_F, st.bank_F[:, :, :, :n_done])):
            assert out[name].shape == tuple(t_.shape), (name, out[name].shape)
            if t_.numel():  # S of sum/gate grows with the chunks it adds: rounding relative to it
                assert_close(torch.from_numpy(out[name]), t_, 1e-5, f"{key} T={T} {name}", rtol=1e-6)


@pytest.mark.parametrize("key", EXPORTED, ids=["-".join(k) for k in EXPORTED])
def test_engine_decode_equals_torch(exports, key):
    """Prefill (extend graph), then one token at a time across chunk closes (per-token and close
    graphs): every position's logits equal the torch model's."""
    model, d = exports[key]
    ids = ids_np(MAX, 5)
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    for prompt in (1, 5, 13):
        assert_ort_decode_matches(full, d, ids, prompt, 1e-4, f"{key} prompt={prompt}")


@pytest.mark.parametrize("key", EXPORTED, ids=["-".join(k) for k in EXPORTED])
def test_engine_extend_in_pieces_equals_torch(exports, key):
    model, d = exports[key]
    ids = ids_np(MAX, 3)
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    eng = Engine(d, max_len=MAX)
    st = eng.new_state(2)
    assert_extend_pieces(eng, st, ids, full, [(3, 9), (7, 2), (1, 11), (12, 1), (5, 4)], 1e-4, str(key))
    for t in range(int(st.positions[1]), MAX):  # row 1 decodes on alone, across a chunk close
        out = eng.decode(st, np.array([0, ids[1, t]]), np.array([False, True]))
        assert_close(torch.from_numpy(out[1]), full[1, t], 1e-4, f"{key} decode t={t}")


def test_default_export_has_no_decay_parameter(tiny_hf_dir, tmp_path):
    """softmax (the default) and gate add no parameter, and the config records the choice."""
    model = convert(tiny_hf_dir, chunk_size=L)
    assert model.cfg.retrieval_weights == "softmax"
    assert not [n for n in model.state_dict() if "decay" in n]
    assert not [n for n in convert(tiny_hf_dir, chunk_size=L, retrieval_weights="gate").state_dict()
                if "decay" in n]


# --------------------------------------------------------------------------- config and command line


def test_config_validation():
    base = dict(vocab_size=10, n_positions=64, n_embd=8, n_layer=1, n_head=2, chunk_size=8)
    assert BSBRConfig(**base).retrieval_weights == "softmax"
    # A saved config without the key (written before it existed) meant softmax weights.
    legacy = {k: v for k, v in BSBRConfig(**base, retrieval_weights="gate").to_dict().items()
              if k != "retrieval_weights"}
    assert BSBRConfig.from_dict(legacy).retrieval_weights == "softmax"
    with pytest.raises(ConfigError, match="retrieval weights must be one of"):
        BSBRConfig(**base, retrieval_weights="mean")
    for bad in (0.0, -0.5, 1.5, float("nan"), True, "0.9", None):
        with pytest.raises(ConfigError, match=r"retrieval decay must be a number in \(0, 1\]"):
            BSBRConfig(**base, retrieval_weights="decay", retrieval_decay=bad)
    for w in ("softmax", *WEIGHTS):
        cfg = BSBRConfig(**base, retrieval_weights=w, retrieval_decay=1)
        assert BSBRConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_offers_the_retrieval_weights(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from bsbr_export.cli import main

    for command in (["convert"], ["export"], ["run"]):
        res = CliRunner().invoke(main, [*command, "--help"])
        assert res.exit_code == 0 and "--retrieval-weights [softmax|sum|decay|gate]" in res.output, res.output
        assert "--retrieval-decay" in res.output
    res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), "--out", str(tmp_path / "m"), "--chunk-size", str(L),
                                    "--retrieval-weights", "decay", "--retrieval-decay", "0.9"])
    assert res.exit_code == 0, res.output
    model = load_bsbr(tmp_path / "m")
    assert model.cfg.retrieval_weights == "decay" and torch.allclose(model.h[0].attn.decay, torch.full((2,), 0.9))
    res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), "--out", str(tmp_path / "bad"),
                                    "--retrieval-weights", "decay", "--retrieval-decay", "1.5"])
    assert res.exit_code != 0 and "retrieval decay must be a number in (0, 1]" in res.output, res.output


@pytest.mark.parametrize("weights,window", [("decay", "lookback"), ("gate", "chunk")])
def test_fp16_engine_equals_torch(models, tmp_path, weights, window):
    """fp16 graphs compute the weights in fp32 (Pow, Sigmoid): extend then decode across closes,
    within the fp16 tolerance of the other fp16 tests (1e-3)."""
    model = models[(weights, window, "normalised")]
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX, fp16=True))
    ids = ids_np(MAX, 5)
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    eng = Engine(tmp_path, precision="fp16", max_len=MAX)
    st = eng.new_state(2)
    logits = eng.extend(st, [0, 1], [ids[0, :13], ids[1, :13]])
    assert_close(torch.from_numpy(logits), full[:, 12], 1e-3, f"{weights} fp16 prefill")
    for t in range(13, MAX):
        out = eng.decode(st, ids[:, t], np.array([True, True]))
        assert_close(torch.from_numpy(out), full[:, t], 1e-3, f"{weights} fp16 t={t}")
