"""``retrieval_until``: chunks that start at or after it retrieve nothing (the local softmax alone),
through every backend: the torch chunk form against the loop reference, the explicit attention
weights of the transfer, the recurrent decode against the prefill, the ONNX prefill, the runtime
engine (per-token, close and extend graphs; fp32, fp16, int8) against torch, and the model
through the Triton kernel (its interpreter). A tiny random GPT-2, chunk
L = 8, retrieval until token 20 (chunks 0-2 retrieve), lengths that are not multiples of L."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bsbr_export.config import BSBRConfig
from bsbr_export.convert import build_model, convert, load_bsbr, save_bsbr
from bsbr_export.errors import ConfigError
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.ops import state as S
from bsbr_export.ops.chunk import bsbr_attention
from bsbr_export.ops.naive import bsbr_attention_reference, normalised_log_weights
from bsbr_export.runtime.engine import Engine, read_metadata
from conftest import (assert_close, assert_decode_matches, assert_extend_pieces, assert_ort_decode_matches,
                      export_each, onnx_prefill_cases, op_inputs, rand_ids)

ROOT = Path(__file__).resolve().parents[1]
L, UNTIL, MAX = 8, 20, 45
U = 3  # chunks 0, 1, 2 start before token 20
LENGTHS = [5, 21, 29, 45]
DECAY = torch.tensor([0.5, 0.9, 1.0])
VARIANTS = [("chunk", "softmax"), ("lookback", "softmax"), ("lookback", "decay"), ("chunk", "gate")]


def model_opts(window, weights, until=UNTIL):
    return dict(chunk_size=L, local_window=window, retrieval_weights=weights, retrieval_decay=0.8,
                retrieval="normalised", feature_map="elu1", retrieval_scale=1.0, retrieval_until=until)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("window,weights", VARIANTS)
def test_chunk_form_equals_loop_reference(window, weights, T):
    q, k, v, r, h, g = op_inputs(T, T, L, H=3, d=16, scale=0.5, g_min=0.5)
    kw = dict(retrieval="normalised", feature_map="elu1", local_window=window, retrieval_weights=weights,
              decay=DECAY)
    vec = bsbr_attention(q, k, v, r, h, g, L, retrieving_chunks=U, **kw)
    ref = bsbr_attention_reference(q, k, v, r, h, g, L, retrieving_chunks=U, **kw)
    assert_close(vec, ref, 1e-5, f"{window} {weights} T={T}", rtol=4e-6)
    # Before the limit the op is unchanged; from it on, the local softmax alone (no retrieval at all).
    full = bsbr_attention(q, k, v, r, h, g, L, **kw)
    assert_close(vec[:, :, :U * L], full[:, :, :U * L], 1e-6, "chunks before the limit")
    if T > U * L:
        local = bsbr_attention(q, k, v, r, h, torch.zeros_like(g), L, **kw)  # g = 0: no retrieved term
        assert_close(vec[:, :, U * L:], local[:, :, U * L:], 1e-6, "chunks from the limit on")
        assert (vec[:, :, U * L:] - full[:, :, U * L:]).abs().max() > 1e-4, "the limit changed nothing"


@pytest.mark.parametrize("window,weights", VARIANTS)
def test_log_weights_give_the_op(window, weights):
    for T in LENGTHS:
        q, k, v, r, h, g = op_inputs(T, 10 + T, L, H=3, d=16, scale=0.5, g_min=0.5)
        log_w = normalised_log_weights(q, k, r, h, g, L, "elu1", window, weights, DECAY, U)
        out = bsbr_attention(q, k, v, r, h, g, L, retrieval="normalised", feature_map="elu1", local_window=window,
                             retrieval_weights=weights, decay=DECAY, retrieving_chunks=U)
        assert_close(log_w.exp() @ v, out, 1e-5, f"{window} {weights} T={T}")


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    return {key: convert(tiny_hf_dir, **model_opts(*key)) for key in VARIANTS}


@pytest.mark.parametrize("key", VARIANTS, ids=["-".join(k) for k in VARIANTS])
def test_model_paths_and_decode(models, key):
    model = models[key]
    assert model.cfg.retrieving_chunks == U
    ids = rand_ids(MAX, 7)
    with torch.no_grad():
        assert_close(model(ids), model(ids, impl="reference"), 1e-5, "reference")
    for prompt in (1, 13, 2 * L, 3 * L + 1):
        assert_decode_matches(model, ids, prompt, 1e-5, 2e-5, f"{key} prompt={prompt}")


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    return export_each(models, VARIANTS, tmp_path_factory, "until_", MAX)


@pytest.mark.parametrize("key", VARIANTS, ids=["-".join(k) for k in VARIANTS])
def test_onnx_prefill_equals_torch(exports, key):
    model, d = exports[key]
    assert read_metadata(d / "model.onnx")["config"]["retrieval_until"] == UNTIL
    for T, _, out, ref, st in onnx_prefill_cases(model, d, [*LENGTHS, 3 * L, 4 * L], lambda T: rand_ids(T, T).numpy()):
        assert_close(torch.from_numpy(out["logits"]), ref, 1e-4, f"{key} T={T}")
        assert_close(torch.from_numpy(out[S.S]), st.S, 1e-5, f"{key} T={T} S", rtol=1e-6)


@pytest.mark.parametrize("key", VARIANTS, ids=["-".join(k) for k in VARIANTS])
def test_engine_decode_and_extend_equal_torch(exports, key):
    """Prompts, then one token at a time across the limit (per-token and close graphs), and a
    prompt in pieces across it (extend graph): every position's logits equal the torch model's."""
    model, d = exports[key]
    ids = rand_ids(MAX, 5).numpy()
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    for prompt in (1, 13, 3 * L + 2):
        assert_ort_decode_matches(full, d, ids, prompt, 1e-4, f"{key} prompt={prompt}")
    eng = Engine(d, max_len=MAX)
    st = eng.new_state(2)
    assert_extend_pieces(eng, st, ids, full, [(3, 9), (14, 2), (1, 13), (12, 1), (5, 4)], 1e-4, str(key))


@pytest.mark.parametrize("key", VARIANTS, ids=["-".join(k) for k in VARIANTS])
def test_bank_keeps_only_the_retrieved_chunks(exports, key):
    """A row's bank holds the chunks a retrieving chunk reads (j < U - 1 - lookback), however long
    the row grows: its bytes stop growing there, and rows past the limit (in pieces, copied,
    decoded across chunk closes) still give the torch model's logits."""
    model, d = exports[key]
    ids = rand_ids(MAX, 5).numpy()
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    eng = Engine(d, max_len=MAX)
    slots = U - 1 - (key[0] == "lookback")
    assert eng.capacity == slots < -(-MAX // L)
    assert eng.row_bytes(MAX) == eng.row_bytes(slots * L) > eng.row_bytes(0)
    assert eng.bank_bytes(MAX) == eng.bank_bytes(slots * L)
    st = eng.new_state(2)
    assert_extend_pieces(eng, st, ids, full, [(3, 9), (14, 2), (1, 13), (12, 1), (5, 4)], 1e-4, str(key))
    assert [b[S.BANK_H].shape[3] for b in st.banks] == [slots, slots]
    eng.copy_rows(st, 0, [1])  # row 1 takes row 0's state at 35 tokens
    for t in range(int(st.positions[0]), MAX):
        logits = eng.decode(st, np.array([ids[0, t], ids[0, t]]))
        for row in (0, 1):
            assert_close(torch.from_numpy(logits[row]), full[0, t], 1e-4, f"{key} row {row} at {t + 1}")
    assert [b[S.BANK_H].shape[3] for b in st.banks] == [slots, slots]


def test_config(tmp_path, tiny_hf_dir):
    base = dict(vocab_size=10, n_positions=64, n_embd=8, n_layer=1, n_head=2, chunk_size=8)
    assert (BSBRConfig(**base).retrieval_until, BSBRConfig(**base).retrieving_chunks) == (64, 8)  # the default
    assert BSBRConfig(**base, retrieval_until="all").retrieval_until is None
    assert BSBRConfig(**base, retrieval_until=None).retrieving_chunks is None
    cfg = BSBRConfig(**base, retrieval_until="positions")
    assert (cfg.retrieval_until, cfg.retrieving_chunks) == (64, 8)
    assert BSBRConfig(**base, retrieval_until=17).retrieving_chunks == 3  # chunk 2 starts at 16 < 17
    assert BSBRConfig.from_dict(cfg.to_dict()) == cfg
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "retrieval_until"}  # written before the key
    assert BSBRConfig.from_dict(legacy).retrieval_until is None
    for bad in (0, -8, 2.5, True, "none", "1024"):
        with pytest.raises(ConfigError, match="retrieval until must be"):
            BSBRConfig(**base, retrieval_until=bad)
    model = convert(tiny_hf_dir, **model_opts("lookback", "decay"))
    save_bsbr(model, tmp_path / "m")
    assert load_bsbr(tmp_path / "m").cfg.retrieval_until == UNTIL


