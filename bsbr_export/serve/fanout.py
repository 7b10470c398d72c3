"""Several completions of one prompt (``n``, ``best_of``) and the usage they report.

A prompt asked for k = ``best_of`` (else ``n``) completions becomes k scheduler requests: the
first (the leader) is prefilled once and the others take its state (``GenRequest.forks``), each
seeded ``seed + j`` so that choice j equals a single request seeded ``seed + j``. With
``best_of`` > ``n`` the n completions with the highest summed log-probability are returned,
as OpenAI does. Choices are indexed prompt-major: prompt i's j-th choice is ``i * n + j``.
"""

from __future__ import annotations

import dataclasses

from .protocol import APIError


def per_prompt(body) -> int:
    """Completions drawn per prompt: ``best_of``, else ``n`` (checked: 400 naming the field)."""
    n = 1 if body.n is None else body.n
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", param="n", code="invalid_value")
    k = n if getattr(body, "best_of", None) is None else body.best_of  # chat has no best_of
    if k < n:
        raise APIError(400, f"best_of ({k}) must be >= n ({n})", param="best_of", code="invalid_value")
    if k > n and body.stream:
        raise APIError(400, "best_of cannot be used with stream (the best choices are known only at the end)",
                       param="best_of", code="unsupported_value")
    return k


def expand(reqs: list, k: int, sink) -> list:
    """k requests per prompt request (prompt-major); ``sink(index, event)`` gets each one's events."""
    if k == 1:
        return reqs
    out = []
    for i, r in enumerate(reqs):
        for j in range(k):
            out.append(dataclasses.replace(
                r, sink=(lambda ev, x=i * k + j: sink(x, ev)), forks=k - 1 if j == 0 else 0,
                seed=None if r.seed is None else r.seed + j, logprobs=True, tokens=[], followers=[], snaps=[]))
    return out


def best(choices: list, n: int, k: int) -> list:
    """The n choices of each prompt with the highest summed log-probability, re-indexed."""
    if k == n:
        return choices
    out = []
    for i in range(len(choices) // k):
        group = sorted(choices[i * k:(i + 1) * k], key=lambda ch: -ch.logprob_sum)[:n]
        for j, ch in enumerate(group):
            ch.index = i * n + j
            out.append(ch)
    return out


def usage(choices: list, reqs: list, k: int) -> dict:
    """Prompt tokens once per prompt (and how many of them came from the prefix cache), the
    tokens of every completion drawn."""
    leaders = reqs[::k]
    p = sum(int(r.ids.size) for r in leaders)
    c = sum(len(r.tokens) for r in reqs) if reqs else sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(int(r.cached) for r in leaders)}}
