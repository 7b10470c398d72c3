"""The loop references: the oracle every fast path of the BSBR op is tested against.

Written plainly and apart from the fast paths (``chunk``, ``recurrent``, ``kernel``, ``onnx_graph``):
loops over chunks and tokens, fp32 (fp64 for the normalised sums), no T x T tensor.

``bsbr_attention_reference``: the whole layer (chunk states, retrieval, both terms), with
either local window (``chunk``, ``lookback``).
``window_attention_reference``: the baselines of ``ops.baselines`` (sliding window, sinks).
``chunk_attention_ref`` / ``chunk_attention_normalised_ref``: the fused op alone, as the
Triton kernel, the ONNX function and the TensorRT plugin compute it:

    o[b,h,t] = sum_{s in chunk(t), s <= t} softmax_s(q_t . k_s / sqrt(d)) v_s
               + g[h] * (q_t @ S[b,h,chunk(t)])          chunk(t) = t // L
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import LOOKBACK_CHUNKS
from .chunk import feature, num_chunks


def check_chunk_attention_args(q, k, v, S, g, chunk_size: int) -> None:
    """Raise ValueError when the shapes of the op's arguments do not agree."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, d), got shape {tuple(q.shape)}")
    B, H, T, d = q.shape
    if T < 1:
        raise ValueError("T must be >= 1")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    C = math.ceil(T / chunk_size)
    if tuple(S.shape) != (B, H, C, d, d):
        raise ValueError(
            f"S must be (B, H, C, d, d) = {(B, H, C, d, d)} for T={T}, chunk_size={chunk_size}; got {tuple(S.shape)}"
        )
    if tuple(g.shape) != (H,):
        raise ValueError(f"g must be (H,) = ({H},), got {tuple(g.shape)}")


def chunk_attention_ref(q, k, v, S, g, chunk_size: int) -> torch.Tensor:
    """Block-diagonal causal softmax attention plus the retrieval term g * q @ S.

    q, k, v: (B, H, T, d); S: (B, H, C, d, d) with C = ceil(T / chunk_size); g: (H,).
    Computes in fp32 and returns a tensor of q's dtype.
    """
    check_chunk_attention_args(q, k, v, S, g, chunk_size)
    B, H, T, d = q.shape
    qf, kf, vf, Sf = (x.float() for x in (q, k, v, S))
    gf = g.float().view(1, H, 1, 1)  # (1, H, 1, 1)
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(B, H, T, d, dtype=torch.float32, device=q.device)
    for c, start in enumerate(range(0, T, chunk_size)):
        end = min(start + chunk_size, T)
        n = end - start
        qc, kc, vc = qf[:, :, start:end], kf[:, :, start:end], vf[:, :, start:end]  # (B, H, n, d)
        scores = (qc @ kc.transpose(-1, -2)) * scale  # (B, H, n, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        local = scores.softmax(dim=-1) @ vc  # (B, H, n, d)
        retrieved = gf * (qc @ Sf[:, :, c])  # (B, H, n, d)
        out[:, :, start:end] = local + retrieved
    return out.to(q.dtype)


def check_chunk_attention_normalised_args(q, k, v, qf, S, Z, g, chunk_size: int) -> None:
    """As `check_chunk_attention_args`, plus qf (like q) and Z (B, H, C, d)."""
    check_chunk_attention_args(q, k, v, S, g, chunk_size)
    if qf.shape != q.shape:
        raise ValueError(f"qf must have q's shape {tuple(q.shape)}, got {tuple(qf.shape)}")
    if tuple(Z.shape) != tuple(S.shape[:-1]):
        raise ValueError(f"Z must be (B, H, C, d) = {tuple(S.shape[:-1])}, got {tuple(Z.shape)}")


def chunk_attention_normalised_ref(q, k, v, qf, S, Z, g, chunk_size: int) -> torch.Tensor:
    """The normalised op, one loop over chunks, fp64 sums (no max subtraction needed):

        o_t = (sum_s e^{q_t.k_s/sqrt(d)} v_s + g qf_t S_c) / (sum_s e^{q_t.k_s/sqrt(d)} + g qf_t . Z_c)

    over the keys s <= t of t's chunk c. Returns a tensor of q's dtype.
    """
    check_chunk_attention_normalised_args(q, k, v, qf, S, Z, g, chunk_size)
    B, H, T, d = q.shape
    q64, k64, v64, f64, S64, Z64 = (x.double() for x in (q, k, v, qf, S, Z))
    g64 = g.double().view(1, H, 1, 1)
    out = torch.empty(B, H, T, d, dtype=torch.float64, device=q.device)
    for c, start in enumerate(range(0, T, chunk_size)):
        end = min(start + chunk_size, T)
        n = end - start
        e = torch.exp(q64[:, :, start:end] @ k64[:, :, start:end].transpose(-1, -2) / math.sqrt(d))  # (B, H, n, n)
        e = e * torch.ones(n, n, dtype=torch.float64, device=q.device).tril()
        fc = f64[:, :, start:end]
        num = e @ v64[:, :, start:end] + g64 * (fc @ S64[:, :, c])
        den = e.sum(-1, keepdim=True) + g64 * (fc @ Z64[:, :, c, :, None])
        out[:, :, start:end] = num / den
    return out.to(q.dtype)