def test_cli_option_and_calibration_default(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from bsbr_export.calibrate_run import calibration_options
    from bsbr_export.cli import main

    res = CliRunner().invoke(main, ["convert", "--help"])
    assert res.exit_code == 0 and "--retrieval-until" in res.output, res.output
    for value, want in (("positions", 256), ("all", None), ("40", 40)):
        out = tmp_path / f"m-{value}"
        res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), "--out", str(out), "--chunk-size", str(L),
                                        "--retrieval-until", value])
        assert res.exit_code == 0, res.output
        assert load_bsbr(out).cfg.retrieval_until == want
    res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), "--out", str(tmp_path / "bad"),
                                    "--retrieval-until", "soon"])
    assert res.exit_code != 0 and "retrieval until must be" in res.output and not (tmp_path / "bad").exists()
    # Not named: the default, the position table (a calibration too); named: as given.
    assert load_bsbr(tmp_path / "m-positions").cfg == convert(tiny_hf_dir, chunk_size=L).cfg
    assert "retrieval_until" not in calibration_options(str(tiny_hf_dir), {})
    assert calibration_options(str(tiny_hf_dir), {"retrieval_until": "all"})["retrieval_until"] == "all"


# --------------------------------------------------------------------------- fp16, int8, Triton


def test_fp16_engine_equals_torch(models, tmp_path):
    """fp16 graphs: a prompt, then decode across the limit, within the fp16 tolerance (1e-3)."""
    model = models[("lookback", "decay")]
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX, fp16=True))
    ids = rand_ids(MAX, 5).numpy()
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    eng = Engine(tmp_path, precision="fp16", max_len=MAX)
    st = eng.new_state(2)
    logits = eng.extend(st, [0, 1], [ids[0, :13], ids[1, :13]])
    assert_close(torch.from_numpy(logits), full[:, 12], 1e-3, "fp16 prefill")
    for t in range(13, MAX):
        out = eng.decode(st, ids[:, t], np.array([True, True]))
        assert_close(torch.from_numpy(out), full[:, t], 1e-3, f"fp16 t={t}")


