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

``choose_rows`` is the batched form (each row with its own options, generator and wish for
log-probabilities), and costs what each row asks for: greedy rows without a repetition penalty
take one argmax over their logits together; rows at temperature > 0 build their float64
distribution (rows with the same options together) and draw from their own generators in row
order, as ``choose`` always did (the same draws for the same seed); only rows that ask for
log-probabilities pay for ``logsumexp`` (float32 passes over the vocabulary: row max,
exponentials, sum), and nothing builds a vocabulary-sized log-softmax. A row's results are the
same alone and in any batch.
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


_LSE_ROWS = 4  # rows per pass of logsumexp: their exponentials stay in cache (GPT-2: 4 x 200 KB)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) over the last axis (keepdims), float64 values from float32 passes:
    the row max m, exp(logits - m) (values in (0, 1], so nothing overflows) and their sum, a few
    rows at a time in one reused buffer; only the per-row ``m + log(sum)`` is taken in float64.
    A chosen token's log-probability is ``logits[token] - logsumexp(logits)`` (within ~1e-6 of
    float64 ``log_softmax``), with no vocabulary-sized log-softmax array."""
    z = np.asarray(logits)
    if z.dtype != np.float32:
        z = z.astype(np.float32)
    flat = z.reshape(-1, z.shape[-1])
    m = flat.max(-1, keepdims=True)
    total = np.empty((len(flat), 1), np.float32)
    buf = np.empty((min(_LSE_ROWS, len(flat)), z.shape[-1]), np.float32)
    for i in range(0, len(flat), _LSE_ROWS):
        b = buf[:min(_LSE_ROWS, len(flat) - i)]
        np.subtract(flat[i:i + len(b)], m[i:i + len(b)], out=b)
        np.exp(b, out=b)
        b.sum(-1, keepdims=True, out=total[i:i + len(b)])
    out = m.astype(np.float64) + np.log(total.astype(np.float64))
    return out.reshape(*z.shape[:-1], 1)


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
    z = np.asarray(logits, dtype=np.float64)
    # shifted before scaling: the best token is 0 at any temperature, so a tiny one (1e-310)
    # cannot overflow into inf - inf = NaN; it leaves the best token alone, i.e. greedy
    with np.errstate(over="ignore"):  # the others may overflow to -inf: probability 0, as they should
        z = filtered((z - z.max(-1, keepdims=True)) / opts.temperature, opts.top_k, opts.top_p)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the distribution ``p`` (V,) with one uniform draw of ``rng``."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


@dataclass(frozen=True)
class Choice:
    """What ``choose_rows`` returns, per row: ``tokens`` (B,) int64; ``logprobs`` (B,) float64,
    the model's log-probability of the token (NaN for a row that did not ask); ``top``: for a
    row that asked for top log-probabilities {token: logprob} of its most likely tokens, most
    likely first, else None."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top: list


def _per_row(value, rows: int, name: str, scalar_types) -> list:
    if isinstance(value, scalar_types):
        return [value] * rows
    out = list(value)
    if len(out) != rows:
        raise InputError(f"{name}: {len(out)} values for {rows} rows")
    return out


