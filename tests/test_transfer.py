"""The trained feature maps (``feature_map="learned"`` and ``"hedgehog"``) and attention transfer
(``calibrate.transfer``).

A learned map starts as elu + 1, a hedgehog map as the softmax of half the coordinates, both
signs; trained or not, each keeps the conversion's contract: every torch
path computes the same model, causally, exactly GPT-2 within the local window, and so do its
ONNX graphs. The transfer
stage trains only what the conversion added and lowers its loss; the dense weight matrix it
trains against is the op itself."""

import sys

import pytest
import torch

from bsbr_export.calibrate import CONVERSION_PARAMS, CalibrationLog, transfer, transfer_loss
from bsbr_export.convert import convert
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.ops.chunk import HedgehogFeature, LearnedFeature, bsbr_attention, num_chunks
from bsbr_export.ops.naive import bsbr_attention_reference, normalised_log_weights
from conftest import (ROOT, assert_causal_at, assert_close, assert_decode_matches, assert_ort_decode_matches,
                      op_inputs as shared_op_inputs, rand_ids)

L = 12  # not a power of two
LENGTHS = [1, L - 1, L + 1, 2 * L + 5, 4 * L + 3]
NORMALISED = dict(retrieval="normalised", feature_map="learned", retrieval_scale=0.5)


def perturb(model, seed=0, scale=0.3):
    """A trained map away from its start, as training leaves it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.h:
            for p in blk.attn.fm.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=[(w, fm) for fm in ("learned", "hedgehog") for w in ("chunk", "lookback")],
                ids=lambda p: "-".join(p))
def learned(request, tiny_hf_dir):
    window, fm = request.param
    return perturb(convert(tiny_hf_dir, chunk_size=L, local_window=window, **{**NORMALISED, "feature_map": fm}))


def op_inputs(T, seed):
    return shared_op_inputs(T, seed, L)


def test_untrained_learned_map_is_elu1(tiny_hf_dir):
    a = convert(tiny_hf_dir, chunk_size=L, **NORMALISED)
    b = convert(tiny_hf_dir, chunk_size=L, **{**NORMALISED, "feature_map": "elu1"})
    ids = rand_ids(3 * L + 1, 0)
    with torch.no_grad():
        assert_close(a(ids), b(ids), 1e-5, "learned at init vs elu1")
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(LearnedFeature(3, 8)(x), torch.nn.functional.elu(x) + 1)


def test_hedgehog_map_at_its_start(tiny_hf_dir):
    """Softmax of the first d/2 coordinates and of their negation: positive, each half sums to 1;
    the converted model holds that map in every layer and runs it through the op."""
    x = torch.randn(2, 3, 5, 8)
    f = HedgehogFeature(3, 8)(x)
    h = x[..., :4]
    assert torch.allclose(f, torch.cat([h.softmax(-1), (-h).softmax(-1)], -1), atol=1e-6)
    assert (f > 0).all() and torch.allclose(f.sum(-1), torch.full(f.shape[:-1], 2.0))
    m = convert(tiny_hf_dir, chunk_size=L, **{**NORMALISED, "feature_map": "hedgehog"})
    shape = (m.cfg.n_head, m.cfg.head_dim, m.cfg.head_dim // 2)
    assert all(isinstance(b.attn.fm, HedgehogFeature) and b.attn.fm.W.shape == shape for b in m.h)


def test_hedgehog_needs_an_even_head_dim():
    from bsbr_export.config import BSBRConfig
    from bsbr_export.errors import ConfigError

    with pytest.raises(ConfigError, match="even head dim"):
        BSBRConfig(vocab_size=10, n_positions=64, n_embd=9, n_layer=1, n_head=3, chunk_size=16,
                   **{**NORMALISED, "feature_map": "hedgehog"})


@pytest.mark.parametrize("T", LENGTHS)
def test_vectorised_matches_reference(learned, T):
    ids = rand_ids(T, T)
    with torch.no_grad():
        assert_close(learned(ids), learned(ids, impl="reference"), 2e-5, f"{learned.cfg.local_window} T={T}")


@pytest.mark.parametrize("t", [L - 1, L + 2, 3 * L])
def test_causal(learned, t):
    assert_causal_at(learned, t, 4 * L + 3, f"{learned.cfg.feature_map} {learned.cfg.local_window}")


def test_exact_within_the_local_window(learned, tiny_hf):
    n = (1 + learned.cfg.lookback) * L  # no retrieval before this many tokens, trained map or not
    ids = rand_ids(n, 1)
    with torch.no_grad():
        assert_close(learned(ids), tiny_hf(ids).logits, 5e-4, "learned vs HF")


@pytest.mark.parametrize("prompt", [1, L + 3])
def test_decode_matches_prefill(learned, prompt):
    assert_decode_matches(learned, rand_ids(3 * L + 2, prompt, B=1), prompt, 2e-5, 5e-5, learned.cfg.local_window)


@pytest.mark.parametrize("local_window", ["chunk", "lookback"])
@pytest.mark.parametrize("T", LENGTHS)
def test_weight_matrix_is_the_op(local_window, T):
    """exp(log w) @ v is the normalised op's output; rows sum to 1; no weight on the future."""
    q, k, v, r, h, g = op_inputs(T, T)
    for feat in ("elu1", perturb_map(LearnedFeature(3, 8)), perturb_map(HedgehogFeature(3, 8))):
        logw = normalised_log_weights(q, k, r, h, g, L, feat, local_window)
        with torch.no_grad():
            op = bsbr_attention(q, k, v, r, h, g, L, retrieval="normalised", feature_map=feat,
                                local_window=local_window)
        assert_close(logw.exp() @ v, op, 2e-5, f"{local_window} T={T}")
        w = logw.exp()
        assert_close(w.sum(-1), torch.ones(w.shape[:-1]), 1e-5, "rows")
        assert (w.triu(1) == 0).all()
    ref = bsbr_attention_reference(q, k, v, r, h, g, L, retrieval="normalised", feature_map="elu1",
                                   local_window=local_window)
    assert_close(normalised_log_weights(q, k, r, h, g, L, "elu1", local_window).exp() @ v, ref, 2e-5, "loops")


