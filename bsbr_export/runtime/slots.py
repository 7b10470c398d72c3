"""Where a row's keys and values go in its K/V window (``ops.state``: the ``lookback`` chunks
before the open one, then the open chunk, ``window`` rows per layer and head).

The graphs never return the window: the per-token graph returns the token's k/v row, the extend
graph the piece's k/v rows, and the engine writes them here. Token ``t`` of a row that holds
chunks up to ``m`` (its open chunk) sits at slot ``t - (m - lookback) x chunk``; the slots of
tokens the row does not hold yet are zero, so a row's window holds the same bytes whichever way
its tokens came (one piece, several, or token by token).

Numpy only: every buffer is one layer's (batch, head, window, head_dim) array.
"""

from __future__ import annotations

import numpy as np


def write_rows(buffers, rows, act, slot) -> None:
    """buffer[b, :, slot[i]] = row[b, :, 0] for b = act[i], for each (buffer (B, H, N, d), row
    (B, H, 1, d)) pair: the decode step's only write into the state. One index over the
    flattened (batch x head) axis per step, shared by every tensor."""
    if not len(act):
        return
    B, H, N, d = buffers[0].shape
    bh = (act[:, None] * H + np.arange(H)[None]).ravel()  # (rows x H,)
    at = np.repeat(slot, H)
    for buf, row in zip(buffers, rows):
        buf.reshape(B * H, N, d)[bh, at] = row.reshape(B * H, d)[bh]


def piece_rows_from(lengths, window: int) -> int:
    """The first row of a piece (rows ``lengths``, padded to the longest) that any row's window
    can hold after it: a row keeps at most its last ``window`` tokens, and the shortest row's
    last ``window`` start earliest. The extend graph returns its k/v rows from there on."""
    return max(0, int(np.min(lengths)) - window)


def write_piece(buffers, pieces, rows, position, lengths, chunk: int, lookback: int) -> None:
    """Each (buffer (batch, H, window, d), piece (len(rows), H, T - s, d)) pair, where the piece
    holds rows s = ``piece_rows_from`` on: row ``rows[i]``, which held ``position[i]`` tokens,
    takes the piece's first ``lengths[i]`` rows as its next tokens. Where the piece closes
    chunks the window moves on: it then holds the last chunks of what the row held and the
    piece, and zeros after them."""
    s = piece_rows_from(lengths, (lookback + 1) * chunk)
    for i, r in enumerate(np.asarray(rows).tolist()):
        p, t = int(position[i]), int(lengths[i])
        e = p + t
        lo_old, lo_new = (p // chunk - lookback) * chunk, (e // chunk - lookback) * chunk
        for buf, piece in zip(buffers, pieces):
            if lo_new == lo_old:  # no chunk closes: the piece's rows at their slots (then t <= window: s = 0)
                buf[r, :, p - lo_old:e - lo_old] = piece[i, :, :t]
                continue
            win = np.zeros(buf.shape[1:], buf.dtype)
            keep = max(lo_new, 0)  # the tokens held before the piece that stay in the window
            if keep < p:
                win[:, keep - lo_new:p - lo_new] = buf[r, :, keep - lo_old:p - lo_old]
            first = max(p, lo_new)
            win[:, first - lo_new:e - lo_new] = piece[i, :, first - p - s:t - s]
            buf[r] = win


def slide(buffers, row: int, chunk: int, lookback: int) -> None:
    """The window of ``row`` after its open chunk closed: the chunks move one chunk earlier (the
    closed chunk becomes the previous one) and the new open chunk's slots are zero."""
    for b in buffers:
        if lookback:
            b[row, :, :-chunk] = b[row, :, chunk:].copy()
        b[row, :, b.shape[2] - chunk:] = 0.0
