"""BSBR attention for one layer, all heads: the reference and the vectorised path.

Both compute the definition in the project's design note (bsbr-math):

    a_t  = causal softmax attention of q_t over the keys of its own chunk
    F_j  = sum_{s in chunk j} phi(k_s) v_s^T          phi(k) = k U  (U = I without compression)
    S_i  = sum_{j<i} softmax_j(r_i . h_j / sqrt(d)) F_j,   S_0 = 0
    o_t  = a_t + g * phi(q_t) S_{c(t)}

Inputs, per layer:
    q, k, v : (B, H, T, d)
    r, h    : (B, H, C, d)   meta query of chunk i (built from the end of chunk i-1;
                             r[:, :, 0] is never used) and meta key of chunk j
    g       : (H,)           retrieval scale
    U       : (H, d, d') or None   state compression basis (orthonormal columns)

The split into ``chunk_states`` -> ``retrieve`` -> ``chunk_attention`` is the one
every backend shares: the last step is the fused op (ONNX function
``bsbr::ChunkAttention``, Triton kernel, TensorRT plugin); it receives the expanded
retrieved state ``S_full = U S`` of shape (B, H, C, d, d).

The ``normalised`` retrieval (config ``retrieval="normalised"``) shares one softmax
denominator between the local and the retrieved term, with a positive feature map
phi = feature(.) U:

    z_j  = sum_{s in chunk j} phi(k_s)                      (d',)
    Z_i  = sum_{j<i} p_ij z_j                                (same p_ij as S_i)
    LSE_t = log sum_{s in chunk, s<=t} exp(q_t.k_s / sqrt(d))
    w_t  = g * exp(-LSE_t)
    o_t  = (a_t + w_t * feature(q_t) S_full) / (1 + w_t * feature(q_t) . Z_full)

i.e. o_t = (sum_s e^{score} v_s + g phi(q_t) S) / (sum_s e^{score} + g phi(q_t) Z). Its
fused op is ``chunk_attention_normalised(q, k, v, qf, S_full, Z_full, g, L)`` with
qf = feature(q) (ONNX function ``bsbr::ChunkAttentionNormalised``, the same Triton kernel
with NORMALISED set); the plain op is untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def num_chunks(T: int, L: int) -> int:
    return -(-T // L)


def _pad_to_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
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


def chunk_states(k: torch.Tensor, v: torch.Tensor, L: int, U: torch.Tensor | None,
                 feature_map: str = "identity") -> torch.Tensor:
    """F_j = phi(K_j)^T V_j for every chunk: (B, H, C, d', d). Padded rows are zero."""
    # phi before padding: phi(0) need not be 0 (elu1), padded rows must stay zero.
    kc = _pad_to_chunks(feature(k, feature_map), L)  # (B, H, C, L, d)
    vc = _pad_to_chunks(v, L)  # (B, H, C, L, d)
    if U is not None:
        kc = torch.einsum("bhcld,hde->bhcle", kc, U)  # (B, H, C, L, d')
    return kc.transpose(-1, -2) @ vc  # (B, H, C, d', d)


def chunk_normalisers(k: torch.Tensor, L: int, U: torch.Tensor | None, feature_map: str) -> torch.Tensor:
    """z_j = sum_{s in chunk j} phi(k_s) for every chunk: (B, H, C, d'). Padded rows count zero."""
    kc = _pad_to_chunks(feature(k, feature_map), L).sum(-2)  # (B, H, C, d)
    if U is not None:
        kc = torch.einsum("bhcd,hde->bhce", kc, U)  # (B, H, C, d')
    return kc


def retrieve(r: torch.Tensor, h: torch.Tensor, Fs: torch.Tensor) -> torch.Tensor:
    """S_i = sum_{j<i} softmax_j(r_i . h_j / sqrt(d)) F_j: (B, H, C, d', d); S_0 = 0."""
    B, H, C, d = r.shape
    scores = (r @ h.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, C)
    earlier = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)  # j < i
    scores = scores.masked_fill(~earlier, float("-inf"))
    # Row 0 has no earlier chunk: softmax of all -inf is NaN, replaced by 0 (S_0 = 0).
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, C, C)
    return (p @ Fs.flatten(-2)).view(Fs.shape)  # (B, H, C, d', d)


