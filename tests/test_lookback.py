"""The look-back local window (``local_window="lookback"``): each token's softmax covers its own
chunk and the chunk before it, retrieval the chunks before that. Every torch path (loop reference,
vectorised prefill, streaming decode) computes the same model, causally; a sequence of up to two
chunks is exactly GPT-2 (absolute positions), and no longer one is."""

import math

import pytest
import torch

from bsbr_export.config import BSBRConfig
from bsbr_export.convert import convert
from bsbr_export.errors import ConfigError
from bsbr_export.ops.chunk import bsbr_attention, num_chunks, window_mask
from bsbr_export.ops.naive import bsbr_attention_reference
from bsbr_export.ops.state import K, V, StateSpec
from conftest import assert_causal_at, assert_close, assert_decode_matches, rand_ids

L = 20  # not a power of two
LENGTHS = [1, L - 1, L, L + 1, 2 * L + 3, 4 * L + 5]
VARIANTS = {
    "plain": dict(retrieval="plain", retrieval_scale=1.0),
    "local": dict(retrieval="plain", retrieval_scale=0.0),
    "normalised": dict(retrieval="normalised", feature_map="elu1", retrieval_scale=1.0),
}


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    return {(name, comp): convert(tiny_hf_dir, chunk_size=L, compression=comp, local_window="lookback", **opts)
            for name, opts in VARIANTS.items() for comp in (None, 4)}


def op_inputs(T, seed, B=2, H=3, d=16, dp=None):
    g = torch.Generator().manual_seed(seed)
    C = num_chunks(T, L)
    q, k, v = (0.5 * torch.randn(B, H, T, d, generator=g) for _ in range(3))
    r, h = (torch.randn(B, H, C, d, generator=g) for _ in range(2))
    gs = torch.rand(H, generator=g) + 0.5
    U = torch.linalg.qr(torch.randn(H, d, d, generator=g))[0][:, :, :dp].contiguous() if dp else None
    return q, k, v, r, h, gs, U


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("dp", [None, 4])
@pytest.mark.parametrize("mode", [("plain", "identity"), ("normalised", "elu1"), ("normalised", "relu")])
def test_op_vectorised_matches_reference(mode, dp, T):
    q, k, v, r, h, g, U = op_inputs(T, T, dp=dp)
    kw = dict(retrieval=mode[0], feature_map=mode[1], local_window="lookback")
    vec = bsbr_attention(q, k, v, r, h, g, L, U, **kw)
    ref = bsbr_attention_reference(q, k, v, r, h, g, L, U, **kw)
    assert vec.shape == q.shape
    assert_close(vec, ref, 1e-5, f"{mode} d'={dp} T={T}")


@pytest.mark.parametrize("T", [L + 1, 2 * L + 3, 4 * L + 5])
def test_op_local_term_is_softmax_over_own_and_previous_chunk(T):
    """With g = 0 only the local softmax is left: both paths equal a dense T x T softmax masked to
    {s <= t, chunk(s) >= chunk(t) - 1} (written here from the definition, independently)."""
    q, k, v, r, h, g, _ = op_inputs(T, 7 + T)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = (s <= t) & (s // L >= t // L - 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    dense = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()
    zero = torch.zeros_like(g)
    for retrieval, fm in (("plain", "identity"), ("normalised", "elu1")):
        for fn in (bsbr_attention, bsbr_attention_reference):
            out = fn(q, k, v, r, h, zero, L, retrieval=retrieval, feature_map=fm, local_window="lookback")
            assert_close(out, dense, 1e-5, f"{fn.__name__} {retrieval} T={T}")
    # ... and the default window is a different computation past the first chunk.
    chunk_only = bsbr_attention(q, k, v, r, h, zero, L)
    assert (chunk_only[:, :, L:] - dense[:, :, L:].float()).abs().max() > 1e-3


def test_op_retrieval_skips_the_previous_chunk():
    """Chunk i retrieves from chunks j < i - 1: changing chunk i - 1's keys/values changes chunk i
    only through its local softmax (plain form: the g-term of chunk i is unchanged)."""
    T = 4 * L
    q, k, v, r, h, g, _ = op_inputs(T, 3)
    base_all = bsbr_attention(q, k, v, r, h, g, L, local_window="lookback")
    base_loc = bsbr_attention(q, k, v, r, h, torch.zeros_like(g), L, local_window="lookback")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2 * L:3 * L] += 1.0  # chunk 2
    v2[:, :, 2 * L:3 * L] += 1.0
    all2 = bsbr_attention(q, k2, v2, r, h, g, L, local_window="lookback")
    loc2 = bsbr_attention(q, k2, v2, r, h, torch.zeros_like(g), L, local_window="lookback")
    retrieved, retrieved2 = base_all - base_loc, all2 - loc2  # the g q S term alone
    assert_close(retrieved2[:, :, 3 * L:], retrieved[:, :, 3 * L:], 1e-5, "chunk 3 retrieval")
    assert (all2[:, :, 3 * L:] - base_all[:, :, 3 * L:]).abs().max() > 1e-3  # through the local softmax