def test_int8_engine_follows_the_limit(models, tmp_path):
    """int8 graphs: a prompt fed whole gives the bits of the same prompt in pieces then decoded
    (the int8 graphs' rule), and past the limit the logits are nearer the torch model with the
    limit than to the same weights retrieving from every chunk."""
    model = models[("lookback", "softmax")]
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=MAX, int8=True))
    ids = rand_ids(MAX, 6).numpy()
    whole = Engine(tmp_path, precision="int8", max_len=MAX)
    a = whole.extend(whole.new_state(2), [0, 1], [ids[0], ids[1]])
    eng = Engine(tmp_path, precision="int8", max_len=MAX)
    st = eng.new_state(2)
    eng.extend(st, [0, 1], [ids[0, :11], ids[1, :29]])
    eng.extend(st, [0], [ids[0, 11:29]])
    for t in range(29, MAX - 1):
        eng.decode(st, ids[:, t], np.array([True, True]))
    b = eng.decode(st, ids[:, MAX - 1], np.array([True, True]))
    np.testing.assert_allclose(a, b, atol=1e-5)
    with torch.no_grad():
        limited = model(torch.from_numpy(ids))[:, -1].numpy()
        every = build_model(model.state_dict(), dataclasses.replace(model.cfg, retrieval_until=None))(
            torch.from_numpy(ids))[:, -1].numpy()
    assert np.abs(every - limited).max() > 10 * np.abs(a - limited).max(), "int8 did not follow the limit"


HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")
def test_model_impl_triton_follows_the_limit(models, tmp_path):
    """The Triton kernel takes each chunk's S: the model through it (TRITON_INTERPRET=1, in a
    subprocess) equals the vectorised model across the limit."""
    model = models[("lookback", "decay")]
    save_bsbr(model, tmp_path / "m")
    code = ("import sys, torch; from bsbr_export.convert import load_bsbr; from conftest import rand_ids\n"
            "m = load_bsbr(sys.argv[1]); ids = rand_ids(45, 1)\n"
            "with torch.no_grad(): print((m(ids, impl='triton') - m(ids)).abs().max().item())")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5