def expand_states(S: torch.Tensor, U: torch.Tensor | None) -> torch.Tensor:
    """Compressed states back to (B, H, C, d, d): S_full = U S."""
    if U is None:
        return S
    return torch.einsum("hde,bhcef->bhcdf", U, S)


def chunk_attention(q, k, v, S_full, g, L: int) -> torch.Tensor:
    """The fused op, vectorised in PyTorch: local causal softmax per chunk + g * q S_full.

    q, k, v: (B, H, T, d); S_full: (B, H, C, d, d); g: (H,) -> (B, H, T, d).
    Scores are (B, H, C, L, L): linear in T, never T x T.
    """
    B, H, T, d = q.shape
    qc, kc, vc = (_pad_to_chunks(t, L) for t in (q, k, v))  # (B, H, C, L, d)
    C = qc.shape[2]
    # SDPA on 4-D (B, H*C, L, d) so that its fused kernels apply.
    local = F.scaled_dot_product_attention(*(x.reshape(B, H * C, L, d) for x in (qc, kc, vc)),
                                           is_causal=True).view(B, H, C, L, d)
    ret = qc @ S_full.to(q.dtype)  # (B, H, C, L, d)
    o = local + g.to(q.dtype).view(1, H, 1, 1, 1) * ret
    return o.view(B, H, -1, d)[:, :, :T]


def normalised_combine(scores, v, qf, S_full, Z_full, g) -> torch.Tensor:
    """(e^LSE a + g qf S) / (e^LSE + g qf . Z) for masked local scores.

    scores (..., n_q, n_k) with -inf where masked; v (..., n_k, d); qf (..., n_q, d);
    S_full (..., d, d); Z_full (..., d); g broadcastable to (..., n_q, 1).
    Both sides are scaled by e^-M, M = max(LSE, 0), so nothing overflows.
    """
    lse = torch.logsumexp(scores, -1, keepdim=True)  # (..., n_q, 1)
    local = torch.softmax(scores, -1) @ v  # (..., n_q, d)
    num = qf @ S_full  # (..., n_q, d)
    den = qf @ Z_full[..., None]  # (..., n_q, 1)
    m = lse.clamp_min(0.0)
    wa = torch.exp(lse - m)  # in (0, 1]
    wb = g * torch.exp(-m)
    return (wa * local + wb * num) / (wa + wb * den)


