"""OpenAI's presence and frequency penalties (not in ``runtime.sampling``, which has the
multiplicative repetition penalty): ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``
over the tokens the request has generated so far, applied to the logits that
``sampling.choose_rows`` chooses from (its ``processed``)."""

from __future__ import annotations

import numpy as np


def apply_penalties(logits: np.ndarray, counts: np.ndarray | None, presence: float, frequency: float) -> np.ndarray:
    """One row's logits (V,) with the penalties applied; ``counts``: generated-token counts (V,)."""
    if counts is None or not (presence or frequency):
        return logits
    out = np.array(logits, dtype=np.float32)
    seen = counts > 0
    out[seen] -= presence + frequency * counts[seen]
    return out