def perturb_map(fm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fm.W.add_(0.3 * torch.randn(fm.W.shape, generator=g))
    return fm


def test_weight_matrix_gradients_are_finite():
    q, k, v, r, h, g = op_inputs(2 * L + 5, 7)
    r.requires_grad_(True)
    logw = normalised_log_weights(q, k, r, h, g, L, "elu1")
    torch.where(torch.isfinite(logw), logw, torch.zeros_like(logw)).sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["weights", "output"])
@pytest.mark.parametrize("local_window", ["chunk", "lookback"])
def test_transfer_lowers_its_loss_and_moves_only_the_conversion(tiny_hf_dir, tiny_hf, loss, local_window):
    model = convert(tiny_hf_dir, chunk_size=L, local_window=local_window, **NORMALISED)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wins = [rand_ids(5 * L + 1, s, B=1) for s in range(4)]

    def hidden(x):
        return tiny_hf(input_ids=x, output_hidden_states=True).hidden_states

    def total(m):
        with torch.no_grad():
            return sum(transfer_loss(b, hs, loss) for x in wins for b, hs in zip(m.h, hidden(x))).item()

    l0 = total(model)
    passes = []
    log = transfer(model, hidden, wins, passes=5, loss=loss, lr=3e-3, after_pass=lambda k, m: passes.append(k))
    assert passes == list(range(1, 6)) and log.steps == 20 and log.tokens == 20 * (5 * L + 1)
    assert total(model) < 0.9 * l0, (l0, total(model))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n in before if any(k in n for k in CONVERSION_PARAMS)}
    assert moved and moved <= allowed, moved - allowed
    assert any(".fm." in n for n in moved)
    assert all((b.attn.g > 0).all() for b in model.h)
    assert all(p.requires_grad for p in model.parameters())  # left as it was found


def test_transfer_refuses_bad_input(tiny_hf_dir, tiny_hf):
    model = convert(tiny_hf_dir, chunk_size=L, **NORMALISED)
    hidden = lambda x: tiny_hf(input_ids=x, output_hidden_states=True).hidden_states  # noqa: E731
    with pytest.raises(ValueError, match="transfer loss must be one of"):
        transfer(model, hidden, [rand_ids(L, 0, B=1)], 1, loss="attention")
    compressed = convert(tiny_hf_dir, chunk_size=L, compression=2, **NORMALISED)
    with pytest.raises(ValueError, match="without compression"):
        transfer(compressed, hidden, [rand_ids(2 * L, 0, B=1)], 1, loss="weights", log=CalibrationLog())


