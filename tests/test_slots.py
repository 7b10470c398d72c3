"""runtime.slots: where a row's k/v rows go in its K/V window, whichever way its tokens come."""

import numpy as np
import pytest

from bsbr_export.runtime.slots import piece_rows_from, slide, write_piece, write_rows

H, D = 2, 3


def expected_window(X, held: int, chunk: int, lookback: int) -> np.ndarray:
    """The window of a row holding ``X[:held]``: tokens from chunk held // chunk - lookback on, zeros after."""
    win = np.zeros((H, (lookback + 1) * chunk, D), np.float32)
    lo = (held // chunk - lookback) * chunk
    for s in range(win.shape[1]):
        if 0 <= lo + s < held:
            win[:, s] = X[:, lo + s]
    return win


@pytest.mark.parametrize("lookback", [0, 1, 2])
@pytest.mark.parametrize("chunk", [4, 5])
def test_pieces_of_every_size_fill_the_window_as_one_prompt_would(chunk, lookback):
    """Two rows take random pieces (0 to 3 chunks and a bit, lengths not multiples of the chunk)
    side by side, given only the piece's rows a window can hold (``piece_rows_from``, as the
    extend graph returns them); after every piece each row's window equals the one its tokens so
    far define, including zeros in the slots of tokens it does not hold yet."""
    rng = np.random.default_rng(chunk * 10 + lookback)
    n = 60
    X = rng.standard_normal((2, H, n, D)).astype(np.float32)  # each row's tokens' k (or v) rows
    W = (lookback + 1) * chunk
    bufs = [np.zeros((3, H, W, D), np.float32)]  # a third row the pieces never touch stays zero
    held = np.zeros(2, np.int64)
    while (held < n).any():
        lengths = np.minimum(rng.integers(0, 3 * chunk + 2, size=2), n - held)
        T = max(1, int(lengths.max()))
        piece = np.full((2, H, T, D), np.nan, np.float32)  # padding past a row's length must never be read
        for i in range(2):
            piece[i, :, :lengths[i]] = X[i, :, held[i]:held[i] + lengths[i]]
        s = piece_rows_from(lengths, W)  # the rows the extend graph returns
        write_piece(bufs, [piece[:, :, s:]], np.array([0, 1]), held, lengths, chunk, lookback)
        held += lengths
        for i in range(2):
            np.testing.assert_array_equal(bufs[0][i], expected_window(X[i], int(held[i]), chunk, lookback))
        assert not bufs[0][2].any()


@pytest.mark.parametrize("lookback", [0, 1])
def test_token_by_token_with_slides_equals_pieces(lookback):
    """Decode's writes (one row at slot window - chunk + position % chunk) and the slide after
    each close leave the window a piece of the same tokens leaves."""
    chunk, n = 4, 23
    rng = np.random.default_rng(1)
    X = rng.standard_normal((H, n, D)).astype(np.float32)
    W = (lookback + 1) * chunk
    by_token = [np.zeros((1, H, W, D), np.float32)]
    for p in range(n):
        write_rows(by_token, [X[None, :, p:p + 1]], np.array([0]), np.array([W - chunk + p % chunk]))
        if p % chunk == chunk - 1:
            slide(by_token, 0, chunk, lookback)
        at_once = [np.zeros((1, H, W, D), np.float32)]
        s = piece_rows_from(np.array([p + 1]), W)
        write_piece(at_once, [X[None, :, s:p + 1]], np.array([0]), np.array([0]), np.array([p + 1]), chunk, lookback)
        np.testing.assert_array_equal(by_token[0], at_once[0], err_msg=f"after token {p}")


def test_piece_rows_from_keeps_every_row_a_window_holds():
    """The first returned row is the shortest row's length less the window, never negative."""
    assert piece_rows_from(np.array([5, 3]), 8) == 0
    assert piece_rows_from(np.array([30, 12]), 8) == 4
    assert piece_rows_from(np.array([9]), 8) == 1
