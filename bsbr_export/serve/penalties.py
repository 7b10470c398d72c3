"""What the server does to the logits before ``sampling.choose_rows`` chooses (its ``processed``),
beside the repetition penalty and the filters of ``runtime.sampling``, vectorised over the rows
of the batch that ask for any of it (one copy of the logits; rows that ask for nothing stay as
they are, and greedy rows stay an argmax of what comes out):

    presence / frequency   OpenAI's: ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``
                           over the tokens the request has generated so far
    logit_bias             OpenAI's: ``logit[t] += bias[t]`` (bias in [-100, 100])
    min_tokens             vLLM's: the stop tokens (EOS unless ``ignore_eos``) get -inf until the
                           request has ``min_tokens`` tokens
"""

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


def processed_logits(logits: np.ndarray, reqs) -> np.ndarray | None:
    """The logits (len(reqs), V) to choose from, or None where no request asks for a change.
    ``reqs``: the scheduler's ``GenRequest`` of each row (``counts``, ``presence_penalty``,
    ``frequency_penalty``, ``logit_bias`` as (ids, biases), ``min_tokens``, ``tokens``,
    ``stop_tokens``)."""
    pen = [j for j, r in enumerate(reqs) if r.counts is not None and (r.presence_penalty or r.frequency_penalty)]
    bias = [j for j, r in enumerate(reqs) if r.logit_bias is not None]
    early = [j for j, r in enumerate(reqs) if r.stop_tokens and len(r.tokens) < r.min_tokens]
    if not (pen or bias or early):
        return None
    out = np.array(logits, dtype=np.float32)
    if pen:
        counts = np.stack([reqs[j].counts for j in pen])
        presence = np.array([reqs[j].presence_penalty for j in pen], np.float32)[:, None]
        frequency = np.array([reqs[j].frequency_penalty for j in pen], np.float32)[:, None]
        out[pen] -= presence * (counts > 0) + frequency * counts
    if bias:
        rows = np.concatenate([np.full(len(reqs[j].logit_bias[0]), j) for j in bias])
        cols = np.concatenate([reqs[j].logit_bias[0] for j in bias])
        out[rows, cols] += np.concatenate([reqs[j].logit_bias[1] for j in bias])  # (row, id) pairs are unique
    if early:
        rows = np.concatenate([np.full(len(reqs[j].stop_tokens), j) for j in early])
        cols = np.concatenate([np.fromiter(reqs[j].stop_tokens, np.int64) for j in early])
        out[rows, cols] = -np.inf
    return out