@pytest.mark.parametrize("T", LENGTHS)
def test_window_mask_shape_and_counts(T):
    """Each real query of the look-back mask sees min(t + 1, L + t mod L + 1) keys; the mask is
    (C, L, 2L): linear in T."""
    C = num_chunks(T, L)
    m = window_mask(C, L, 1)
    assert m.shape == (C, L, 2 * L)
    t = torch.arange(T)
    counts = m.reshape(C * L, 2 * L).sum(-1)[:T]
    expected = torch.where(t < L, t + 1, L + t % L + 1)
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("impl", ["reference", "vectorised"])
@pytest.mark.parametrize("t", [L - 1, L, 2 * L - 1, 2 * L, 3 * L + 2])
def test_op_is_causal(impl, t):
    T = 5 * L
    fn = bsbr_attention_reference if impl == "reference" else bsbr_attention
    q, k, v, r, h, g, _ = op_inputs(T, t, B=1)
    kw = dict(retrieval="normalised", feature_map="elu1", local_window="lookback")
    base = fn(q, k, v, r, h, g, L, **kw)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] += 5.0
    r2, h2 = r.clone(), h.clone()
    c = t // L
    h2[:, :, c + (1 if (t + 1) % L == 0 else 0):] += 5.0  # meta keys of chunks not yet complete
    r2[:, :, c + 1:] += 5.0  # meta queries built after t
    out = fn(q2, k2, v2, r2, h2, g, L, **kw)
    assert (out[:, :, :t + 1] - base[:, :, :t + 1]).abs().max() <= 1e-6
    assert (out[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-3


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_exact_vs_hf_up_to_two_chunks(models, tiny_hf, name, comp):
    model = models[(name, comp)]
    for T in (1, L - 1, L, L + 1, 2 * L - 1, 2 * L):
        ids = rand_ids(T, 100 + T)
        with torch.no_grad():
            assert_close(model(ids), tiny_hf(input_ids=ids).logits, 1e-4, f"{name} comp={comp} T={T}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_not_exact_past_two_chunks(models, tiny_hf, name):
    """The bound is tight: token 2L no longer sees chunk 0 by softmax."""
    model = models[(name, None)]
    ids = rand_ids(2 * L + 1, 5)
    with torch.no_grad():
        out, ref = model(ids), tiny_hf(input_ids=ids).logits
    assert_close(out[:, :2 * L], ref[:, :2 * L], 1e-4, "first two chunks")
    assert (out[:, 2 * L] - ref[:, 2 * L]).abs().max() > 1e-3


def test_exact_only_one_chunk_with_chunk_positions(tiny_hf_dir, tiny_hf):
    """With positions that restart every chunk, chunk 1 has other positions than GPT-2's."""
    model = convert(tiny_hf_dir, chunk_size=L, local_window="lookback", position_policy="chunk")
    ids = rand_ids(L + 3, 9)
    with torch.no_grad():
        out, ref = model(ids), tiny_hf(input_ids=ids).logits
    assert_close(out[:, :L], ref[:, :L], 1e-4, "chunk 0")
    assert (out[:, L:] - ref[:, L:]).abs().max() > 1e-3


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_reference_matches_vectorised(models, name, comp, T):
    model = models[(name, comp)]
    ids = rand_ids(T, T)
    with torch.no_grad():
        assert_close(model(ids), model(ids, impl="reference"), 1e-5, f"{name} comp={comp} T={T}")


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t", [L - 1, L, 2 * L - 1, 2 * L, 3 * L + 2])
def test_model_is_causal(models, name, t):
    assert_causal_at(models[(name, None)], t, 5 * L, name)


@pytest.mark.parametrize("prompt", [1, L - 1, L, L + 1, 2 * L, 2 * L + 3])
@pytest.mark.parametrize("comp", [None, 4])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_matches_full_forward(models, name, comp, prompt):
    """Prefill of any prompt, then one token at a time across several chunk closes: the logits of
    every position equal the full forward's."""
    model = models[(name, comp)]
    st = assert_decode_matches(model, rand_ids(4 * L + 5, prompt), prompt, 1e-5, 2e-5, name)
    assert st.k.shape[3] == 2 * L


def test_decode_state_after_prefill_equals_decoded_state(models):
    """The state a prefill of n tokens leaves equals the one n decode steps leave (for the rows
    and bank slots in use), so a server may mix the two."""
    model = models[("normalised", None)]
    ids = rand_ids(3 * L + 4, 11)
    T = ids.shape[1]
    with torch.no_grad():
        _, a = model.prefill(ids[:, :1], max_len=T)
        for t in range(1, T):
            model.decode_step(ids[:, t], a)
        _, b = model.prefill(ids, max_len=T)
    n_closed, n_cur = T // L, T % L
    for x, y, what in ((a.k, b.k, "k"), (a.v, b.v, "v")):
        assert_close(x[..., :L + n_cur, :], y[..., :L + n_cur, :], 1e-5, what)
    assert_close(a.S, b.S, 1e-5, "S")
    assert_close(a.bank_F[:, :, :, :n_closed], b.bank_F[:, :, :, :n_closed], 1e-5, "bank_F")
    assert_close(a.bank_h[:, :, :, :n_closed], b.bank_h[:, :, :, :n_closed], 1e-5, "bank_h")


def test_fused_runs_the_vectorised_path_on_cpu(models):
    """Without CUDA (and the interpreter) "fused" is the vectorised path; the kernel itself is
    tested under the interpreter in tests/test_lookback_export.py."""
    model = models[("normalised", None)]
    ids = rand_ids(2 * L + 3, 2)
    with torch.no_grad():
        assert torch.equal(model(ids, impl="fused"), model(ids))


# --------------------------------------------------------------------------- config and state


def test_config_switch():
    base = dict(vocab_size=10, n_positions=64, n_embd=8, n_layer=1, n_head=2, chunk_size=8)
    # The default conversion has the look-back window; a saved config without the key (written
    # before it existed) meant the chunk window.
    assert BSBRConfig(**base).local_window == "lookback" and BSBRConfig(**base).lookback == 1
    assert BSBRConfig(**base, local_window="chunk").lookback == 0
    legacy = {k: v for k, v in BSBRConfig(**base).to_dict().items() if k != "local_window"}
    assert BSBRConfig.from_dict(legacy).local_window == "chunk"
    cfg = BSBRConfig(**base, local_window="lookback")
    assert cfg.lookback == 1
    assert BSBRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="local window"):
        BSBRConfig(**base, local_window="two")


def test_state_spec_grows_by_one_chunk_of_kv_and_records_its_window():
    base = dict(vocab_size=10, n_positions=1024, n_embd=48, n_layer=3, n_head=4, chunk_size=16, retrieval_until="all")
    plain, look = (StateSpec.from_config(BSBRConfig(**base, local_window=w)) for w in ("chunk", "lookback"))
    # Where the retrieval stops at the 1024 positions (64 chunks), a bank keeps the chunks j < 64 - 1 - lookback.
    until = {w: StateSpec.from_config(BSBRConfig(**base | {"retrieval_until": "positions"}, local_window=w))
             for w in ("chunk", "lookback")}
    assert (until["chunk"].bank_limit, until["lookback"].bank_limit, look.bank_limit) == (63, 62, None)
    assert until["lookback"].bytes_at(8192) == until["lookback"].bytes_at(62 * 16) < look.bytes_at(8192)
    assert until["lookback"].bytes_at(100) == look.bytes_at(100)
    assert plain.window == 16 and look.window == 32
    assert plain.shape(K, 2, 5)[3] == 16 and look.shape(V, 2, 5)[3] == 32
    assert look.shape("state_bank_F", 2, 5) == plain.shape("state_bank_F", 2, 5)
    kv_chunk = 2 * 3 * 4 * 16 * 12 * 4  # k and v of one chunk, every layer and head, float32
    for ctx in (16, 100, 8192):
        assert look.bytes_at(ctx) - plain.bytes_at(ctx) == kv_chunk
    assert plain.to_dict()["dims"][K][3] == "chunk" and "lookback" not in plain.to_dict()["sizes"]
    assert plain.to_dict()["sizes"]["window"] == 16 and look.to_dict()["sizes"]["window"] == 32
    assert look.to_dict()["dims"][K][3] == "window" and look.to_dict()["format"] == plain.to_dict()["format"]


def test_bundled_model_exact_up_to_two_chunks(bundled_dir, bundled_hf):
    """The pretrained bundled GPT-2, chunk 128: a right-padded batch of up to 256 tokens gives the
    original's logits at every real token."""
    model = convert(bundled_dir, chunk_size=128, local_window="lookback")
    lengths = [256, 129, 1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 256), generator=g)
    mask = (torch.arange(256)[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = bundled_hf(input_ids=ids, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        assert_close(out[i, :n], ref[i, :n], 1e-4, f"row {i} len {n}")