def chunk_attention_normalised(q, k, v, qf, S_full, Z_full, g, L: int) -> torch.Tensor:
    """The normalised op: local softmax and retrieval share one denominator.

    q, k, v, qf: (B, H, T, d) (qf = feature(q)); S_full: (B, H, C, d, d);
    Z_full: (B, H, C, d); g: (H,) >= 0 -> (B, H, T, d).
    o = (a + w qf S_full) / (1 + w qf . Z_full), w = g exp(-LSE_local); computed in fp32 as
    (e^{LSE-M} a + g e^{-M} qf S_full) / (e^{LSE-M} + g e^{-M} qf . Z_full), M = max(LSE, 0).
    """
    B, H, T, d = q.shape
    out_dtype = q.dtype
    qc, kc, vc, qfc = (_pad_to_chunks(t.float(), L) for t in (q, k, v, qf))  # (B, H, C, L, d)
    scores = (qc @ kc.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    gv = g.float().view(1, H, 1, 1, 1)
    o = normalised_combine(scores, vc, qfc, S_full.float(), Z_full.float(), gv)  # (B, H, C, L, d)
    return o.view(B, H, -1, d)[:, :, :T].to(out_dtype)


def retrieved_states(k, v, r, h, L: int, U=None, retrieval: str = "plain", feature_map: str = "identity"):
    """(S_full, Z_full or None): the expanded retrieved state of every chunk."""
    Fs = chunk_states(k, v, L, U, feature_map)  # (B, H, C, d', d)
    if retrieval == "plain":
        return expand_states(retrieve(r, h, Fs), U), None
    z = chunk_normalisers(k, L, U, feature_map)  # (B, H, C, d')
    # One retrieval for both: z rides along as an extra column of F.
    SZ = retrieve(r, h, torch.cat([Fs, z[..., None]], -1))  # (B, H, C, d', d + 1)
    S, Z = SZ[..., :-1], SZ[..., -1:]
    return expand_states(S, U), expand_states(Z, U)[..., 0]


def bsbr_attention(q, k, v, r, h, g, L: int, U=None, fused=None, retrieval: str = "plain",
                   feature_map: str = "identity") -> torch.Tensor:
    """Vectorised BSBR attention; ``fused`` may replace the last step (e.g. the Triton kernel)."""
    S_full, Z_full = retrieved_states(k, v, r, h, L, U, retrieval, feature_map)
    if retrieval == "plain":
        op = fused or chunk_attention
        return op(q, k, v, S_full, g, L)
    op = fused or chunk_attention_normalised
    return op(q, k, v, feature(q, feature_map), S_full, Z_full, g, L)


@torch.no_grad()
def bsbr_attention_reference(q, k, v, r, h, g, L: int, U=None, retrieval: str = "plain",
                             feature_map: str = "identity") -> torch.Tensor:
    """Plain loops over chunks and tokens, fp32: slow and obviously correct."""
    out_dtype = q.dtype
    q, k, v, r, h, g = (t.float() for t in (q, k, v, r, h, g))
    U = U.float() if U is not None else None
    B, H, T, d = q.shape
    C = num_chunks(T, L)
    scale = 1.0 / math.sqrt(d)
    fm = lambda x: feature(x, feature_map)  # noqa: E731
    phi = fm if U is None else (lambda x: torch.einsum("bh...d,hde->bh...e", fm(x), U))
    o = torch.zeros_like(q)
    bank, zbank = [], []  # F_j (B, H, d', d) and z_j (B, H, d') of completed chunks
    for i in range(C):
        lo, hi = i * L, min((i + 1) * L, T)
        # Retrieved state for chunk i, from chunks j < i only.
        if i == 0:
            dp = phi(q[:, :, :1]).shape[-1]
            S, Z = torch.zeros(B, H, dp, d), torch.zeros(B, H, dp)
        else:
            w = torch.stack([(r[:, :, i] * h[:, :, j]).sum(-1) * scale for j in range(i)], -1)  # (B, H, i)
            p = torch.softmax(w, -1)
            S = sum(p[:, :, j, None, None] * bank[j] for j in range(i))
            Z = sum(p[:, :, j, None] * zbank[j] for j in range(i))
        for t in range(lo, hi):
            s = (q[:, :, t, None, :] * k[:, :, lo:t + 1]).sum(-1) * scale  # (B, H, t-lo+1)
            a = (torch.softmax(s, -1)[..., None] * v[:, :, lo:t + 1]).sum(-2)  # (B, H, d)
            pq = phi(q[:, :, t])  # (B, H, d')
            ret = (pq[..., None] * S).sum(-2)  # (B, H, d)
            if retrieval == "plain":
                o[:, :, t] = a + g.view(1, H, 1) * ret
            else:
                # Shared denominator: sum_s e^s v_s + g ret over sum_s e^s + g pq.Z
                e = torch.exp(s.double())  # (B, H, n), fp64: no max subtraction needed
                gg = g.double().view(1, H, 1)
                num = (e[..., None] * v[:, :, lo:t + 1].double()).sum(-2) + gg * ret.double()
                den = e.sum(-1, keepdim=True) + gg * (pq * Z).double().sum(-1, keepdim=True)
                o[:, :, t] = (num / den).float()
        kk = phi(k[:, :, lo:hi])  # (B, H, n, d')
        bank.append(kk.transpose(-1, -2) @ v[:, :, lo:hi])  # (B, H, d', d)
        zbank.append(kk.sum(-2))  # (B, H, d')
    return o.to(out_dtype)
