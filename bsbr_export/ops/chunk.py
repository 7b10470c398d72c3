"""BSBR attention for a whole sequence in PyTorch, vectorised over chunks (the prefill form).

Computes the definition in docs/bsbr-math.md for one layer, all heads:

    a_t  = causal softmax attention of q_t over the keys of its own chunk (with the look-back
           window, ``lookback = 1``: of its own chunk and the chunk before it)
    F_j  = sum_{s in chunk j} phi(k_s) v_s^T          phi(x) = feature(x) U  (U = I without compression)
    S_i  = sum_{j<i-lookback} p_ij F_j,   0 when no chunk qualifies; p_ij = softmax_j(r_i . h_j / sqrt(d))
           or another of ``weigh``'s retrieval weights (sum, decay, gate)
    plain:      o_t = a_t + g phi(q_t) S_{c(t)}
    normalised: o_t = (sum_s e^{q_t.k_s/sqrt d} v_s + g phi(q_t) S) / (sum_s e^{q_t.k_s/sqrt d} + g phi(q_t) . Z)

with z_j = sum_{s in chunk j} phi(k_s) and Z_i retrieved with the same weights as S_i. The
normaliser rides along as one extra, last column of every F and S (the state layout of
``ops.state``), so one retrieval serves both variants.

Inputs, per layer: q, k, v (B, H, T, d); r, h (B, H, C, d) meta queries (r[:, :, i] built from
the end of chunk i-1; r[:, :, 0] never used) and meta keys; g (H,); U (H, d, d') or None.

The pieces, each written once: ``feature`` / ``phi`` (the feature map), ``chunk_states``
(F_j with z_j), ``weigh`` (the retrieval weights p_ij), ``retrieve`` (S_i from earlier chunks), ``combine`` (the normalised
shared-denominator formula, also used by the one-token step), ``chunk_attention`` (the fused
op: ONNX function, Triton kernel and TensorRT plugin compute the same thing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import LOOKBACK_CHUNKS


def num_chunks(T: int, L: int) -> int:
    return -(-T // L)


def pad_to_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, C, L, d), zero rows after the last token."""
    B, H, T, d = x.shape
    C = num_chunks(T, L)
    x = F.pad(x, (0, 0, 0, C * L - T))
    return x.view(B, H, C, L, d)


