"""The baselines (ops/baselines.py): sliding-window attention and sinks + window over the original
GPT-2 weights. The vectorised form equals its loop reference and a dense masked softmax written
from the definition; a sequence of at most window + sinks tokens is exactly GPT-2; causal."""

import math

import pytest
import torch

from bsbr_export.convert import convert
from bsbr_export.ops.baselines import WindowAttention, baseline_mask, window_attention
from bsbr_export.ops.chunk import num_chunks
from bsbr_export.ops.naive import window_attention_reference
from bsbr_export.ops.state import kv_cache_bytes
from conftest import assert_close

W = 12  # not a power of two
LENGTHS = [1, 3, W - 1, W, W + 1, 2 * W + 3, 4 * W + 5]


def qkv(T, seed, B=2, H=3, d=16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g) for _ in range(3))


def dense(q, k, v, window, sinks):
    """Full T x T softmax, masked to {s <= t and (s > t - window or s < sinks)}, fp64."""
    T = q.shape[2]
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (s <= t) & ((s > t - window) | (s < sinks))
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("sinks", [0, 4])
def test_vectorised_matches_reference_and_dense(sinks, T):
    q, k, v = qkv(T, T + sinks)
    out = window_attention(q, k, v, W, sinks)
    assert out.shape == q.shape
    assert_close(out, window_attention_reference(q, k, v, W, sinks), 1e-5, f"reference sinks={sinks} T={T}")
    assert_close(out, dense(q, k, v, W, sinks), 1e-5, f"dense sinks={sinks} T={T}")


def test_window_one_is_the_value_itself_and_wide_window_is_full_attention():
    q, k, v = qkv(2 * W + 3, 1)
    assert_close(window_attention(q, k, v, 1), v, 1e-6, "window 1")
    T = q.shape[2]
    assert_close(window_attention(q, k, v, T), dense(q, k, v, T, 0), 1e-5, "window >= T")


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("sinks", [0, 4])
def test_mask_shape_and_counts(sinks, T):
    """(C, W, sinks + 2W) whatever T; query t sees min(t + 1, W) window keys plus the sinks the
    window has passed: min(sinks, t + 1 - W) when t >= W."""
    C = num_chunks(T, W)
    m = baseline_mask(C, W, sinks)
    assert m.shape == (C, W, sinks + 2 * W)
    t = torch.arange(T)
    counts = m.reshape(C * W, -1).sum(-1)[:T]
    expected = torch.clamp(t + 1, max=W) + torch.clamp(t + 1 - W, min=0, max=sinks)
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("sinks", [0, 4])
def test_model_exact_vs_hf_within_window_and_sinks(tiny_hf_dir, tiny_hf, sinks):
    model = convert(tiny_hf_dir, chunk_size=W)
    base = WindowAttention(W, sinks)
    assert base.exact_up_to == W + sinks
    g = torch.Generator().manual_seed(sinks)
    for T in (1, W - 1, W, W + sinks):
        ids = torch.randint(0, 101, (2, T), generator=g)
        with torch.no_grad():
            assert_close(model(ids, impl=base), tiny_hf(input_ids=ids).logits, 1e-4, f"{base.name} T={T}")
    # One token more and the first key drops out of the last token's view.
    ids = torch.randint(0, 101, (2, W + sinks + 1), generator=g)
    with torch.no_grad():
        out, ref = model(ids, impl=base), tiny_hf(input_ids=ids).logits
    assert_close(out[:, :-1], ref[:, :-1], 1e-4, "all but the last")
    assert (out[:, -1] - ref[:, -1]).abs().max() > 1e-3


def test_model_baseline_ignores_the_conversion_options(tiny_hf_dir):
    """A baseline runs the original weights only: the retrieval options of the conversion it
    borrows do not change it."""
    ids = torch.randint(0, 101, (1, 3 * W + 2), generator=torch.Generator().manual_seed(4))
    base = WindowAttention(W, 4)
    with torch.no_grad():
        a = convert(tiny_hf_dir, chunk_size=W, retrieval="plain", retrieval_scale=1.0)(ids, impl=base)
        b = convert(tiny_hf_dir, chunk_size=W, retrieval="normalised", compression=4)(ids, impl=base)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("t", [W - 1, W, W + 3, 2 * W + 1])
def test_model_is_causal(tiny_hf_dir, sinks, t):
    model = convert(tiny_hf_dir, chunk_size=W)
    base = WindowAttention(W, sinks)
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 101, (1, 4 * W), generator=g)
    ids2 = ids.clone()
    ids2[0, t + 1:] = torch.randint(0, 101, (4 * W - t - 1,), generator=g)
    with torch.no_grad():
        a, b = model(ids, impl=base), model(ids2, impl=base)
    assert (a[0, :t + 1] - b[0, :t + 1]).abs().max() <= 1e-6
    assert (a[0, t + 1:] - b[0, t + 1:]).abs().max() > 1e-4


def test_window_attention_options_and_state_bytes():
    with pytest.raises(ValueError):
        WindowAttention(0)
    with pytest.raises(ValueError):
        WindowAttention(8, -1)
    with pytest.raises(ValueError):
        WindowAttention(True)
    assert WindowAttention(128).name == "window 128" and WindowAttention(128, 4).name == "sinks 4 + window 128"
    b = WindowAttention(128, 4)
    assert b.state_bytes(12, 768, 8192) == kv_cache_bytes(12, 768, 132)
    assert b.state_bytes(12, 768, 100) == kv_cache_bytes(12, 768, 100)  # not yet full
    assert WindowAttention(256).state_bytes(12, 768, 8192) == 2 * WindowAttention(128).state_bytes(12, 768, 8192)
