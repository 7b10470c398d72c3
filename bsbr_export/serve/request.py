"""What the scheduler takes and gives back: a ``GenRequest`` (one completion's prompt, limits and
sampling, then the scheduler's own bookkeeping of it) and the ``Event`` objects its ``sink``
gets, one per token and one at its end. Apart from ``scheduler.py`` so that the modules the
scheduler calls (``scored``) and the routes that build requests import them without it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..runtime.sampling import SamplingOptions


@dataclass
class Event:
    """One new token of a request (``token`` >= 0), or its end (``finish_reason`` set).

    piece: the text the token adds (held back while a character or a possible stop string is
    incomplete); logprob: the model's log-probability of the token (log_softmax of the raw
    logits); top: {token: logprob} of the ``top_logprobs`` most likely tokens (when asked);
    margin: the gap between the two largest logits of the step (near-ties explain rare
    differences between batched and lone runs). logprob, top and margin are computed only for a
    request with ``logprobs`` (0.0, None and inf otherwise). The last event of a request carries
    ``finish_reason`` ("stop", "length", "cancelled", "error") and, for "error", ``error``.
    """

    token: int = -1
    piece: str = ""
    logprob: float = 0.0
    top: dict | None = None
    margin: float = float("inf")
    finish_reason: str | None = None
    error: str | None = None
    prompt: object = None  # a scored prompt's ``scoring.TokenScores``, before its first token (``scored``)


@dataclass(eq=False)
class GenRequest:
    """What one completion asks of the scheduler (prompt already tokenized and checked)."""

    ids: np.ndarray
    max_tokens: int
    sink: Callable[[Event], None]
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int | None = None
    stop: tuple = ()
    stop_tokens: frozenset = frozenset()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    logprobs: bool = True  # compute each token's log-probability (and the top ones, margin) for the events
    forks: int = 0  # requests submitted right after this one that take its prompt's state (n completions)
    score_prompt: bool = False  # its prompt's log-probabilities too (echo with logprobs: ``scored``); max_tokens >= 0
    logit_bias: tuple | None = None  # (token ids, biases) added to the logits (serve.penalties)
    min_tokens: int = 0  # no stop token, no stop string before this many tokens
    skip_special_tokens: bool = True  # special tokens add no text
    # set by the scheduler
    leader: "GenRequest | None" = None  # a follower's leader, until the leader's prompt is in
    followers: list = field(default_factory=list)
    cached: int = 0  # prompt tokens taken from the prefix cache (or from the leader)
    ready: np.ndarray | None = None  # the prompt's last logits, when the cache held the whole prompt
    snaps: list = field(default_factory=list)  # snapshots taken in the prefill, committed once it is in
    id: int = -1
    row: int = -1
    fed: int = 0  # prompt tokens already in the row's state
    pending: int = -1  # sampled token not yet fed to the model
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    reserved: int = 0  # bytes of state memory held for the request's bank
    rng: np.random.Generator | None = None  # the request's own generator (seeded with ``seed``)
    detok: object = None  # its ``runtime.text.Detokenizer``
    counts: np.ndarray | None = None  # generated-token counts (presence/frequency penalties only)
    scorer: object = None  # its ``scoring.PromptScorer`` as its prompt's pieces are fed (score_prompt)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (thread-safe; the row is freed next iteration)."""
        self.cancelled = True
