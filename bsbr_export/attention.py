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


def chunk_states(k: torch.Tensor, v: torch.Tensor, L: int, U: torch.Tensor | None) -> torch.Tensor:
    """F_j = phi(K_j)^T V_j for every chunk: (B, H, C, d', d). Padded rows are zero."""
    kc = _pad_to_chunks(k, L)  # (B, H, C, L, d)
    vc = _pad_to_chunks(v, L)  # (B, H, C, L, d)
    if U is not None:
        kc = torch.einsum("bhcld,hde->bhcle", kc, U)  # (B, H, C, L, d')
    return kc.transpose(-1, -2) @ vc  # (B, H, C, d', d)


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


def bsbr_attention(q, k, v, r, h, g, L: int, U=None, fused=None) -> torch.Tensor:
    """Vectorised BSBR attention; ``fused`` may replace the last step (e.g. the Triton kernel)."""
    S = retrieve(r, h, chunk_states(k, v, L, U))
    S_full = expand_states(S, U)
    op = fused or chunk_attention
    return op(q, k, v, S_full, g, L)


@torch.no_grad()
def bsbr_attention_reference(q, k, v, r, h, g, L: int, U=None) -> torch.Tensor:
    """Plain loops over chunks and tokens, fp32: slow and obviously correct."""
    out_dtype = q.dtype
    q, k, v, r, h, g = (t.float() for t in (q, k, v, r, h, g))
    U = U.float() if U is not None else None
    B, H, T, d = q.shape
    C = num_chunks(T, L)
    scale = 1.0 / math.sqrt(d)
    phi = (lambda x: x) if U is None else (lambda x: torch.einsum("bh...d,hde->bh...e", x, U))
    o = torch.zeros_like(q)
    bank = []  # F_j of completed chunks, each (B, H, d', d)
    for i in range(C):
        lo, hi = i * L, min((i + 1) * L, T)
        # Retrieved state for chunk i, from chunks j < i only.
        if i == 0:
            S = torch.zeros(B, H, phi(q[:, :, :1]).shape[-1], d)
        else:
            w = torch.stack([(r[:, :, i] * h[:, :, j]).sum(-1) * scale for j in range(i)], -1)  # (B, H, i)
            p = torch.softmax(w, -1)
            S = sum(p[:, :, j, None, None] * bank[j] for j in range(i))
        for t in range(lo, hi):
            s = (q[:, :, t, None, :] * k[:, :, lo:t + 1]).sum(-1) * scale  # (B, H, t-lo+1)
            a = (torch.softmax(s, -1)[..., None] * v[:, :, lo:t + 1]).sum(-2)  # (B, H, d)
            ret = (phi(q[:, :, t])[..., None] * S).sum(-2)  # (B, H, d)
            o[:, :, t] = a + g.view(1, H, 1) * ret
        kk = phi(k[:, :, lo:hi])  # (B, H, n, d')
        bank.append(kk.transpose(-1, -2) @ v[:, :, lo:hi])  # (B, H, d', d)
    return o.to(out_dtype)
