"""BSBR attention for a whole sequence in PyTorch, vectorised over chunks (the prefill form).

Computes the definition in docs/bsbr-math.md for one layer, all heads:

    a_t  = causal softmax attention of q_t over the keys of its own chunk
    F_j  = sum_{s in chunk j} phi(k_s) v_s^T          phi(x) = feature(x) U  (U = I without compression)
    S_i  = sum_{j<i} softmax_j(r_i . h_j / sqrt(d)) F_j,   S_0 = 0
    plain:      o_t = a_t + g phi(q_t) S_{c(t)}
    normalised: o_t = (sum_s e^{q_t.k_s/sqrt d} v_s + g phi(q_t) S) / (sum_s e^{q_t.k_s/sqrt d} + g phi(q_t) . Z)

with z_j = sum_{s in chunk j} phi(k_s) and Z_i retrieved with the same weights as S_i. The
normaliser rides along as one extra, last column of every F and S (the state layout of
``ops.state``), so one retrieval serves both variants.

Inputs, per layer: q, k, v (B, H, T, d); r, h (B, H, C, d) meta queries (r[:, :, i] built from
the end of chunk i-1; r[:, :, 0] never used) and meta keys; g (H,); U (H, d, d') or None.

The pieces, each written once: ``feature`` / ``phi`` (the feature map), ``chunk_states``
(F_j with z_j), ``retrieve`` (S_i from earlier chunks), ``combine`` (the normalised
shared-denominator formula, also used by the one-token step), ``chunk_attention`` (the fused
op: ONNX function, Triton kernel and TensorRT plugin compute the same thing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def num_chunks(T: int, L: int) -> int:
    return -(-T // L)


def pad_to_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, C, L, d), zero rows after the last token."""
    B, H, T, d = x.shape
    C = num_chunks(T, L)
    x = F.pad(x, (0, 0, 0, C * L - T))
    return x.view(B, H, C, L, d)


def feature(x: torch.Tensor, name: str = "identity") -> torch.Tensor:
    """The elementwise feature map before compression: identity, elu(x) + 1, or relu(x)."""
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r}")


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


def retrieve(r: torch.Tensor, h: torch.Tensor, Fs: torch.Tensor) -> torch.Tensor:
    """S_i = sum_{j<i} softmax_j(r_i . h_j / sqrt(d)) F_j for every chunk: (B, H, C, d', dc); S_0 = 0."""
    B, H, C, d = r.shape
    scores = (r @ h.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, C)
    earlier = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)  # j < i
    scores = scores.masked_fill(~earlier, float("-inf"))
    # Row 0 has no earlier chunk: softmax of all -inf is NaN, replaced by 0 (S_0 = 0).
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, C, C)
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


def chunk_attention(q, k, v, S_full, g, L: int, qf=None, Z_full=None) -> torch.Tensor:
    """The fused op: local causal softmax per chunk plus the retrieved term.

    q, k, v: (B, H, T, d); S_full: (B, H, C, d, d); g: (H,) -> (B, H, T, d). Plain when
    ``Z_full`` is None (o = a + g q S_full); normalised with qf = feature(q) (B, H, T, d) and
    Z_full (B, H, C, d), computed in fp32. Scores are (B, H, C, L, L): linear in T.
    """
    B, H, T, d = q.shape
    if Z_full is None:
        qc, kc, vc = (pad_to_chunks(t, L) for t in (q, k, v))  # (B, H, C, L, d)
        C = qc.shape[2]
        # SDPA on 4-D (B, H*C, L, d) so that its fused kernels apply.
        local = F.scaled_dot_product_attention(*(x.reshape(B, H * C, L, d) for x in (qc, kc, vc)),
                                               is_causal=True).view(B, H, C, L, d)
        o = local + g.to(q.dtype).view(1, H, 1, 1, 1) * (qc @ S_full.to(q.dtype))
        return o.view(B, H, -1, d)[:, :, :T]
    qc, kc, vc, qfc = (pad_to_chunks(t.float(), L) for t in (q, k, v, qf))  # (B, H, C, L, d)
    scores = (qc @ kc.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    o = combine(scores, vc, qfc, S_full.float(), Z_full.float(), g.float().view(1, H, 1, 1, 1))
    return o.view(B, H, -1, d)[:, :, :T].to(q.dtype)


def chunk_attention_normalised(q, k, v, qf, S_full, Z_full, g, L: int) -> torch.Tensor:
    """``chunk_attention`` of the normalised variant, in the argument order of its ONNX function
    and Triton kernel (q, k, v, qf, S, Z, g)."""
    return chunk_attention(q, k, v, S_full, g, L, qf=qf, Z_full=Z_full)


def bsbr_attention(q, k, v, r, h, g, L: int, U=None, fused=None, retrieval: str = "plain",
                   feature_map: str = "identity") -> torch.Tensor:
    """Vectorised BSBR attention; ``fused`` may replace the last step (the Triton kernel, called
    with the ONNX function's arguments)."""
    norm = retrieval == "normalised"
    SZ = retrieve(r, h, chunk_states(k, v, L, U, feature_map, norm))  # (B, H, C, d', dc)
    S_full, Z_full = expand(SZ, U, norm)
    if not norm:
        return (fused or chunk_attention)(q, k, v, S_full, g, L)
    return (fused or chunk_attention_normalised)(q, k, v, feature(q, feature_map), S_full, Z_full, g, L)
