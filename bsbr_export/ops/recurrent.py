"""BSBR attention one token at a time in PyTorch (the recurrent form), over the state of ``ops.state``.

Per layer, a new token at slot ``t % L`` of the open chunk attends to the chunk's keys so far
and to the chunk's retrieved state S (``step_attention``). When the token fills the chunk's last
slot, the chunk is closed: its F_j (with z_j) and meta key h_j join the bank
(``close_chunk``) and the next chunk's S is retrieved from the bank with the meta query built
from the same token (``retrieve_one``). Results equal the prefill form (``ops.chunk``) at
every position.

With the look-back local window the K/V buffer holds ``lookback`` earlier chunks before the open
one (``StateSpec.window`` rows): ``open_row`` is where a token's key goes, ``visible_rows`` what it
attends to, ``slide`` moves the closed chunk into the earlier rows when a chunk closes, and the
next chunk's S is retrieved from the bank's chunks before the window only (``retrieve_one`` of no
chunk is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .chunk import chunk_states, combine, expand, feature, phi, weigh
from .state import CARRIED, StateSpec


@dataclass
class DecodeState:
    """The carried state as torch tensors, batch first (``ops.state`` names them and their dims).

    k, v (B, layer, H, window, d), window = (1 + lookback) L (the open chunk in the last L rows); S (B, layer, H, d', dc); bank_h (B, layer, H, cap, d);
    bank_F (B, layer, H, cap, d', dc); pos: tokens consumed so far (all rows alike).
    """

    k: torch.Tensor
    v: torch.Tensor
    S: torch.Tensor
    bank_h: torch.Tensor
    bank_F: torch.Tensor
    pos: int = 0

    @classmethod
    def zeros(cls, spec: StateSpec, batch: int, capacity: int, dtype=torch.float32, device=None):
        return cls(*(torch.zeros(spec.shape(n, batch, capacity), dtype=dtype, device=device) for n in CARRIED))

    @property
    def capacity(self) -> int:
        return self.bank_h.shape[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The five tensors in ``ops.state.CARRIED`` order."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "pos")

    def as_numpy(self) -> dict:
        return {n: t.detach().cpu().numpy() for n, t in zip(CARRIED, self.tensors())}

    @classmethod
    def from_numpy(cls, arrays: dict, pos: int):
        return cls(*(torch.from_numpy(arrays[n]) for n in CARRIED), pos=pos)


def open_row(rows: int, L: int, t: int) -> int:
    """Row of token t's key/value in a K/V buffer of ``rows`` rows: the open chunk is the last L."""
    return rows - L + t % L


def visible_rows(rows: int, L: int, t: int) -> slice:
    """Rows token t attends to: the earlier chunks the buffer keeps, as far as they exist
    (t's chunk is t // L), and the open chunk up to t."""
    base = rows - L
    return slice(max(0, base - (t // L) * L), base + t % L + 1)


def slide(buf: torch.Tensor, L: int) -> None:
    """At a chunk close, in place on (..., rows, d): the oldest chunk leaves, the closed chunk
    becomes the newest earlier one; the open rows are then overwritten token by token."""
    if buf.shape[-2] > L:
        buf[..., :-L, :] = buf[..., L:, :].clone()


def step_attention(q, kk, vv, S, g, U, feature_map: str, normalised: bool) -> torch.Tensor:
    """One query against the open chunk's n keys and its retrieved state.

    q (B, H, 1, d); kk, vv (B, H, n, d); S (B, H, d', dc); g (H,) -> (B, H, 1, d).
    """
    gH = g.view(1, -1, 1, 1)
    if not normalised:
        local = F.scaled_dot_product_attention(q, kk, vv)  # (B, H, 1, d)
        return local + gH * (phi(q, feature_map, U) @ S)
    S_full, Z_full = expand(S, U, True)  # (B, H, d, d), (B, H, d)
    scores = (q.float() @ kk.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, 1, n)
    o = combine(scores, vv.float(), feature(q.float(), feature_map), S_full.float(), Z_full.float(), gH.float())
    return o.to(q.dtype)


def close_chunk(kk, vv, U, feature_map: str, normalised: bool) -> torch.Tensor:
    """F_j (with z_j) of one finished chunk: kk, vv (B, H, L, d) -> (B, H, d', dc)."""
    return chunk_states(kk, vv, kk.shape[2], U, feature_map, normalised)[:, :, 0]


def retrieve_one(r: torch.Tensor, bank_h: torch.Tensor, bank_F: torch.Tensor, weights: str = "softmax",
                 decay: torch.Tensor | None = None) -> torch.Tensor:
    """S for the next chunk from the n closed chunks of the bank it retrieves from: r (B, H, d),
    bank_h (B, H, n, d), bank_F (B, H, n, d', dc) -> (B, H, d', dc); 0 when n = 0. The weights are
    ``ops.chunk.weigh``'s (``decay``: chunk j is n - 1 - j chunks older than the newest)."""
    n = bank_h.shape[2]
    if n == 0:
        return bank_F.new_zeros(bank_F.shape[:2] + bank_F.shape[3:])
    scores = (bank_h @ r[..., None])[..., 0] / math.sqrt(r.shape[-1])  # (B, H, n)
    age = n - 1 - torch.arange(n, device=r.device)
    p = weigh(scores, torch.ones(n, dtype=torch.bool, device=r.device), age, weights, decay)  # (B, H, n)
    return torch.einsum("bhn,bhnef->bhef", p, bank_F)
