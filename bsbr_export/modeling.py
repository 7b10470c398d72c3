"""A GPT-2 whose attention is BSBR, in PyTorch.

Parameter names follow HF GPT-2 with nn.Linear weights (out, in); the conversion
lives in ``convert``. The model has two forward paths over the same weights:
``impl="vectorised"`` (real work) and ``impl="reference"`` (loops, for tests), and
a streaming path (``prefill`` / ``decode_step``) over a preallocated ``ops.recurrent.DecodeState``.
``impl`` may also be an ``ops.baselines.WindowAttention``: the same weights with a baseline's
attention (sliding window, sinks) in place of BSBR, for the studies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TRAINED_FEATURE_MAPS, BSBRConfig
from .errors import InputError
from .ops.baselines import WindowAttention
from .ops.chunk import HedgehogFeature, LearnedFeature, bsbr_attention, chunk_states, num_chunks, retrieve
from .ops.naive import bsbr_attention_reference
from .ops.recurrent import (DecodeState, close_chunk, open_row, retrieve_one, slide, step_attention,
                            visible_rows)
from .ops.state import StateSpec


def activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.relu


def position_ids(cfg: BSBRConfig, start: int, end: int, device=None) -> torch.Tensor:
    """Positions of tokens start..end-1 under the configured policy: (end - start,)."""
    t = torch.arange(start, end, device=device)
    L, N = cfg.chunk_size, cfg.n_positions
    if cfg.position_policy == "chunk":
        return t % L
    return torch.where(t < N, t, N - L + t % L)


def last_token_index(T: int, L: int) -> torch.Tensor:
    """last(j) = min((j+1)L, T) - 1 for every chunk j: (C,)."""
    return (torch.arange(1, num_chunks(T, L) + 1) * L).clamp(max=T) - 1


class Attention(nn.Module):
    def __init__(self, cfg: BSBRConfig):
        super().__init__()
        E, H = cfg.n_embd, cfg.n_head
        self.cfg = cfg
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.meta_q = nn.Linear(E, E)  # r_i = W_r x_last(i-1) + b_r
        self.meta_k = nn.Linear(E, E)  # h_j = W_h x_last(j) + b_h
        self.g = nn.Parameter(torch.full((H,), float(cfg.retrieval_scale)))
        if cfg.compression is not None:
            self.register_buffer("U", torch.zeros(H, cfg.head_dim, cfg.state_dim))
        else:
            self.U = None
        if cfg.feature_map in TRAINED_FEATURE_MAPS:
            self.fm = (LearnedFeature if cfg.feature_map == "learned" else HedgehogFeature)(H, cfg.head_dim)
        # lambda of the ``decay`` retrieval weights, per head (None for the others)
        self.decay = (nn.Parameter(torch.full((H,), float(cfg.retrieval_decay)))
                      if cfg.retrieval_weights == "decay" else None)

    @property
    def weights(self) -> dict:
        """The retrieval weights' arguments of the ops (``ops.chunk.weigh``)."""
        return dict(weights=self.cfg.retrieval_weights, decay=self.decay)

    @property
    def fmap(self):
        """The feature map the ops take: its name, or the learned map itself."""
        return self.fm if self.cfg.feature_map in TRAINED_FEATURE_MAPS else self.cfg.feature_map

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B, H, N, d)."""
        B, N, _ = x.shape
        return x.view(B, N, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)

    def qkv(self, x):
        q, k, v = self.c_attn(x).split(self.cfg.n_embd, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)  # (B, H, T, d) each

    def meta(self, x: torch.Tensor):
        """Meta queries r (chunk i from last(i-1)) and meta keys h: (B, H, C, d) each."""
        L = self.cfg.chunk_size
        xl = x[:, last_token_index(x.shape[1], L).to(x.device)]  # (B, C, E)
        h = self.heads(self.meta_k(xl))
        r_prev = self.heads(self.meta_q(xl))  # r_prev[:, :, j] serves chunk j + 1
        r = torch.cat([torch.zeros_like(r_prev[:, :, :1]), r_prev[:, :, :-1]], dim=2)
        return r, h

    def forward(self, x: torch.Tensor, impl="vectorised") -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(x)
        if isinstance(impl, WindowAttention):  # a baseline: no retrieval, meta vectors unused
            return self.c_proj(impl(q, k, v).transpose(1, 2).reshape(B, T, E))
        r, h = self.meta(x)
        L = self.cfg.chunk_size
        mode = dict(retrieval=self.cfg.retrieval, feature_map=self.fmap, local_window=self.cfg.local_window,
                    retrieval_weights=self.cfg.retrieval_weights, decay=self.decay,
                    retrieving_chunks=self.cfg.retrieving_chunks)
        if impl == "reference":
            o = bsbr_attention_reference(q, k, v, r, h, self.g, L, self.U, **mode)
        elif impl == "vectorised":
            o = bsbr_attention(q, k, v, r, h, self.g, L, self.U, **mode)
        elif impl in ("triton", "fused"):
            # "fused": the Triton kernel on CUDA, the vectorised path elsewhere.
            fused = fused_op(q, strict=impl == "triton", normalised=self.cfg.retrieval == "normalised")
            o = bsbr_attention(q, k, v, r, h, self.g, L, self.U, fused=fused, **mode)
        else:
            raise ValueError(f"unknown attention implementation {impl!r}")
        return self.c_proj(o.transpose(1, 2).reshape(B, T, E))  # (B, T, E)


def fused_op(q: torch.Tensor, strict: bool, normalised: bool = False):
    """The Triton kernel of the plain or the normalised op when it can run on ``q``, else None
    (the vectorised torch path)."""
    from .ops.kernel import (chunk_attention_normalised_triton, chunk_attention_triton,
                                                is_interpreted, require_triton)

    kernel = chunk_attention_normalised_triton if normalised else chunk_attention_triton
    if strict:
        require_triton()
        return kernel
    try:
        require_triton()
    except ImportError:
        return None
    return kernel if (q.is_cuda or is_interpreted()) else None


class MLP(nn.Module):
    def __init__(self, cfg: BSBRConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.c_proj = nn.Linear(cfg.inner_dim, cfg.n_embd)
        self.act = activation(cfg.activation_function)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: BSBRConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, impl="vectorised"):
        x = x + self.attn(self.ln_1(x), impl)
        return x + self.mlp(self.ln_2(x))


class BSBRGPT2(nn.Module):
    """GPT-2 language model with BSBR attention; lm_head is tied to wte."""

    def __init__(self, cfg: BSBRConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    # ------------------------------------------------------------------ full forward
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape [batch, seq], got rank {input_ids.dim()}")
        if input_ids.shape[1] < 1:
            raise InputError("input_ids must hold at least one token")

    def forward(self, input_ids, attention_mask=None, impl: str = "vectorised", output_hidden_states=False):
        """Logits (B, T, V); with output_hidden_states also the residual stream after
        the embeddings and after every block (the last one after ln_f, as in HF)."""
        self.check_input_ids(input_ids)
        if attention_mask is not None:
            check_right_padded(attention_mask, input_ids.shape)
        B, T = input_ids.shape
        pos = position_ids(self.cfg, 0, T, input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, E)
        hidden = [x]
        for block in self.h:
            x = block(x, impl)
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x
        logits = x @ self.wte.weight.T  # (B, T, V)
        return (logits, hidden) if output_hidden_states else logits

    # ------------------------------------------------------------------ streaming
    def state_spec(self) -> StateSpec:
        return StateSpec.from_config(self.cfg)

    def new_state(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> DecodeState:
        spec = self.state_spec()
        return DecodeState.zeros(spec, batch, spec.capacity(max_len), dtype, device)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_len: int):
        """Full forward over the prompt, returning logits and the state after it."""
        self.check_input_ids(input_ids)
        B, T = input_ids.shape
        if T > max_len:
            raise InputError(f"prompt of {T} tokens exceeds max_len {max_len}")
        c, L = self.cfg, self.cfg.chunk_size
        norm = c.retrieval == "normalised"
        st = self.new_state(B, max_len, device=input_ids.device)
        n_done, n_cur = T // L, T % L  # completed chunks, tokens in the open chunk
        base = st.k.shape[3] - L  # rows of the earlier chunks the look-back window keeps (0 without)
        x = self.wte(input_ids) + self.wpe(position_ids(c, 0, T, input_ids.device))
        for i, block in enumerate(self.h):
            a = block.attn
            xa = block.ln_1(x)
            q, k, v = a.qkv(xa)
            r, h = a.meta(xa)
            Fs = chunk_states(k, v, L, a.U, a.fmap, norm)  # (B, H, C, d', dc)
            st.bank_h[:, i, :, :n_done] = h[:, :, :n_done]
            st.bank_F[:, i, :, :n_done] = Fs[:, :, :n_done]
            # The open chunk n_done in the last L rows; before it the chunks n_done - m, m <= lookback.
            for m in range(min(c.lookback, n_done) + 1):
                lo = (n_done - m) * L
                st.k[:, i, :, base - m * L:base - m * L + min(L, T - lo)] = k[:, :, lo:lo + L]
                st.v[:, i, :, base - m * L:base - m * L + min(L, T - lo)] = v[:, :, lo:lo + L]
            if n_cur:  # the open chunk n_done already has its S in the full computation
                st.S[:, i] = retrieve(r, h, Fs, c.lookback, **a.weights,
                                      until=c.retrieving_chunks)[:, :, n_done]  # (B, H, d', dc)
            else:  # the prompt ended on a chunk boundary: build S for the next chunk
                st.S[:, i] = self._next_S(a, xa[:, T - 1], st, i, n_done)
            x = block(x)
        st.pos = T
        return self.lm_logits(x), st

    def _next_S(self, a: Attention, x_last: torch.Tensor, st: DecodeState, layer: int, n_closed: int):
        """S of the chunk after the ``n_closed``-th closed one, from the bank's chunks before its
        local window (all closed chunks, or all but the last ``lookback``): (B, H, d', dc)."""
        n = max(0, n_closed - self.cfg.lookback)
        if self.cfg.retrieving_chunks is not None and n_closed >= self.cfg.retrieving_chunks:
            n = 0  # a chunk past retrieval_until retrieves nothing
        r = a.heads(a.meta_q(x_last)[:, None])[:, :, 0]  # (B, H, d)
        return retrieve_one(r, st.bank_h[:, layer, :, :n], st.bank_F[:, layer, :, :n], **a.weights)

    def lm_logits(self, x):
        return self.ln_f(x) @ self.wte.weight.T

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, st: DecodeState):
        """One token per sequence: token (B,) -> logits (B, V); updates ``st`` in place."""
        c, L = self.cfg, self.cfg.chunk_size
        norm = c.retrieval == "normalised"
        t = st.pos
        if t >= st.capacity * L:
            raise InputError(f"decode state is full ({t} tokens); allocate a larger max_len")
        slot, rows = t % L, st.k.shape[3]
        row, seen = open_row(rows, L, t), visible_rows(rows, L, t)
        x = self.wte(token[:, None]) + self.wpe(position_ids(c, t, t + 1, token.device))  # (B, 1, E)
        for i, block in enumerate(self.h):
            a = block.attn
            xa = block.ln_1(x)
            q, k, v = a.qkv(xa)  # (B, H, 1, d)
            st.k[:, i, :, row] = k[:, :, 0]
            st.v[:, i, :, row] = v[:, :, 0]
            kk, vv = st.k[:, i, :, seen], st.v[:, i, :, seen]  # (B, H, n, d)
            o = step_attention(q, kk, vv, st.S[:, i], a.g, a.U, a.fmap, norm)  # (B, H, 1, d)
            x = x + a.c_proj(o.transpose(1, 2).reshape(x.shape))
            x = x + block.mlp(block.ln_2(x))
            if slot == L - 1:  # the chunk closes: bank it, then build S for the next chunk
                j = t // L
                st.bank_F[:, i, :, j] = close_chunk(st.k[:, i, :, rows - L:], st.v[:, i, :, rows - L:], a.U,
                                                    a.fmap, norm)
                st.bank_h[:, i, :, j] = a.heads(a.meta_k(xa))[:, :, 0]
                st.S[:, i] = self._next_S(a, xa[:, 0], st, i, j + 1)
                slide(st.k[:, i], L)
                slide(st.v[:, i], L)
        st.pos = t + 1
        return self.lm_logits(x)[:, 0]


def check_right_padded(mask: torch.Tensor, shape) -> None:
    """BSBR is causal, so right padding never reaches a real token; left padding would."""
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(shape)}")
    m = mask.to(torch.int64)
    if ((m[:, 1:] - m[:, :-1]) > 0).any() or (m[:, 0] == 0).any():
        raise InputError("attention_mask must be right-padded (1...1 0...0) with at least one real token")
