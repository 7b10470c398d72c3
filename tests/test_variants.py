"""Retrieval variants (plain, block-local g = 0, normalised): every path computes the same
model, causally, exactly GPT-2 within one chunk, and streaming decode equals the full forward."""

import pytest
import torch

from bsbr_export.ops.chunk import bsbr_attention
from bsbr_export.ops.naive import bsbr_attention_reference
from bsbr_export.config import BSBRConfig
from bsbr_export.convert import convert
from bsbr_export.errors import ConfigError
from conftest import assert_causal_at, assert_close, assert_decode_matches, rand_ids

L = 20  # not a power of two
VARIANTS = {
    "plain": dict(retrieval="plain", retrieval_scale=1.0),
    "local": dict(retrieval="plain", retrieval_scale=0.0),
    "normalised": dict(retrieval="normalised", feature_map="elu1", retrieval_scale=1.0),
    "normalised-relu": dict(retrieval="normalised", feature_map="relu", retrieval_scale=0.5),
}


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    return {(name, comp): convert(tiny_hf_dir, chunk_size=L, compression=comp, **opts)
            for name, opts in VARIANTS.items() for comp in (None, 4)}


@pytest.mark.parametrize("T", [1, L - 1, L, L + 1, 3 * L + 5])
@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_matches_vectorised(models, name, comp, T):
    model = models[(name, comp)]
    ids = rand_ids(T, T)
    with torch.no_grad():
        assert_close(model(ids), model(ids, impl="reference"), 1e-5, f"{name} comp={comp} T={T}")


@pytest.mark.parametrize("comp", [None, 4])
def test_attention_op_reference_matches_vectorised_random_inputs(comp):
    """The op alone on random q/k/v/meta with large scores: normalised reference == vectorised."""
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 3 * L + 5, 16
    C = -(-T // L)
    q, k, v = (torch.randn(B, H, T, d, generator=g) * 2 for _ in range(3))
    r, h = (torch.randn(B, H, C, d, generator=g) for _ in range(2))
    gs = torch.rand(H, generator=g) * 2
    U = torch.linalg.qr(torch.randn(H, d, d, generator=g))[0][:, :, :d // comp] if comp else None
    a = bsbr_attention(q, k, v, r, h, gs, L, U, retrieval="normalised", feature_map="elu1")
    b = bsbr_attention_reference(q, k, v, r, h, gs, L, U, retrieval="normalised", feature_map="elu1")
    # Outputs reach ~8 here: float32 rounding of the two summation orders is ~2e-6 of that
    # (1.4e-5 with compression on this machine's AVX-512 torch build), hence the relative term.
    assert_close(a, b, 1e-5, f"op comp={comp}", rtol=4e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t", [L - 2, L - 1, L, 2 * L - 1, 2 * L, 2 * L + 2])
def test_causal_around_chunk_boundaries(models, name, t):
    assert_causal_at(models[(name, None)], t, 4 * L, name)


@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_exact_vs_hf_within_one_chunk(models, tiny_hf, name, comp):
    model = models[(name, comp)]
    for T in (1, L - 1, L):
        ids = rand_ids(T, 100 + T)
        with torch.no_grad():
            assert_close(model(ids), tiny_hf(input_ids=ids).logits, 1e-4, f"{name} T={T}")


@pytest.mark.parametrize("prompt", [1, L - 1, L, L + 1, 2 * L + 3])
@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", ["normalised", "local", "normalised-relu"])
def test_decode_matches_full_forward(models, name, comp, prompt):
    model = models[(name, comp)]
    assert_decode_matches(model, rand_ids(4 * L + 3, prompt), prompt, 1e-5, 2e-5, name)


def test_local_variant_equals_plain_without_retrieval(models):
    ids = rand_ids(3 * L + 5, 7)
    with torch.no_grad():
        a = models[("local", None)](ids)
        b = models[("normalised", None)]
        # normalised with g = 0 is block-local attention too
        with torch.no_grad():
            for blk in b.h:
                blk.attn.g.zero_()
        c = b(ids)
        for blk in b.h:
            blk.attn.g.fill_(1.0)
    assert_close(a, c, 1e-5, "local == normalised(g=0)")


def test_variant_options_are_validated():
    base = dict(vocab_size=10, n_positions=64, n_embd=8, n_layer=1, n_head=2, chunk_size=8)
    with pytest.raises(ConfigError, match="retrieval"):
        BSBRConfig(**base, retrieval="fancy")
    with pytest.raises(ConfigError, match="feature map"):
        BSBRConfig(**base, retrieval="normalised", feature_map="identity")
    with pytest.raises(ConfigError, match="identity"):
        BSBRConfig(**base, retrieval="plain", feature_map="elu1")
    with pytest.raises(ConfigError, match="retrieval_scale"):
        BSBRConfig(**base, retrieval="normalised", feature_map="elu1", retrieval_scale=-1.0)
    cfg = BSBRConfig(**base, retrieval="normalised", feature_map="elu1")
    assert BSBRConfig.from_dict(cfg.to_dict()) == cfg