def with_earlier(xc: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, C, L, d) -> (B, H, C, (n + 1) L, d): each chunk's rows preceded by the rows of the
    n chunks before it, oldest first (zero rows before chunk 0)."""
    if n == 0:
        return xc
    C = xc.shape[2]
    padded = F.pad(xc, (0, 0, 0, 0, n, 0))  # (B, H, n + C, L, d)
    return torch.cat([padded[:, :, m:m + C] for m in range(n + 1)], dim=3)


def window_mask(C: int, L: int, n: int, device=None, span: int | None = None) -> torch.Tensor:
    """Which keys of ``with_earlier(., n)`` each query of its chunk sees: (C, L, (n + 1) L) bool.

    Query row i of chunk c is token t = cL + i; key column j is token s = (c - n) L + j; the key
    is visible when 0 <= s <= t (causal, and not before the sequence), and with ``span`` also
    s > t - span (a sliding window of ``span`` tokens, t included). Rows of padding past the
    last token see only keys that are padding or earlier tokens: they are sliced off."""
    t = torch.arange(C * L, device=device).view(C, L, 1)
    s = ((torch.arange(C, device=device) - n) * L)[:, None] + torch.arange((n + 1) * L, device=device)
    s = s[:, None, :]  # (C, 1, (n + 1) L)
    visible = (s <= t) & (s >= 0)
    return visible if span is None else visible & (s > t - span)


def feature(x: torch.Tensor, name="identity") -> torch.Tensor:
    """The feature map before compression: identity, elu(x) + 1, relu(x), or a module with
    parameters (``LearnedFeature``), called on x."""
    if callable(name):
        return name(x)
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r}")


class LearnedFeature(torch.nn.Module):
    """phi(x) = elu(x W_h + b_h) + 1 per head h: W (H, d, d) starts as the identity and b (H, d)
    as zero, so an untrained map is elu(x) + 1. Positive, so the normalised denominator holds."""

    def __init__(self, n_head: int, head_dim: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.eye(head_dim).repeat(n_head, 1, 1))
        self.b = torch.nn.Parameter(torch.zeros(n_head, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, ..., d)
        b = self.b.view(self.b.shape[0], *([1] * (x.dim() - 3)), self.b.shape[1])
        return F.elu(torch.einsum("bh...d,hde->bh...e", x, self.W) + b) + 1.0


class HedgehogFeature(torch.nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h (Hedgehog's map): W (H, d, d/2) starts as
    the identity's first d/2 columns. Positive and d features wide, like the other maps."""

    def __init__(self, n_head: int, head_dim: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.eye(head_dim)[:, :head_dim // 2].repeat(n_head, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, ..., d)
        y = torch.einsum("bh...d,hde->bh...e", x, self.W)
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def phi(x: torch.Tensor, feature_map: str, U: torch.Tensor | None) -> torch.Tensor:
    """feature(x) U: (B, H, ..., d) -> (B, H, ..., d')."""
    f = feature(x, feature_map)
    return f if U is None else torch.einsum("bh...d,hde->bh...e", f, U)


def chunk_states(k, v, L: int, U, feature_map: str, normalised: bool) -> torch.Tensor:
    """F_j = phi(K_j)^T V_j for every chunk, with z_j = sum phi(K_j) as a last column when
    ``normalised``: (B, H, C, d', d [+ 1]). Padded rows count zero."""
    # phi before padding: phi(0) need not be 0 (elu1), padded rows must stay zero.
    kc = pad_to_chunks(phi(k, feature_map, U), L)  # (B, H, C, L, d')
    Fs = kc.transpose(-1, -2) @ pad_to_chunks(v, L)  # (B, H, C, d', d)
    if normalised:
        Fs = torch.cat([Fs, kc.sum(-2)[..., None]], -1)  # (B, H, C, d', d + 1)
    return Fs


def weigh(scores: torch.Tensor, allowed: torch.Tensor, age: torch.Tensor, weights: str = "softmax",
          decay: torch.Tensor | None = None) -> torch.Tensor:
    """The retrieval weights p_ij over the allowed chunks, 0 elsewhere (docs/bsbr-math.md):
    ``softmax`` of the scores (a row with no allowed chunk gives zeros), ``sum`` (ones),
    ``decay`` (decay_h ** age), ``gate`` (sigmoid of the scores).

    scores (B, H, ..., n) = r_i . h_j / sqrt(d); allowed and age (the chunks between j and the
    newest retrievable one, i - 1 - lookback - j) broadcastable to it; decay (H,)."""
    if weights == "softmax":
        # A row without any such chunk: softmax of all -inf is NaN, replaced by 0 (S = 0).
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if weights == "sum":
        p = torch.ones_like(scores)
    elif weights == "decay":
        lam = decay.to(scores.dtype).view(1, -1, *([1] * (scores.dim() - 2)))
        p = lam ** age.clamp_min(0).to(scores.dtype)  # (B, H, ..., n)
    elif weights == "gate":
        p = torch.sigmoid(scores)
    else:
        raise ValueError(f"unknown retrieval weights {weights!r}")
    return p * allowed


def retrieve(r: torch.Tensor, h: torch.Tensor, Fs: torch.Tensor, lookback: int = 0, weights: str = "softmax",
             decay: torch.Tensor | None = None, until: int | None = None) -> torch.Tensor:
    """S_i = sum_{j<i-lookback} p_ij F_j for every chunk: (B, H, C, d', dc), p_ij of ``weigh``
    (``softmax``: softmax_j(r_i . h_j / sqrt(d))); S_i = 0 for the first 1 + lookback chunks (the
    chunks the local window already covers are never retrieved) and for chunks i >= ``until``
    (``BSBRConfig.retrieving_chunks``; None: none such)."""
    B, H, C, d = r.shape
    scores = (r @ h.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, C)
    i = torch.arange(C, device=r.device)
    age = i[:, None] - 1 - lookback - i[None, :]  # (C, C): i - 1 - lookback - j
    allowed = age >= 0  # j < i - lookback
    if until is not None:
        allowed = allowed & (i[:, None] < until)
    p = weigh(scores, allowed, age, weights, decay)
    return (p @ Fs.flatten(-2)).view(Fs.shape)  # (B, H, C, d', dc)


def expand(SZ: torch.Tensor, U, normalised: bool):
    """Retrieved states (..., d', dc) -> (S_full (..., d, d), Z_full (..., d) or None): the
    normaliser column split off, both expanded by U."""
    S, Z = (SZ[..., :-1], SZ[..., -1]) if normalised else (SZ, None)
    if U is None:
        return S, Z
    S = torch.einsum("hde,bh...ef->bh...df", U, S)
    return S, (None if Z is None else torch.einsum("hde,bh...e->bh...d", U, Z))


def combine(scores, v, qf, S_full, Z_full, g) -> torch.Tensor:
    """The normalised output for masked local scores, in fp32:
    (e^LSE a + g qf S) / (e^LSE + g qf . Z), both sides scaled by e^-M, M = max(LSE, 0).

    scores (..., n_q, n_k) with -inf where masked; v (..., n_k, d); qf (..., n_q, d);
    S_full (..., d, d); Z_full (..., d); g broadcastable to (..., n_q, 1).
    """
    lse = torch.logsumexp(scores, -1, keepdim=True)  # (..., n_q, 1)
    local = torch.softmax(scores, -1) @ v  # (..., n_q, d)
    num = qf @ S_full  # (..., n_q, d)
    den = qf @ Z_full[..., None]  # (..., n_q, 1)
    m = lse.clamp_min(0.0)
    wa = torch.exp(lse - m)  # in (0, 1]
    wb = g * torch.exp(-m)
    return (wa * local + wb * num) / (wa + wb * den)


def chunk_attention(q, k, v, S_full, g, L: int, qf=None, Z_full=None, lookback: int = 0) -> torch.Tensor:
    """The fused op: local causal softmax per chunk plus the retrieved term.

    q, k, v: (B, H, T, d); S_full: (B, H, C, d, d); g: (H,) -> (B, H, T, d). Plain when
    ``Z_full`` is None (o = a + g q S_full); normalised with qf = feature(q) (B, H, T, d) and
    Z_full (B, H, C, d), computed in fp32. ``lookback``: earlier chunks whose keys the local
    softmax also covers (``with_earlier``). Scores are (B, H, C, L, (1 + lookback) L): linear in T.
    """
    B, H, T, d = q.shape
    n = lookback
    if Z_full is None:
        qc, kc, vc = (pad_to_chunks(t, L) for t in (q, k, v))  # (B, H, C, L, d)
        C = qc.shape[2]
        if n == 0:
            # SDPA on 4-D (B, H*C, L, d) so that its fused kernels apply.
            local = F.scaled_dot_product_attention(*(x.reshape(B, H * C, L, d) for x in (qc, kc, vc)),
                                                   is_causal=True).view(B, H, C, L, d)
        else:
            local = F.scaled_dot_product_attention(qc, with_earlier(kc, n), with_earlier(vc, n),
                                                   attn_mask=window_mask(C, L, n, q.device))
        o = local + g.to(q.dtype).view(1, H, 1, 1, 1) * (qc @ S_full.to(q.dtype))
        return o.view(B, H, -1, d)[:, :, :T]
    qc, kc, vc, qfc = (pad_to_chunks(t.float(), L) for t in (q, k, v, qf))  # (B, H, C, L, d)
    kc, vc = with_earlier(kc, n), with_earlier(vc, n)  # (B, H, C, (1 + n) L, d)
    scores = (qc @ kc.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, L, (1 + n) L)
    scores = scores.masked_fill(~window_mask(qc.shape[2], L, n, q.device), float("-inf"))
    o = combine(scores, vc, qfc, S_full.float(), Z_full.float(), g.float().view(1, H, 1, 1, 1))
    return o.view(B, H, -1, d)[:, :, :T].to(q.dtype)


def chunk_attention_normalised(q, k, v, qf, S_full, Z_full, g, L: int, lookback: int = 0) -> torch.Tensor:
    """``chunk_attention`` of the normalised variant, in the argument order of its ONNX function
    and Triton kernel (q, k, v, qf, S, Z, g)."""
    return chunk_attention(q, k, v, S_full, g, L, qf=qf, Z_full=Z_full, lookback=lookback)


def bsbr_attention(q, k, v, r, h, g, L: int, U=None, fused=None, retrieval: str = "plain",
                   feature_map: str = "identity", local_window: str = "chunk", retrieval_weights: str = "softmax",
                   decay=None, retrieving_chunks: int | None = None) -> torch.Tensor:
    """Vectorised BSBR attention; ``fused`` may replace the last step (the Triton kernel, called
    with the ONNX function's arguments, and ``lookback=1`` with the look-back window).
    ``retrieval_weights`` and ``decay`` (H,): the retrieval's weights (``weigh``); chunks i >=
    ``retrieving_chunks`` retrieve nothing (``retrieve``'s ``until``)."""
    norm = retrieval == "normalised"
    n = LOOKBACK_CHUNKS[local_window]
    SZ = retrieve(r, h, chunk_states(k, v, L, U, feature_map, norm), n, retrieval_weights, decay,
                  retrieving_chunks)  # (B, H, C, d', dc)
    S_full, Z_full = expand(SZ, U, norm)
    window = {"lookback": n} if n else {}
    if not norm:
        return (fused or chunk_attention)(q, k, v, S_full, g, L, **window)
    return (fused or chunk_attention_normalised)(q, k, v, feature(q, feature_map), S_full, Z_full, g, L, **window)
