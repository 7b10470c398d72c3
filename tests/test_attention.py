"""The BSBR attention math: reference vs vectorised, causality, no T x T tensor."""

import pytest
import torch

from bsbr_export.ops.chunk import bsbr_attention, num_chunks
from bsbr_export.ops.naive import bsbr_attention_reference
from conftest import assert_close


def inputs(B, H, T, d, L, seed=0, dp=None):
    g = torch.Generator().manual_seed(seed)
    C = num_chunks(T, L)
    # Unit-scale activations; errors grow with |F| ~ sqrt(L) |k||v|.
    q, k, v = (0.5 * torch.randn(B, H, T, d, generator=g) for _ in range(3))
    r, h = (torch.randn(B, H, C, d, generator=g) for _ in range(2))
    gs = torch.rand(H, generator=g) + 0.5
    U = None
    if dp is not None:
        U = torch.linalg.qr(torch.randn(H, d, d, generator=g))[0][:, :, :dp].contiguous()
    return q, k, v, r, h, gs, U


@pytest.mark.parametrize("L", [16, 24])
@pytest.mark.parametrize("dp", [None, 4])
@pytest.mark.parametrize("mult", ["1", "L-1", "L", "L+1", "3L+5", "8L"])
def test_reference_matches_vectorised(L, dp, mult):
    T = {"1": 1, "L-1": L - 1, "L": L, "L+1": L + 1, "3L+5": 3 * L + 5, "8L": 8 * L}[mult]
    q, k, v, r, h, g, U = inputs(2, 3, T, 16, L, dp=dp)
    ref = bsbr_attention_reference(q, k, v, r, h, g, L, U)
    vec = bsbr_attention(q, k, v, r, h, g, L, U)
    assert vec.shape == (2, 3, T, 16)
    assert_close(vec, ref, 1e-5, f"T={T} L={L} d'={dp}")


@pytest.mark.parametrize("impl", ["reference", "vectorised"])
@pytest.mark.parametrize("t", [15, 16, 17, 31, 32, 40])
def test_attention_is_causal(impl, t):
    """Perturbing everything after t (including later chunks' meta vectors) leaves 0..t unchanged."""
    L, T = 16, 64
    fn = bsbr_attention_reference if impl == "reference" else bsbr_attention
    q, k, v, r, h, g, U = inputs(1, 2, T, 8, L)
    base = fn(q, k, v, r, h, g, L, U)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] += 5.0
    # Meta key of chunk j is built from last(j): chunks whose last token is > t may change;
    # meta query of chunk i is built from last(i-1).
    r2, h2 = r.clone(), h.clone()
    c = t // L
    h2[:, :, c + (1 if (t + 1) % L == 0 else 0):] += 5.0
    r2[:, :, c + 1:] += 5.0
    out = fn(q2, k2, v2, r2, h2, g, L, U)
    assert (out[:, :, :t + 1] - base[:, :, :t + 1]).abs().max() <= 1e-6
    assert (out[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-3  # the perturbation is real


def test_first_chunk_has_no_retrieval():
    L = 16
    q, k, v, r, h, g, U = inputs(1, 2, 40, 8, L)
    a = bsbr_attention(q, k, v, r, h, g, L)
    b = bsbr_attention(q, k, v, r, h, torch.zeros_like(g), L)
    assert (a[:, :, :L] - b[:, :, :L]).abs().max() == 0
    assert (a[:, :, L:] - b[:, :, L:]).abs().max() > 1e-3
