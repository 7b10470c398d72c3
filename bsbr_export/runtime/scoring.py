"""Prompt log-probabilities: every token's log-probability given the tokens before it.

The extend graph returns the logits of the positions its ``logit_rows`` input names
(``ops.state.LOGIT_ROWS``): each row's last new token for generation, every position of a piece
for scoring. ``Engine.extend(..., every=...)`` asks for every position of some rows; a
``PromptScorer`` turns each piece's logits into the log-probability of the token that follows
each position (and the ``top`` most likely tokens) and keeps only those, so memory stays bounded
whatever the prompt's length: pieces of at most ``score_tokens(vocab)`` tokens in one call (their
logits at most ``SCORE_LOGIT_BYTES``), and the log-softmax over the vocabulary taken ``BLOCK``
positions at a time. ``score_prefill`` is ``Engine.prefill`` with scores; ``Runtime.score`` and the
server's ``echo`` with ``logprobs`` use it.

Torch-free: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..ops.state import LOGIT_ROWS
from .prefix import PREFILL_TOKENS, next_pieces

# The most bytes of logits one scoring extend call returns: pieces of up to 333 tokens at GPT-2's
# vocabulary, against 4,096 x 50,257 x 4 = 785 MiB for a whole 4,096-token prompt. The peak over a
# plain prefill grows with it, and time with the number of extend calls (docs/results/echo-memory.md,
# 4,096 tokens at GPT-2 small shape: 44 MiB more and 1.7x the prefill's time at 64 MiB, 393 MiB
# more and 1.5x at 256 MiB).
SCORE_LOGIT_BYTES = 64 << 20
BLOCK = 64  # positions per log-softmax over the vocabulary
NO_SCORES = ("this export's extend graph returns only the last token's logits, so it cannot score prompts; "
             "re-export it with this version of bsbr-export")


def score_tokens(vocab: int, max_tokens: int = 1 << 30) -> int:
    """Tokens one scoring extend call may feed in all: its logits fit in ``SCORE_LOGIT_BYTES``."""
    return max(1, min(int(max_tokens), SCORE_LOGIT_BYTES // (4 * int(vocab))))


@dataclass
class TokenScores:
    """One sequence's scores. tokens: its ids (T,); logprobs (T,) float64: log p(tokens[t] |
    tokens[:t]), NaN at t = 0 (nothing precedes the first token); top_ids / top_logprobs (T, k):
    the k most likely tokens at each position and their log-probabilities, most likely first
    (row 0 unused: -1 / NaN), or None when k = 0."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @property
    def total(self) -> float:
        """The sequence's log-likelihood after its first token: sum of logprobs[1:]."""
        return float(self.logprobs[1:].sum())

    def top(self, t: int) -> dict[int, float] | None:
        """{token: logprob} of the most likely tokens at position t (None at t = 0 or k = 0)."""
        if self.top_ids is None or t == 0:
            return None
        return {int(i): float(lp) for i, lp in zip(self.top_ids[t], self.top_logprobs[t])}


def log_softmax_pick(logits: np.ndarray, targets: np.ndarray, k: int = 0):
    """For each row of ``logits`` (n, V): log_softmax at ``targets`` (n,) (float64), and the ``k``
    largest log-probabilities with their ids (n, k), most likely first. The log-softmax is taken
    ``BLOCK`` rows at a time, so no second (n, V) array is made."""
    n, k_ = len(logits), min(k, logits.shape[-1])
    lp = np.empty(n, np.float64)
    ids = np.empty((n, k_), np.int64)
    tops = np.empty((n, k_), np.float64)
    for a in range(0, n, BLOCK):
        x = logits[a:a + BLOCK]
        m = x.max(-1, keepdims=True)
        lse = (np.log(np.exp(x - m).sum(-1, dtype=np.float64)) + m[:, 0]).astype(np.float64)
        rows = np.arange(len(x))
        lp[a:a + len(x)] = x[rows, targets[a:a + len(x)]] - lse
        if k_ == 1:  # lm-eval's logprobs=1: an argmax
            best = x.argmax(-1)[:, None]
        elif k_:
            best = np.argpartition(-x, k_ - 1, axis=-1)[:, :k_]
            order = np.argsort(-np.take_along_axis(x, best, -1), axis=-1, kind="stable")
            best = np.take_along_axis(best, order, -1)
        if k_:
            ids[a:a + len(x)] = best
            tops[a:a + len(x)] = np.take_along_axis(x, best, -1) - lse[:, None]
    return lp, ids, tops


