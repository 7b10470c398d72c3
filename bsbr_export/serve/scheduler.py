"""Continuous batching over the ONNX Runtime engine: one loop thread, one State of ``max_batch`` rows.

The loop thread is the only caller of the ``Engine`` (its ORT sessions and its ``State``). Other
threads (the HTTP server's event loop) hand it ``GenRequest`` objects through ``submit`` and get
``Event`` objects back through each request's ``sink`` callable, called on the loop thread.

One iteration of the loop:

1. frees the rows of cancelled requests (a client that went away) and admits waiting requests
   into free rows (row reset to position 0);
2. prefills: rows whose prompt is not all fed get their next piece, ``prefill_chunk`` tokens in
   all per iteration (FIFO over the rows, ragged pieces in one ``extend`` call; while no row is
   decoding, up to ``IDLE_PREFILL_CHUNK``, as there is no stream to stall and longer pieces run
   faster); a row whose prompt is complete samples its first token from the piece's last logits;
3. decodes: every row that holds a sampled, not yet fed token advances by one (``decode`` with
   the ``active`` mask, so rows mid-prefill and free rows keep their state), then samples.

State memory: the engine holds each row's K/V/S buffers (``max_batch`` rows, allocated at
start) and each row's bank of closed chunks, which is what grows with context. A request is
admitted only when the bank it will need at its longest (prompt + ``max_tokens``) fits in
``state_memory`` beside what the running rows reserved; the engine allocates that bank at
admission (``Engine.reserve``), so a request never fails for memory mid-generation, and it is
freed when the request ends. A request that does not fit waits in the queue (FIFO).

An admitted request starts from the longest state in the prefix cache its prompt begins with
(``runtime.prefix``). ``n`` completions of one prompt: the leader is prefilled, then its state is
copied into its followers' rows (admitted with it); each samples with its own generator.

Failures (``serve.failures``): a failed engine call ends only the requests of the rows it touched
(a generic error); the loop outlives any step; if its thread ends, ``submit`` refuses (503).

So a long prompt is fed in pieces between decode steps: running streams wait at most one piece
per token. A finished row (stop token, stop string, ``max_tokens``) is freed in the same
iteration. Each request samples with its own options and its own ``numpy`` generator
(``runtime.sampling``), and its text comes from its own ``runtime.text.Detokenizer``, so what a
request gets does not depend on the other rows of the batch (up to float rounding of batched
matmuls: greedy tokens can differ only where the top two logits are within rounding).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import numpy as np

from ..errors import InputError
from ..runtime import prefix
from ..runtime.sampling import choose_rows
from . import scored
from .failures import ENGINE_ERROR, FailureHandling, QueueFull, ShuttingDown, log  # noqa: F401 (clients' imports)
from .penalties import processed_logits
from .request import Event, GenRequest
from .state_memory import _check_budget, check_state_memory, default_bank_memory, held_tokens  # noqa: F401

PREFILL_CHUNK = 256  # prompt tokens fed per loop iteration (all prefilling rows together)
IDLE_PREFILL_CHUNK = 2048  # the same while no row is decoding (no stream to stall; longer pieces run faster)


class Scheduler(FailureHandling):
    """Continuous batching of ``GenRequest`` over an ``Engine`` (see the module docstring).

    engine: a ``runtime.engine.Engine``; tokenizer: a ``runtime.text.Tokenizer``; metrics: an
    object with the hooks of ``serve.metrics.Metrics`` (or None).
    """

    def __init__(self, engine, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, metrics=None, state_memory: int | None = None,
                 prefix_cache: int = 0):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = int(engine.max_len)
        self.state = engine.new_state(max_batch)
        fixed = self.state.nbytes()  # every row's K/V/S buffers, allocated now
        if state_memory is None:
            state_memory = fixed + default_bank_memory()
        _check_budget(state_memory, fixed, max_batch)
        self.state_memory, self.bank_budget, self.reserved = state_memory, state_memory - fixed, 0
        self._rows: list[GenRequest | None] = [None] * max_batch
        self._waiting: deque[GenRequest] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._accepting, self._stop = True, False
        self.steps = {"prefill": 0, "decode": 0}
        self.cache = prefix.PrefixCache(engine, prefix_cache)
        self.prompt_tokens_computed = 0
        self._thread = threading.Thread(target=self._run, name="bsbr-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ other threads
    def submit(self, *reqs: GenRequest) -> None:
        """Queue requests (all or none): ``QueueFull`` past ``max_queue`` waiting requests,
        ``ShuttingDown`` once ``stop`` has begun; ``InputError`` for a request that cannot fit."""
        for r in reqs:
            if len(r.ids) == 0 or r.max_tokens < (0 if r.score_prompt else 1):
                raise InputError("a scheduled request needs >= 1 prompt token and max_tokens >= 1")
            if held_tokens(r) > self.max_len:  # its last token is never fed: it takes no room
                raise InputError(f"prompt ({len(r.ids)} tokens) + max_tokens {r.max_tokens} exceeds the export's "
                                 f"maximum of {self.max_len} tokens (+ 1: the last token is not fed)")
            if r.forks + 1 > self.max_batch:
                raise InputError(f"{r.forks + 1} completions of one prompt exceed the server's --max-batch "
                                 f"{self.max_batch}")
            need = self.engine.bank_bytes(held_tokens(r))
            if need > self.bank_budget:
                raise InputError(f"prompt ({len(r.ids)} tokens) + max_tokens {r.max_tokens} needs {need / 2**20:.1f} MiB "
                                 f"of state, over the server's state memory for one request "
                                 f"({self.bank_budget / 2**20:.1f} MiB beside the rows' buffers)")
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if not self._thread.is_alive():
                raise ShuttingDown("the server's scheduler is not running")
            if len(self._waiting) + len(reqs) > self.max_queue + self.free_rows_locked():
                if self.metrics:
                    self.metrics.rejected(len(reqs))
                raise QueueFull(f"{len(self._waiting)} requests waiting (--max-queue {self.max_queue})")
            now = time.perf_counter()
            for r in reqs:
                r.id, r.t_submit = next(self._ids), now
                self._waiting.append(r)
            self._cv.notify()

    def cancel(self, req: GenRequest) -> None:
        req.cancel()
        with self._cv:
            self._cv.notify()

    def free_rows_locked(self) -> int:
        return sum(r is None for r in self._rows)

    def free_rows(self) -> int:
        """Rows of the running batch that hold no request."""
        with self._cv:
            return self.free_rows_locked()

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    def active(self) -> int:
        """Requests holding a row (prefilling or decoding)."""
        return self.max_batch - self.free_rows()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop accepting; let requests in flight finish for up to ``drain_s`` seconds, cancel
        the rest (their last event: finish_reason "cancelled"), then end the loop thread."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        end = time.monotonic() + max(0.0, drain_s)
        while time.monotonic() < end and (self.queue_depth() or self.active()):
            time.sleep(0.02)
        with self._cv:
            for r in [*self._waiting, *(r for r in self._rows if r is not None)]:
                r.cancel()
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=max(5.0, drain_s))

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and all(r is None for r in self._rows):
                        self._cv.wait()
                    if self._stop:
                        self._drop_all()
                        return
                    self._guarded(self._admit)
                self._guarded(self._prefill)
                self._guarded(self._decode)
                if self.metrics:
                    self._guarded(self.metrics.sample, self)
        except BaseException:  # the loop cannot go on: end what it holds and refuse new requests
            log.critical("the scheduler loop stopped", exc_info=True)
            self._died()

    def _admit(self) -> None:
        """Free the rows of cancelled requests and fill free rows from the queue (lock held)."""
        for r in self._rows:
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")
        if any(r.cancelled for r in self._waiting):
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
        free = [i for i, r in enumerate(self._rows) if r is None]
        fresh = []
        while free and self._waiting:
            head = self._waiting[0]
            group = [self._waiting[k] for k in range(min(1 + head.forks, len(self._waiting)))]
            need = [self.engine.bank_bytes(held_tokens(r)) for r in group]
            if len(free) < len(group) or self.reserved + sum(need) > self.bank_budget:
                break  # waits until running requests end and free their rows and banks
            for r, nb in zip(group, need):
                self._waiting.popleft()
                r.row = free.pop(0)
                r.reserved, self.reserved = nb, self.reserved + nb
                r.rng = np.random.default_rng(r.seed)
                r.detok = self.tokenizer.detokenizer(() if r.min_tokens else r.stop, r.skip_special_tokens)
                r.counts = np.zeros(self.engine.vocab_size, np.int64) if (r.presence_penalty or r.frequency_penalty) else None
                self._rows[r.row] = r
                fresh.append(r.row)
            for f in group[1:]:
                f.leader = head
                head.followers.append(f)
        if fresh:
            try:
                self._start_rows(fresh)
            except Exception:
                self._fail_rows([self._rows[row] for row in fresh])

    def _start_rows(self, fresh: list[int]) -> None:
        """Reset the admitted rows, reserve their banks and restore their cached prefixes."""
        self.engine.reset_rows(self.state, fresh)
        for row in fresh:
            r = self._rows[row]
            self.engine.reserve(self.state, row, held_tokens(r))
            if r.leader is None and self.cache.enabled and not r.score_prompt:  # scored: all computed
                snap = self.cache.lookup(r.ids)
                if snap is not None:
                    prefix.restore(self.engine, self.state, row, snap)
                    r.fed = r.cached = snap.position
                    if snap.position == len(r.ids):
                        r.ready = snap.logits

    def _prefill(self) -> None:
        ready = [r for r in self._rows if r is not None and r.ready is not None]
        if ready:  # the whole prompt was cached: the first token needs no model call
            touched = _with_followers(ready)
            try:
                logits = np.stack([r.ready for r in ready])
                for r in ready:
                    r.ready = None
                self._prompt_done(ready, logits)
            except Exception:
                self._fail_rows(touched)
        decoding = any(r is not None and r.pending >= 0 for r in self._rows)
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, IDLE_PREFILL_CHUNK)
        rows, pieces, reqs = [], [], []
        L, snapping = self.engine.chunk, self.cache.budget > 0
        cap = scored.ScoreBudget(self.engine.vocab_size)  # scored prompts' pieces: bounded logits
        for r in sorted((r for r in self._rows if r is not None and r.leader is None and r.fed < len(r.ids)),
                        key=lambda r: r.id):
            if budget <= 0:
                break
            end = cap(r, min(r.fed + budget, prefix.next_cut(r.fed, len(r.ids), L, self.cache.interval) if snapping
                             else len(r.ids)))
            rows.append(r.row)
            pieces.append(r.ids[r.fed:end])
            reqs.append(r)
            budget -= end - r.fed
        if not rows:
            return
        touched = _with_followers(reqs)
        try:
            t0 = time.perf_counter()
            logits = scored.extend(self.engine, self.state, rows, pieces, reqs)  # engine.extend (+ scored prompts)
            self.steps["prefill"] += 1
            self.prompt_tokens_computed += sum(len(p) for p in pieces)
            if self.metrics:
                self.metrics.step("prefill", time.perf_counter() - t0, sum(len(p) for p in pieces))
            done = []
            for j, (r, p) in enumerate(zip(reqs, pieces)):
                r.fed += len(p)
                n = len(r.ids)
                if snapping and r.fed in prefix.snapshot_points(n, L, self.cache.interval):
                    r.snaps.append(prefix.capture(self.engine, self.state, r.row, r.ids[:r.fed],
                                                  logits[j] if r.fed == n else None))
                if r.fed == n:
                    done.append(j)
            done = scored.prompts_in(self, reqs, done)  # scored prompts' events; max_tokens 0 ends them
            if done:
                self._prompt_done([reqs[j] for j in done], logits if len(done) == len(reqs) else logits[done])
        except Exception:  # ends the rows this piece touched (and followers waiting on them), not the others
            self._fail_rows(touched)

    def _prompt_done(self, reqs: list[GenRequest], logits: np.ndarray) -> None:
        """The prompts of ``reqs`` are in: commit their snapshots, hand each leader's state to its
        followers, then sample every one of them."""
        pairs = []  # (request, its row of ``logits``)
        for j, r in enumerate(reqs):
            if r.snaps:
                self.cache.commit(self.state, r.row, r.snaps)
            live = [f for f in r.followers if f.leader is r and self._rows[f.row] is f]
            if live:
                self.engine.copy_rows(self.state, r.row, [f.row for f in live])
            for f in live:
                self.engine.reserve(self.state, f.row, held_tokens(f))
                f.leader, f.fed, f.cached = None, len(f.ids), len(f.ids)
            pairs += [(r, j)] + [(f, j) for f in live]
            r.followers, r.snaps = [], []
        rows = [j for _, j in pairs]
        self._sample([r for r, _ in pairs], logits if rows == list(range(len(logits))) else logits[rows])

    def _decode(self) -> None:
        reqs = [r for r in self._rows if r is not None and r.pending >= 0]
        if not reqs:
            return
        tokens = np.zeros(self.max_batch, np.int64)
        active = np.zeros(self.max_batch, bool)
        for r in reqs:
            tokens[r.row], active[r.row] = r.pending, True
        try:
            t0 = time.perf_counter()
            logits = self.engine.decode(self.state, tokens, active)
            self.steps["decode"] += 1
            if self.metrics:
                self.metrics.step("decode", time.perf_counter() - t0, len(reqs))
            for r in reqs:
                r.pending = -1
            rows = [r.row for r in reqs]
            self._sample(reqs, logits if rows == list(range(len(logits))) else logits[rows])
        except Exception:  # ends the rows this step touched (the decoding ones), not those mid-prefill
            self._fail_rows(reqs)

    def _sample(self, reqs: list[GenRequest], logits: np.ndarray) -> None:
        """Choose the next token of each request of ``reqs`` from its row of ``logits``
        (len(reqs), V), all in one ``choose_rows`` call (each request with its own options,
        generator and log-probability wish), then emit each token and end the rows that are done."""
        live = []
        for j, r in enumerate(reqs):
            if r.cancelled:
                with self._cv:
                    self._finish(r, "cancelled")
            else:
                live.append(j)
        if not live:
            return
        if len(live) < len(reqs):
            reqs, logits = [reqs[j] for j in live], logits[live]
        proc = processed_logits(logits, reqs)
        seen = [np.concatenate([r.ids, np.asarray(r.tokens, np.int64)]) if r.opts.repetition_penalty else None
                for r in reqs]
        want = [r.logprobs for r in reqs]  # log-probabilities, top ones and margin only for those who ask
        got = choose_rows(logits, [r.opts for r in reqs], [r.rng for r in reqs], seen, logprobs=want,
                          top_logprobs=[r.top_logprobs if r.logprobs else 0 for r in reqs], processed=proc)
        margins = np.full(len(reqs), np.inf)
        if any(want):
            asked = np.flatnonzero(want)
            top2 = np.partition(logits if len(asked) == len(reqs) else logits[asked], -2, axis=-1)[:, -2:]
            margins[asked] = top2[:, 1] - top2[:, 0]
        for j, r in enumerate(reqs):
            self._emit_token(r, int(got.tokens[j]), float(got.logprobs[j]) if r.logprobs else 0.0, got.top[j],
                             float(margins[j]))

    def _emit_token(self, r: GenRequest, tok: int, lp: float, top: dict | None, margin: float) -> None:
        """Record ``r``'s new token, emit it, and end the row if done."""
        r.tokens.append(tok)
        if r.counts is not None:
            r.counts[tok] += 1
        now = time.perf_counter()
        if self.metrics:
            self.metrics.token(now - (r.t_last if r.t_last is not None else r.t_submit), first=r.t_last is None)
        r.t_first = r.t_first if r.t_first is not None else now
        r.t_last = now
        reason = None
        if r.min_tokens and len(r.tokens) == r.min_tokens and r.stop:
            r.detok.arm(r.stop)  # stop strings count from here on
        if tok in r.stop_tokens:
            piece, reason = r.detok.finish(), "stop"
        else:
            piece, hit = r.detok.push(tok)
            if hit:
                reason = "stop"
            elif len(r.tokens) >= r.max_tokens:
                piece, reason = piece + r.detok.finish(), "length"
        self._emit(r, Event(tok, piece, lp, top, margin))
        if reason is not None:
            with self._cv:
                self._finish(r, reason)
        else:
            r.pending = tok

    def _finish(self, r: GenRequest, reason: str, error: str | None = None) -> None:
        """End ``r``: free its row at once and send its last event (lock held). A request that
        ended normally leaves the state of its generation in the prefix cache."""
        for f in r.followers:  # followers of a leader that ends before its prompt is in prefill themselves
            if f.leader is r:
                f.leader = None
        r.followers, r.snaps = [], []
        if r.row >= 0 and self._rows[r.row] is r and reason in ("stop", "length") and self.cache.budget > 0:
            tokens = np.concatenate([r.ids, np.asarray(r.tokens[:-1], np.int64)])
            try:
                if int(self.state.positions[r.row]) == tokens.size:
                    self.cache.commit(self.state, r.row, [prefix.capture(self.engine, self.state, r.row, tokens)])
            except Exception:
                log.exception("caching the state of row %d failed", r.row)
        if r.row >= 0 and self._rows[r.row] is r:
            self._rows[r.row] = None
            self.reserved -= r.reserved
            try:
                self.engine.reset_rows(self.state, [r.row])  # frees its bank (admission resets it again)
            except Exception:
                log.exception("freeing row %d failed", r.row)
        r.pending, r.finish_reason = -1, reason
        if self.metrics:
            self.metrics.finished(reason)
        self._emit(r, Event(finish_reason=reason, error=error))

    def _drop_all(self) -> None:
        for r in [*self._waiting, *(r for r in self._rows if r is not None)]:
            self._finish(r, "cancelled")
        self._waiting.clear()

    @staticmethod
    def _emit(r: GenRequest, ev: Event) -> None:
        try:
            r.sink(ev)
        except Exception:  # a sink whose consumer is gone (closed event loop): the request is over
            r.cancelled = True


def _with_followers(reqs: list[GenRequest]) -> list[GenRequest]:
    """``reqs`` and the followers that wait for their prompts (their rows take the leaders' state)."""
    return [*reqs, *(f for r in reqs for f in r.followers if f.leader is r)]