def compare_to_baseline(out, ref32, ref_lowp, factor: float = 3.0, eps: float = 1e-5) -> dict:
    """Distances of a low-precision fast path from the fp32 reference, against a baseline.

    `ref32`: the reference on the original fp32 inputs. `ref_lowp`: the reference run on
    the same low-precision inputs the fast path saw (its distance to `ref32` is the
    baseline). The fast path passes when its max and mean absolute distances are at
    most `factor` times the baseline's, plus `eps`. Returns the numbers and `ok`.
    """
    ref = ref32.float()
    err = (out.float() - ref).abs()
    base = (ref_lowp.float() - ref).abs()
    nums = {
        "err_max": err.max().item(),
        "err_mean": err.mean().item(),
        "base_max": base.max().item(),
        "base_mean": base.mean().item(),
    }
    nums["limit_max"] = factor * nums["base_max"] + eps
    nums["limit_mean"] = factor * nums["base_mean"] + eps
    nums["ok"] = nums["err_max"] <= nums["limit_max"] and nums["err_mean"] <= nums["limit_mean"]
    return nums


@torch.no_grad()
def bsbr_attention_reference(q, k, v, r, h, g, L: int, U=None, retrieval: str = "plain",
                             feature_map: str = "identity", local_window: str = "chunk",
                             retrieval_weights: str = "softmax", decay=None,
                             retrieving_chunks: int | None = None) -> torch.Tensor:
    """Plain loops over chunks and tokens, fp32: slow and obviously correct.

    Token t of chunk i attends by softmax to the keys from ``first`` to t, where ``first`` is
    the start of chunk i (``chunk``) or of chunk i - 1 (``lookback``), and retrieves from the
    chunks that end before ``first`` with weights ``retrieval_weights`` (``decay`` (H,): lambda),
    unless i >= ``retrieving_chunks`` (``BSBRConfig.retrieving_chunks``; None: every chunk retrieves)."""
    n = LOOKBACK_CHUNKS[local_window]
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
        first = max(0, (i - n) * L)  # the local window's first key
        retrieved = range(first // L)  # the chunks before the window: j < i - n
        if retrieving_chunks is not None and i >= retrieving_chunks:
            retrieved = range(0)
        # Retrieved state for chunk i, from those chunks only.
        if len(retrieved) == 0:
            dp = phi(q[:, :, :1]).shape[-1]
            S, Z = torch.zeros(B, H, dp, d), torch.zeros(B, H, dp)
        else:
            w = torch.stack([(r[:, :, i] * h[:, :, j]).sum(-1) * scale for j in retrieved], -1)  # (B, H, i - n)
            p = retrieval_weights_reference(w, i - n, retrieval_weights, decay)
            S = sum(p[:, :, j, None, None] * bank[j] for j in retrieved)
            Z = sum(p[:, :, j, None] * zbank[j] for j in retrieved)
        for t in range(lo, hi):
            s = (q[:, :, t, None, :] * k[:, :, first:t + 1]).sum(-1) * scale  # (B, H, t-first+1)
            a = (torch.softmax(s, -1)[..., None] * v[:, :, first:t + 1]).sum(-2)  # (B, H, d)
            pq = phi(q[:, :, t])  # (B, H, d')
            ret = (pq[..., None] * S).sum(-2)  # (B, H, d)
            if retrieval == "plain":
                o[:, :, t] = a + g.view(1, H, 1) * ret
            else:
                # Shared denominator: sum_s e^s v_s + g ret over sum_s e^s + g pq.Z
                e = torch.exp(s.double())  # (B, H, n), fp64: no max subtraction needed
                gg = g.double().view(1, H, 1)
                num = (e[..., None] * v[:, :, first:t + 1].double()).sum(-2) + gg * ret.double()
                den = e.sum(-1, keepdim=True) + gg * (pq * Z).double().sum(-1, keepdim=True)
                o[:, :, t] = (num / den).float()
        kk = phi(k[:, :, lo:hi])  # (B, H, n, d')
        bank.append(kk.transpose(-1, -2) @ v[:, :, lo:hi])  # (B, H, d', d)
        zbank.append(kk.sum(-2))  # (B, H, d')
    return o.to(out_dtype)


def retrieval_weights_reference(w, n: int, weights: str, decay=None):
    """p_ij over the n retrieved chunks j = 0 .. n - 1 of one chunk i (scores w (B, H, n)): softmax,
    ones (``sum``), lambda_h^(n - 1 - j) (``decay``: the newest retrieved chunk weighs 1), sigmoid
    (``gate``)."""
    if weights == "softmax":
        return torch.softmax(w, -1)
    if weights == "sum":
        return torch.ones_like(w)
    if weights == "decay":
        return torch.stack([decay.float().view(1, -1) ** (n - 1 - j) for j in range(n)], -1).expand_as(w)
    if weights == "gate":
        return torch.sigmoid(w)
    raise ValueError(f"unknown retrieval weights {weights!r}")


@torch.no_grad()
def window_attention_reference(q, k, v, window: int, sinks: int = 0) -> torch.Tensor:
    """Causal softmax attention of each token t over the keys s <= t with s > t - window (the
    ``window`` most recent tokens, t itself included) and the first ``sinks`` tokens; one loop
    over tokens, fp64 inside, returned in q's dtype."""
    B, H, T, d = q.shape
    q64, k64, v64 = (x.double() for x in (q, k, v))
    o = torch.empty(B, H, T, d, dtype=torch.float64, device=q.device)
    for t in range(T):
        keys = [s for s in range(t + 1) if s > t - window or s < sinks]
        w = (q64[:, :, t, None, :] * k64[:, :, keys]).sum(-1) / math.sqrt(d)  # (B, H, n)
        o[:, :, t] = (torch.softmax(w, -1)[..., None] * v64[:, :, keys]).sum(-2)
    return o.to(q.dtype)


def normalised_log_weights(q, k, r, h, g, L: int, feature_map="elu1", local_window: str = "chunk",
                           retrieval_weights: str = "softmax", decay=None,
                           retrieving_chunks: int | None = None) -> torch.Tensor:
    """The normalised op as an explicit attention matrix: log w[t, s], (B, H, T, T), -inf where
    token t gives token s no weight. Differentiable (it is what ``calibrate.transfer`` trains).

    Token t of chunk i weighs a key s of its local window by e^{q_t.k_s/sqrt d} and a key s of a
    retrieved chunk j by g p_ij phi(q_t).phi(k_s) (p_ij of ``retrieval_weights``, ``decay`` (H,));
    each row is divided by its sum, so ``exp(log_w) @ v`` is the op's output (no compression: U = I)."""
    B, H, T, d = q.shape
    n = LOOKBACK_CHUNKS[local_window]
    C = num_chunks(T, L)
    chunk = torch.arange(T, device=q.device) // L
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    local = causal & (chunk[None, :] >= chunk[:, None] - n)  # the same chunk or the n before it
    meta = (r @ h.transpose(-1, -2)) / math.sqrt(d)  # (B, H, C, C)
    earlier = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 - n)
    if retrieving_chunks is not None:  # chunks from retrieving_chunks on retrieve nothing
        earlier = earlier & (torch.arange(C, device=q.device)[:, None] < retrieving_chunks)
    if retrieval_weights == "softmax":
        # Masked with a finite value first: a row without earlier chunks must not give NaN gradients.
        logp = torch.log_softmax(meta.masked_fill(~earlier, -1e9), -1)
    elif retrieval_weights == "sum":
        logp = torch.zeros_like(meta)
    elif retrieval_weights == "decay":
        i = torch.arange(C, device=q.device)
        age = (i[:, None] - 1 - n - i[None, :]).clamp_min(0).float()  # (C, C)
        logp = (age * decay.float().log().view(1, H, 1, 1)).expand_as(meta)
    elif retrieval_weights == "gate":
        logp = F.logsigmoid(meta)
    else:
        raise ValueError(f"unknown retrieval weights {retrieval_weights!r}")
    logp = logp.masked_fill(~earlier, float("-inf"))[:, :, chunk][:, :, :, chunk]  # (B, H, T, T)
    lin = feature(q.float(), feature_map) @ feature(k.float(), feature_map).transpose(-1, -2)
    retrieved = causal & ~local
    logits = torch.where(local, (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d),
                         torch.where(retrieved, g.float().log().view(1, H, 1, 1) + logp + lin.log(),
                                     torch.full_like(lin, float("-inf"))))
    return torch.log_softmax(logits, -1)