def choose_rows(logits: np.ndarray, opts: SamplingOptions | Sequence[SamplingOptions],
                rngs: Sequence[np.random.Generator | None] | None = None,
                seen: Sequence[np.ndarray | None] | None = None, logprobs: bool | Sequence[bool] = False,
                top_logprobs: int | Sequence[int] = 0, processed: np.ndarray | None = None) -> Choice:
    """Next token per row of ``logits`` (B, V), each row with its own options: ``opts`` one
    ``SamplingOptions`` for all rows or one per row; ``rngs[i]``: row i's generator (needed by
    rows at temperature > 0); ``seen[i]``: row i's tokens so far (for its repetition penalty;
    None entries: none); ``logprobs``/``top_logprobs``: whether row i reports its token's
    log-probability / how many top log-probabilities (> 0 implies ``logprobs``), a bool/int for
    all rows or one per row; ``processed``: the logits to choose from when they differ from the
    model's (e.g. after the server's presence/frequency penalties), while log-probabilities
    always come from ``logits``. Greedy rows without a penalty: one argmax together; sampled
    rows: each draws from its own generator, in row order; log-probabilities (``logsumexp``)
    only for the rows that ask."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise InputError(f"logits must be (rows, vocab), got shape {logits.shape}")
    B = len(logits)
    row_opts = _per_row(opts, B, "opts", SamplingOptions)
    want_lp = np.array(_per_row(logprobs, B, "logprobs", (bool, np.bool_)), dtype=bool)
    tops = np.array(_per_row(top_logprobs, B, "top_logprobs", (int, np.integer)), dtype=np.int64)
    want_lp |= tops > 0
    scores = logits if processed is None else np.asarray(processed)
    if scores.shape != logits.shape:
        raise InputError(f"processed logits of shape {scores.shape} for logits of shape {logits.shape}")
    if seen is not None and len(seen) != B:
        raise InputError(f"seen: {len(seen)} sequences for {B} rows")

    tokens = np.empty(B, dtype=np.int64)
    penalised = {i: penalise(scores[i], seen[i], o.repetition_penalty) for i, o in enumerate(row_opts)
                 if seen is not None and seen[i] is not None and o.repetition_penalty not in (None, 1)}
    greedy = [i for i, o in enumerate(row_opts) if o.greedy]
    plain = [i for i in greedy if i not in penalised]
    if len(plain) == B:
        tokens[:] = scores.argmax(-1)
    elif plain:
        tokens[plain] = scores[plain].argmax(-1)
    for i in greedy:
        if i in penalised:
            tokens[i] = penalised[i].argmax()
    sampled = [i for i, o in enumerate(row_opts) if not o.greedy]
    if sampled:
        if rngs is None or len(rngs) != B or any(rngs[i] is None for i in sampled):
            raise InputError(f"sampling needs one generator per row ({B} rows)")
        groups: dict[tuple, list[int]] = {}
        for i in sampled:
            o = row_opts[i]
            groups.setdefault((o.temperature, o.top_k, o.top_p), []).append(i)
        dist = {}
        for rows in groups.values():
            z = np.stack([penalised[i] if i in penalised else scores[i] for i in rows])
            dist.update(zip(rows, probabilities(z, row_opts[rows[0]])))
        for i in sampled:  # row order: one generator shared by several rows draws as it always did
            tokens[i] = draw(dist[i], rngs[i])

    lps = np.full(B, np.nan)
    top = [None] * B
    rows = np.flatnonzero(want_lp)
    if len(rows):
        lg = logits if len(rows) == B else logits[rows]
        lse = logsumexp(lg)[:, 0]
        lps[rows] = lg[np.arange(len(rows)), tokens[rows]].astype(np.float64) - lse
        for k in np.unique(tops[rows]):  # rows asking for the same number of top tokens together
            if k <= 0:
                continue
            sel = np.flatnonzero(tops[rows] == k)  # positions in lg
            sub, k = lg[sel], int(min(k, lg.shape[-1]))
            best = np.argpartition(-sub, min(k, lg.shape[-1] - 1), axis=-1)[:, :k]
            for j, row, b in zip(sel.tolist(), sub, best):
                b = b[np.argsort(-row[b], kind="stable")]
                top[int(rows[j])] = {int(t): float(row[t]) - float(lse[j]) for t in b}
    return Choice(tokens, lps, top)


def choose(logits: np.ndarray, opts: SamplingOptions, rngs: Sequence[np.random.Generator] | None = None,
           seen: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Next token per row of ``logits`` (B, V): processors of ``opts``, then argmax (greedy) or a
    draw from row i's generator ``rngs[i]``; ``seen[i]``: row i's tokens so far (for the penalty).
    The tokens of ``choose_rows`` (no log-probabilities)."""
    return choose_rows(logits, opts, rngs, seen).tokens


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
