"""Choosing the next token from logits: the one copy of the sampling code (numpy only).

The processors run in this order on each row's float32 logits (V,):

    repetition penalty   tokens already in the row's sequence (prompt and generated): a positive
                         logit is divided by the penalty, a negative one multiplied (as in HF)
    temperature          0 = greedy (argmax of the penalised logits; top-k/top-p do not apply)
    top-k                keep the k largest
    top-p                keep the smallest set of most likely tokens whose probability reaches p

Sampling draws from one ``numpy.random.Generator`` per row, so a row's tokens depend only on
its own generator (a request seeded alone draws what it draws inside any batch). The
log-probability reported for a chosen token is that of the model's own distribution,
``log_softmax(logits)[token]`` of the unprocessed logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SamplingOptions:
    """Validated options of the logits processors (errors are one-line ``InputError``)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not _is_real(t) or not np.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise InputError(f"top_k must be an integer >= 1, got {k!r}")
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise InputError(f"top_p must lie in (0, 1], got {p!r}")
        if r is not None and (not _is_real(r) or not np.isfinite(r) or r <= 0):
            raise InputError(f"repetition_penalty must be a finite number > 0 (1 = none), got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) over the last axis (keepdims): one float32 pass of exp (values in
    (0, 1] after the max is taken out), summed in float64. A chosen token's log-probability is
    ``logits[token] - logsumexp(logits)``, with no vocabulary-sized log-softmax array."""
    z = np.asarray(logits, dtype=np.float32)
    m = z.max(-1, keepdims=True)
    return m.astype(np.float64) + np.log(np.exp(z - m).sum(-1, keepdims=True, dtype=np.float64))


def penalise(logits: np.ndarray, seen: np.ndarray, penalty: float | None) -> np.ndarray:
    """One row's logits (V,) with the repetition penalty applied to the token ids in ``seen``."""
    if penalty is None or penalty == 1 or len(seen) == 0:
        return logits
    out = np.array(logits, dtype=np.float32)
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def filtered(z: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Scaled logits (B, V) with the tokens outside top-k / top-p set to -inf."""
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[..., -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None and top_p < 1:
        order = np.argsort(-z, axis=-1, kind="stable")
        zs = np.take_along_axis(z, order, -1)
        ps = np.exp(zs - zs[..., :1])
        ps /= ps.sum(-1, keepdims=True)
        before = np.cumsum(ps, -1) - ps  # mass of the more likely tokens
        drop = np.zeros_like(z, dtype=bool)
        np.put_along_axis(drop, order, before >= top_p, -1)  # the most likely token always stays
        z = np.where(drop, -np.inf, z)
    return z


def probabilities(logits: np.ndarray, opts: SamplingOptions) -> np.ndarray:
    """Sampling distribution (B, V), float64, of already-penalised logits at temperature > 0."""
    z = filtered(np.asarray(logits, dtype=np.float64) / opts.temperature, opts.top_k, opts.top_p)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the distribution ``p`` (V,) with one uniform draw of ``rng``."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def choose(logits: np.ndarray, opts: SamplingOptions, rngs: Sequence[np.random.Generator] | None = None,
           seen: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Next token per row of ``logits`` (B, V): processors of ``opts``, then argmax (greedy) or a
    draw from row i's generator ``rngs[i]``; ``seen[i]``: row i's tokens so far (for the penalty)."""
    logits = np.asarray(logits)
    if seen is not None and opts.repetition_penalty not in (None, 1):
        logits = np.stack([penalise(row, s, opts.repetition_penalty) for row, s in zip(logits, seen)])
    if opts.greedy:
        return logits.argmax(-1).astype(np.int64)
    if rngs is None or len(rngs) != len(logits):
        raise InputError(f"sampling needs one generator per row ({len(logits)} rows)")
    p = probabilities(logits, opts)
    return np.array([draw(row, rng) for row, rng in zip(p, rngs)], dtype=np.int64)


def chosen_logprobs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[row, token] per row: the model's log-probability of each chosen token
    (``logsumexp``: no log-softmax over the vocabulary is kept)."""
    rows = np.arange(len(tokens))
    return logits[rows, np.asarray(tokens, dtype=np.int64)].astype(np.float64) - logsumexp(logits)[:, 0]


def row_generators(seed, rows: int) -> list[np.random.Generator]:
    """One generator per row: ``seed`` an int (every row seeded with it, as independent requests
    with the same seed), a sequence of per-row seeds (None entries unseeded), or None (unseeded)."""
    if seed is None or _is_int(seed):
        seeds = [seed] * rows
    else:
        seeds = list(seed)
        if len(seeds) != rows:
            raise InputError(f"seed: {len(seeds)} seeds for {rows} prompts")
    for s in seeds:
        if s is not None and (not _is_int(s) or s < 0):
            raise InputError(f"seed must be an integer >= 0 or None, got {s!r}")
    return [np.random.default_rng(s) for s in seeds]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
           rng: np.random.Generator | None = None, top_p: float | None = None) -> np.ndarray:
    """Next token per row of logits (B, V) with one generator shared by the rows (drawn in row
    order): argmax at temperature 0. The form ``bsbr_export.generate`` uses."""
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = rng or np.random.default_rng()
    return choose(logits, opts, [rng] * len(logits))