def test_learned_map_survives_save_and_load(tmp_path, tiny_hf_dir):
    from bsbr_export.convert import load_bsbr, save_bsbr

    model = perturb(convert(tiny_hf_dir, chunk_size=L, **NORMALISED))
    save_bsbr(model, tmp_path / "m")
    back = load_bsbr(tmp_path / "m")
    ids = rand_ids(3 * L, 2)
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


@pytest.mark.parametrize("fp16", [False, True])
def test_exported_learned_map_equals_torch(learned, tmp_path, fp16):
    """A trained learned map through the ONNX graphs: prefill at lengths around the chunks, then
    decode step by step across chunk closes (extend, decode and close graphs), against torch."""
    from bsbr_export.runtime import ORTRunner

    T_max = 4 * L + 3
    export_onnx(learned, tmp_path, ExportSpec(max_seq_len=T_max, fp16=fp16))
    name = "model_fp16.onnx" if fp16 else "model.onnx"
    tol = 5e-2 if fp16 else 1e-4
    ids = rand_ids(T_max, 11).numpy()
    with torch.no_grad():
        full = learned(torch.from_numpy(ids))
    with ORTRunner(tmp_path / name) as r:
        for T in (L - 1, L + 1, 2 * L + 5, T_max):
            assert_close(torch.from_numpy(r.infer({"input_ids": ids[:, :T]})["logits"]).float(), full[:, :T], tol,
                         f"{learned.cfg.local_window} prefill T={T}")
    if not fp16:
        assert_ort_decode_matches(full, tmp_path, ids, L + 2, 1e-4, learned.cfg.local_window)


def test_study_run_specs():
    sys.path.insert(0, str(ROOT / "scripts"))
    from study_calibration import parse_run

    assert parse_run("normalised:conversion", 1024, 1024) == ("normalised", (None, "conversion"), 1024)
    assert parse_run("normalised, learned φ:weights+conversion", 1024, 1024) == (
        "normalised, learned φ", ("weights", "conversion"), 1024)
    assert parse_run("normalised:output", 512, 1024) == ("normalised", ("output", None), 512)
    assert parse_run("normalised:full:4096", 1024, 1024)[2] == 4096
    for bad in ("normalised:kl", "normalised:conversion+weights", "normalised:weights:4096", "nonesuch:full",
                "normalised"):
        with pytest.raises(SystemExit):
            parse_run(bad, 1024, 1024)


@pytest.mark.parametrize("weights", ["gate", "sum"])
def test_hedgehog_with_retrieval_weights_that_grow_through_onnx(tiny_hf_dir, tmp_path, weights):
    """The calibrated default of --calibrate self (look-back, hedgehog map, gate weights) and the sum
    weights: the loop reference, and the ONNX prefill and decode graphs, against the torch model."""
    from bsbr_export.runtime import ORTRunner

    m = perturb(convert(tiny_hf_dir, chunk_size=L, local_window="lookback", retrieval_weights=weights,
                        **{**NORMALISED, "feature_map": "hedgehog"}))
    T_max = 5 * L + 3
    ids = rand_ids(T_max, 5).numpy()
    with torch.no_grad():
        full = m(torch.from_numpy(ids))
        assert_close(m(torch.from_numpy(ids[:, :3 * L + 2]), impl="reference"), full[:, :3 * L + 2], 2e-5, "loops")
    export_onnx(m, tmp_path, ExportSpec(max_seq_len=T_max))
    with ORTRunner(tmp_path / "model.onnx") as r:
        for T in (2 * L + 1, 3 * L + 7, T_max):
            assert_close(torch.from_numpy(r.infer({"input_ids": ids[:, :T]})["logits"]), full[:, :T], 1e-4,
                         f"{weights} prefill T={T}")
    assert_ort_decode_matches(full, tmp_path, ids, L + 2, 1e-4, f"hedgehog {weights}")
