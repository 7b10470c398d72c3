"""The baselines a long-context conversion is compared with: GPT-2's own attention restricted to
a sliding window of recent tokens, optionally with a few "sink" tokens at the start that every
token keeps seeing (as StreamingLLM keeps them). No retrieval, no new parameters: a baseline runs
the original weights (``BSBRGPT2.forward(ids, impl=WindowAttention(...))``), with the model's
positions (GPT-2's absolute positions below ``n_positions``).

Token t attends by softmax to the keys s <= t with s > t - window (the ``window`` most recent
tokens, t included) and to s < sinks. So a sequence of at most ``window + sinks`` tokens sees
every earlier token: exactly GPT-2. The decode state is a KV cache of ``window + sinks`` tokens
(``ops.state.window_cache_bytes``), whatever the context.

``window_attention`` is the vectorised form: queries in blocks of ``window`` tokens, each block's
keys its own block and the block before it (plus the sinks), masked; scores (B, H, C, window,
sinks + 2 window), linear in T. ``ops.naive.window_attention_reference`` is its loop oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chunk import pad_to_chunks, window_mask, with_earlier
from .state import window_cache_bytes


def window_attention(q, k, v, window: int, sinks: int = 0) -> torch.Tensor:
    """Causal softmax attention over the last ``window`` tokens and the first ``sinks``:
    q, k, v (B, H, T, d) -> (B, H, T, d)."""
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    B, H, T, d = q.shape
    W = window
    qc, kc, vc = (pad_to_chunks(x, W) for x in (q, k, v))  # (B, H, C, W, d)
    C = qc.shape[2]
    kw, vw = with_earlier(kc, 1), with_earlier(vc, 1)  # (B, H, C, 2W, d)
    if sinks:
        # The first tokens as extra keys of every block, before the block's own keys.
        ks, vs = (F.pad(x[:, :, :sinks], (0, 0, 0, max(0, sinks - T))) for x in (k, v))  # (B, H, sinks, d)
        kw = torch.cat([ks[:, :, None].expand(B, H, C, sinks, d), kw], 3)
        vw = torch.cat([vs[:, :, None].expand(B, H, C, sinks, d), vw], 3)
    o = F.scaled_dot_product_attention(qc, kw, vw, attn_mask=baseline_mask(C, W, sinks, q.device))
    return o.reshape(B, H, C * W, d)[:, :, :T]  # (B, H, T, d)


def baseline_mask(C: int, window: int, sinks: int = 0, device=None) -> torch.Tensor:
    """Keys each query of a block of ``window`` tokens sees: (C, window, sinks + 2 window) bool,
    columns the sinks, then the previous block, then the own block. A sink is visible only where
    the window no longer holds it (s <= t - window), so no key counts twice."""
    W = window
    mask = window_mask(C, W, 1, device, span=W)  # (C, W, 2W)
    if not sinks:
        return mask
    t = torch.arange(C * W, device=device).view(C, W, 1)
    return torch.cat([torch.arange(sinks, device=device) <= t - W, mask], -1)


@dataclass(frozen=True)
class WindowAttention:
    """A baseline's attention, passed as ``impl`` to ``BSBRGPT2.forward``: a sliding window of
    ``window`` tokens (t included) plus ``sinks`` first tokens."""

    window: int
    sinks: int = 0

    def __post_init__(self):
        for name in ("window", "sinks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "window" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'window' else 0}, got {v!r}")

    @property
    def name(self) -> str:
        return f"sinks {self.sinks} + window {self.window}" if self.sinks else f"window {self.window}"

    @property
    def exact_up_to(self) -> int:
        """The longest sequence on which every token sees all earlier ones (GPT-2 exactly)."""
        return self.window + self.sinks

    def __call__(self, q, k, v) -> torch.Tensor:
        return window_attention(q, k, v, self.window, self.sinks)

    def state_bytes(self, n_layer: int, n_embd: int, context: int, batch: int = 1) -> int:
        """Decode state (KV cache of the window and sinks) after ``context`` tokens, float32."""
        return window_cache_bytes(n_layer, n_embd, self.window, self.sinks, context, batch)