class PromptScorer:
    """One row's scores, piece by piece: ``add(logits)`` with the logits (n, V) of the row's next
    n positions (in order), ``result()`` once every position but the last has been added (the
    last predicts the first generated token, which is not part of the prompt)."""

    def __init__(self, ids, top: int = 0):
        self.ids = np.asarray(ids, np.int64)
        self.k, self.done = int(top), 0
        T = len(self.ids)
        self.logprobs = np.full(T, np.nan)
        self.top_ids = np.full((T, self.k), -1, np.int64) if self.k else None
        self.top_lps = np.full((T, self.k), np.nan) if self.k else None

    def add(self, logits: np.ndarray) -> None:
        n = min(len(logits), len(self.ids) - 1 - self.done)  # positions whose next token is known
        if n > 0:
            at = slice(self.done + 1, self.done + 1 + n)
            lp, ids, tops = log_softmax_pick(logits[:n], self.ids[at], self.k)
            self.logprobs[at] = lp
            if self.k:
                self.top_ids[at], self.top_lps[at] = ids, tops
        self.done += len(logits)

    def result(self) -> TokenScores:
        return TokenScores(self.ids, self.logprobs, self.top_ids, self.top_lps)


def score_prefill(engine, st, rows, ids_list, top: int = 0, max_tokens: int | None = None):
    """``Engine.prefill`` of ``ids_list`` into ``rows`` with every token's log-probability:
    returns (the logits of each row's last token (len(rows), V), one ``TokenScores`` per row).
    Pieces of at most ``score_tokens`` tokens in all per extend call (``max_tokens`` lowers it)."""
    if not can_score(engine):
        raise InputError(NO_SCORES)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    seqs = [engine._check_ids(x) for x in ids_list]
    if len(rows) != len(seqs) or len(rows) == 0:
        raise InputError(f"score needs one token list per row, got {len(rows)} rows and {len(seqs)} lists")
    engine._check_room(st, rows, [len(x) for x in seqs])
    per_call = score_tokens(engine.vocab_size, max_tokens or PREFILL_TOKENS)
    scorers = [PromptScorer(x, top) for x in seqs]
    out = np.empty((len(rows), engine.vocab_size), dtype=np.float32)
    done = [0] * len(rows)
    while True:
        sel, pieces = next_pieces(seqs, done, per_call)
        if not sel:
            return out, [s.result() for s in scorers]
        last, every = engine.extend(st, rows[sel], pieces, every=[True] * len(sel))
        for j, i in enumerate(sel):
            scorers[i].add(every[j])
            done[i] += len(pieces[j])
            if done[i] == len(seqs[i]):
                out[i] = last[j]


def can_score(engine) -> bool:
    """Whether ``engine``'s extend graph takes ``logit_rows`` (an export made before it returns the
    last token's logits only; an engine without ONNX sessions cannot score either)."""
    sessions = getattr(engine, "sessions", None)
    return bool(sessions) and LOGIT_ROWS in {i.name for i in sessions["extend"].get_inputs()}


def logit_rows(engine, lengths: np.ndarray, T: int, every):
    """What ``Engine.extend`` binds for a piece of ``lengths`` (B,) tokens padded to T: the
    ``logit_rows`` feed (every position of the rows where ``every`` is true, the last one of the
    others; {} for an export without that input), the logits buffer (rows, V), and how many rows
    each row gets (B,)."""
    every = np.zeros(len(lengths), bool) if every is None else np.asarray(every, bool)
    able = can_score(engine)
    if every.any() and not able:
        raise InputError(NO_SCORES)
    counts = np.where(every, lengths, 1)
    flat = [b * T + (np.arange(n) if a else np.array([n - 1])) for b, (n, a) in enumerate(zip(lengths, every))]
    feed = {LOGIT_ROWS: np.concatenate(flat).astype(np.int64)} if able else {}
    return feed, np.empty((int(counts.sum()), engine.vocab_size), np.float32), counts


def split_rows(logits: np.ndarray, counts: np.ndarray, every):
    """The extend graph's logits (sum(counts), V) -> (each row's last (B, V), [each row's every
    position (n, V) where ``every`` is true, else None])."""
    ends = np.cumsum(counts)
    return logits[ends - 1], [logits[e - n:e] if a else None for e, n, a in zip(ends, counts, every)]
