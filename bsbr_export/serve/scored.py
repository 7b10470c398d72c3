"""The scheduler's side of prompt log-probabilities (``echo`` with ``logprobs``).

A request with ``score_prompt`` is prefilled like any other, in the same ``extend`` calls as the
other rows, but asks for every position's logits (``Engine.extend(..., every=...)``); its
``PromptScorer`` keeps only each token's log-probability and the top ones. Its prompt is never
taken from the prefix cache (every position must be computed). Once its prompt is in, it and
the followers that take its state (``n`` completions) get an event with ``prompt`` (its
``scoring.TokenScores``) before their first token; with ``max_tokens`` 0 they end there.
"""

from __future__ import annotations

from ..runtime.scoring import PromptScorer, score_tokens
from .request import Event


class ScoreBudget:
    """Caps the pieces of scored prompts in one extend call so that their logits stay within
    ``scoring.SCORE_LOGIT_BYTES`` (at least one token per scored row, so each still advances)."""

    def __init__(self, vocab: int):
        self.left = score_tokens(vocab)

    def __call__(self, r, end: int) -> int:
        if not r.score_prompt:
            return end
        end = max(r.fed + 1, min(end, r.fed + self.left))
        self.left -= end - r.fed
        return end


def extend(engine, st, rows, pieces, reqs):
    """``engine.extend`` of the pieces; every position's logits of the scored requests go to their
    scorers. Returns each row's last logits (len(rows), V)."""
    every = [r.score_prompt for r in reqs]
    if not any(every):
        return engine.extend(st, rows, pieces)
    last, alls = engine.extend(st, rows, pieces, every=every)
    for r, a in zip(reqs, alls):
        if a is not None:
            r.scorer = r.scorer or PromptScorer(r.ids, r.top_logprobs)
            r.scorer.add(a)
    return last


def prompts_in(sched, reqs: list, done: list) -> list:
    """After a prefill step, for the requests ``reqs[j]``, j in ``done``, whose prompt is in: the
    scored ones and their followers get their prompt's event; those with ``max_tokens`` 0 end
    ("length"). Returns the indices in ``done`` left to sample."""
    ended = []
    for j in done:
        r = reqs[j]
        if not r.score_prompt:
            continue
        group = [r] + [f for f in r.followers if f.leader is r and sched._rows[f.row] is f]
        scores = r.scorer.result()
        for x in group:
            sched._emit(x, Event(prompt=scores))
        if r.max_tokens == 0:
            ended.append(j)
            with sched._cv:
                for x in group:
                    sched._finish(x, "length")
    return [j for j in done if j not in ended]
