"""The Python runtime: ``load`` an exported directory, then ``generate`` or ``stream`` (torch-free).

    from bsbr_export.runtime import load
    rt = load("out/gpt2-pystdlib", precision="fp32")
    outs = rt.generate(["def parse(", "import os\\n"], max_new_tokens=32)   # new token ids per prompt
    for piece in rt.stream("def parse(", max_new_tokens=32, temperature=0.8, seed=1):
        print(piece, end="", flush=True)

``load`` checks the directory before ONNX Runtime opens anything: every graph of the engine,
the export's state format version and precision, each weights file against the sizes its
graphs' external-data records imply, the tokenizer, and the execution providers. ``generate``
checks prompts and options the same way before its first ORT call; errors are one-line
``InputError``. ONNX Runtime is reached through ``Engine`` (``runtime/engine.py``) only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..ops import state
from . import runners
from . import prefix, scoring
from .engine import GRAPHS, PRECISION_ENGINE, PRECISIONS, Engine, graph_file, read_metadata
from .prefix import PREFILL_TOKENS
from .sampling import SamplingOptions, choose_rows, row_generators
from .scoring import TokenScores, score_prefill
from .text import Tokenizer, check_stop

OPTIMIZATIONS = ("none", "basic", "extended", "all")


@dataclass
class Completion:
    """One prompt's generation (``generate(..., return_details=True)``).

    tokens: the new token ids (with the stop token or the token that completed a stop string,
    when one ended the row); text: their text, cut before a stop string, without the text of a
    stop token; finish_reason: "stop" (a stop token or string) or "length" (max_new_tokens);
    logprobs: log_softmax of the model's logits at each chosen token (before any sampling
    processor); prompt_tokens: the prompt's length in tokens; cached_tokens: how many of them
    came from the prefix cache (or from another choice of the same prompt) instead of being
    computed; prompt: the index of the prompt it answers (with ``n`` > 1, n completions per prompt).
    """

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt: int = 0


@dataclass(frozen=True)
class StreamEvent:
    """One new token of one row: its text piece (possibly empty: held back until a character or
    a possible stop string is complete) and, on the row's last token, its ``Completion``."""

    row: int
    token: int
    piece: str
    logprob: float
    done: Completion | None = None


# --------------------------------------------------------------------------- checking an export

def _tensors(graph) -> Iterator:
    """Every tensor of a graph or function: initializers and tensor attributes, subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _external_data(path: Path) -> list[tuple[str, int, int]]:
    """A graph's external-data records (location, offset, length), without reading the data."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    records = []
    for t in (t for g in (m.graph, *m.functions) for t in _tensors(g)):
        if uses_external_data(t):
            try:
                info = ExternalDataInfo(t)
            except ValueError as e:  # a negative offset or length
                raise InputError(f"{path}: {e}") from None
            if info.length is None:
                raise InputError(f"{path}: tensor {t.name!r} stored outside the graph without a length")
            records.append((info.location, info.offset or 0, info.length))
    return records


def check_export(path, precision: str = "fp32") -> dict:
    """Check an exported directory without ONNX Runtime; returns its metadata. One-line
    ``InputError`` for: no directory, a missing graph, a graph of another state format or
    precision, a missing weights file, a weights file whose size differs from what the
    external-data records of the directory's graphs imply, and a missing tokenizer."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"{d}: no such export directory")
    graphs = [d / graph_file(g, precision) for g in GRAPHS]
    missing = [p.name for p in graphs if not p.is_file()]
    if missing:
        hint = f" (export the {precision} graphs: {PRECISION_ENGINE[precision]})" if precision != "fp32" else ""
        raise InputError(f"{d}: missing graph {', '.join(missing)}{hint}")
    meta = None
    need: dict[str, int] = {}
    for p in graphs:
        try:
            m = read_metadata(p)
        except Exception as e:
            raise InputError(str(e).splitlines()[0]) from None
        fmt = m.get("state", {}).get("format")
        if fmt != state.FORMAT:
            raise InputError(f"{p}: an export of state format {fmt}; this runtime reads format {state.FORMAT} "
                             f"(re-export with this version of bsbr-export)")
        if m.get("precision", "fp32") != precision:
            raise InputError(f"{p}: a {m.get('precision')} graph, asked for {precision}")
        meta = meta or m
        for loc, off, length in _external_data(p):
            if os.path.isabs(loc) or ".." in Path(loc).parts:
                raise InputError(f"{p}: external data outside the export directory ({loc!r})")
            need[loc] = max(need.get(loc, 0), off + length)
    for other in sorted(set(d.glob("*.onnx")) - set(graphs)):  # e.g. model.onnx: its share of the same file
        try:
            records = _external_data(other)
        except InputError:
            continue
        for loc, off, length in records:
            if loc in need:
                need[loc] = max(need[loc], off + length)
    for loc, n in sorted(need.items()):
        f = d / loc
        if not f.is_file():
            raise InputError(f"{d}: missing weights file {loc}")
        size = f.stat().st_size
        if size != n:
            raise InputError(f"{f}: weights file of {size} bytes; its graphs' external-data records need "
                             f"exactly {n} (truncated or from another export)")
    if not any((q / "tokenizer.json").is_file() for q in (d / "bsbr", d)):
        raise InputError(f"{d}: missing bsbr/tokenizer.json")
    return meta


def check_providers(providers) -> list | None:
    """Execution providers: None (the engine's default), or names / (name, options) pairs that
    the installed onnxruntime has (``runners.check_providers``)."""
    return None if providers is None else runners.check_providers(providers)


def load(path, precision: str = "fp32", providers=None, threads: int | None = None, optimization: str = "all",
         session_options: dict | None = None, prepack: bool | str = "decode",
         state_memory: int | None = None, prefix_cache: int = 0) -> "Runtime":
    """Open an exported directory for generation.

    precision: "fp32" (model.onnx's family), "fp16" (the ``_fp16`` graphs) or "int8" (the ``_int8``
    graphs: int8 dense weights, for CPUs); providers: ONNX
    Runtime execution providers (names, or (name, provider options) pairs; default: CUDA when
    present, then CPU); threads: intra-op threads [all cores]; optimization: graph optimisation
    level (none, basic, extended, all); session_options: ORT session configuration entries
    ({key: value}, as ``SessionOptions.add_session_config_entry``); prepack: ORT's weight prepacking
    for the prompt and per-token graphs, which run as one session ("decode", the default: prompts
    and batched decode steps at full speed, one packed copy of the dense weights), for the chunk
    close too (True) or none (False: least memory); state_memory: the most bytes of decode state one
    ``generate`` may hold (its rows' buffers and banks at their longest), checked before anything
    runs (default: no limit); prefix_cache: bytes of prompt states kept for later calls whose
    prompts start with the same tokens (``runtime.prefix``; default 0: off).
    """
    check_export(path, precision)
    if state_memory is not None and (isinstance(state_memory, bool) or not isinstance(state_memory, int)
                                     or state_memory < 1):
        raise InputError(f"state_memory must be a number of bytes >= 1, got {state_memory!r}")
    items = check_providers(providers)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    if optimization not in OPTIMIZATIONS:
        raise InputError(f"optimization must be one of {', '.join(OPTIMIZATIONS)}, got {optimization!r}")
    if session_options is not None and not isinstance(session_options, dict):
        raise InputError(f"session_options must be a dict of session configuration entries, got "
                         f"{type(session_options).__name__}")
    engine = Engine(path, precision=precision, providers=items, threads=threads, session_options=session_options,
                    optimization=optimization, prepack=prepack)
    return Runtime(engine, Tokenizer.from_dir(path), state_memory, prefix_cache)


# --------------------------------------------------------------------------- the runtime

class Runtime:
    """Generation over an ``Engine`` and a ``Tokenizer`` (see the module docstring)."""

    def __init__(self, engine, tokenizer: Tokenizer, state_memory: int | None = None, prefix_cache: int = 0):
        self.engine, self.tokenizer, self.state_memory = engine, tokenizer, state_memory
        # Engines of this package (not the torch stepper) keep prompt states between calls.
        self.cache = prefix.PrefixCache(engine, prefix_cache) if isinstance(engine, Engine) else None
        if prefix_cache and self.cache is None:
            raise InputError("prefix_cache needs an ONNX Runtime engine")
        self.prompt_tokens_computed = 0  # prompt tokens fed to the model, over this runtime's life
        self.config, self.max_len, self.vocab_size = engine.config, int(engine.max_len), int(engine.vocab_size)
        self.eos_token_id = tokenizer.eos_token_id

    # ------------------------------------------------------------------ inputs
    def encode(self, prompts) -> list[np.ndarray]:
        """Prompts (a list of str or of token-id lists, or a 2-D id array) -> one int64 array per
        prompt, checked."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            prompts = list(prompts)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise InputError("prompts must be a list of str or of token-id lists (one prompt: [prompt])")
        if not prompts:
            raise InputError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = np.asarray(self.tokenizer.encode(p), dtype=np.int64)
            else:
                ids = np.asarray(p)
                if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                    raise InputError(f"prompt {i}: a str or a flat list of token ids, got {_describe(p)}")
                ids = ids.astype(np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                    raise InputError(f"prompt {i}: token ids must lie in [0, {self.vocab_size}), "
                                     f"got [{ids.min()}, {ids.max()}]")
            if ids.size == 0:
                raise InputError(f"prompt {i} is empty: give at least one token")
            if ids.size > self.max_len:
                raise InputError(f"prompt {i} has {ids.size} tokens, over the export's maximum of {self.max_len}")
            out.append(ids)
        return out

    def _stop_tokens(self, stop_tokens) -> frozenset:
        if stop_tokens is None:
            return frozenset()
        items = [stop_tokens] if isinstance(stop_tokens, (int, np.integer)) else list(stop_tokens)
        for t in items:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise InputError(f"stop tokens must be token ids in [0, {self.vocab_size}), got {t!r}")
        return frozenset(int(t) for t in items)

    # ------------------------------------------------------------------ generation
    def _prepare(self, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                 stop_tokens, n: int = 1) -> dict:
        """Every check of a request, before any ORT call. With ``n`` > 1 every prompt gets n rows
        (prompt-major), each seeded seed + its index among the prompt's choices."""
        opts = SamplingOptions(temperature, top_k, top_p, repetition_penalty)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n must be an integer >= 1, got {n!r}")
        stop, stops = check_stop(stop), self._stop_tokens(stop_tokens)
        ids = self.encode(prompts)
        for i, x in enumerate(ids):
            if x.size + max_new_tokens > self.max_len:
                raise InputError(f"prompt {i} ({x.size} tokens) + max_new_tokens {max_new_tokens} = "
                                 f"{x.size + max_new_tokens} would overflow the state capacity of "
                                 f"{self.max_len} tokens")
        if self.state_memory is not None:
            need = n * sum(self.engine.row_bytes(0) + self.engine.bank_bytes(x.size + max_new_tokens) for x in ids)
            if need > self.state_memory:
                raise InputError(f"{len(ids) * n} rows with max_new_tokens {max_new_tokens} need {need / 2**20:.1f} MiB "
                                 f"of decode state, over state_memory ({self.state_memory / 2**20:.1f} MiB): "
                                 f"generate fewer prompts at once or raise state_memory")
        row_generators(seed, len(ids))  # checks the seeds in one line, as for n = 1
        per_prompt = [seed] * len(ids) if seed is None or isinstance(seed, (int, np.integer)) else list(seed)
        rngs = row_generators([None if s is None else int(s) + j for s in per_prompt for j in range(n)], len(ids) * n)
        return dict(ids=ids, n=int(n), max_new=int(max_new_tokens), opts=opts, rngs=rngs, stop=stop, stops=stops,
                    results=[Completion(prompt_tokens=int(x.size), prompt=i) for i, x in enumerate(ids) for _ in range(n)])

    def stream_batch(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, repetition_penalty: float | None = None, seed=None, stop=None,
                     stop_tokens=None, n: int = 1) -> Iterator[StreamEvent]:
        """Generate for every prompt as one batch; yields a ``StreamEvent`` per new token of each
        row as it is produced (rows in order within a step). Options as ``generate``."""
        req = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                            stop_tokens, n)
        return self._steps(**req)

    def _prefill(self, st, ids, n: int, results) -> np.ndarray:
        """Each prompt once (through the prefix cache when on), then its state copied into the
        rows of its other choices. Logits per row (rows prompt-major)."""
        eng = self.engine
        lead = [i * n for i in range(len(ids))]
        if self.cache is not None:
            logits, cached = prefix.prefill(eng, st, lead, ids, self.cache, PREFILL_TOKENS)
        else:
            logits, cached = eng.prefill(st, lead, ids), [0] * len(ids)
        self.prompt_tokens_computed += sum(x.size - c for x, c in zip(ids, cached))
        for i, c in enumerate(cached):
            for j in range(n):
                results[i * n + j].cached_tokens = c if j == 0 else ids[i].size
        if n == 1:
            return logits
        for i in range(len(ids)):
            eng.copy_rows(st, i * n, list(range(i * n + 1, i * n + n)))
        return np.repeat(logits, n, axis=0)

    def _steps(self, ids, n, max_new, opts, rngs, stop, stops, results) -> Iterator[StreamEvent]:
        B, eng = len(results), self.engine
        if max_new == 0:
            for r in results:
                r.finish_reason = "length"
            return
        prompts = [ids[i // n] for i in range(B)]
        detok = [self.tokenizer.detokenizer(stop) for _ in range(B)]
        seen = [x.tolist() for x in prompts]
        st = eng.new_state(B)
        if hasattr(eng, "reserve"):  # each row's bank at its longest now: nothing grows mid-generation
            for b, x in enumerate(prompts):
                eng.reserve(st, b, x.size + max_new)
        logits = self._prefill(st, ids, n, results)  # in calls of at most PREFILL_TOKENS tokens
        active = np.ones(B, dtype=bool)
        fed = np.zeros(B, dtype=np.int64)
        for _ in range(max_new):
            rows = np.flatnonzero(active)
            rows_logits = logits if len(rows) == B else logits[rows]
            got = choose_rows(rows_logits, opts, [rngs[i] for i in rows], [seen[i] for i in rows], logprobs=True)
            for i, t, lp in zip(rows.tolist(), got.tokens.tolist(), got.logprobs.tolist()):
                r = results[i]
                r.tokens.append(t)
                r.logprobs.append(lp)
                seen[i].append(t)
                fed[i] = t
                if t in stops:
                    piece, r.finish_reason = detok[i].finish(), "stop"
                else:
                    piece, hit = detok[i].push(t)
                    if hit:
                        r.finish_reason = "stop"
                    elif len(r.tokens) == max_new:
                        piece, r.finish_reason = piece + detok[i].finish(), "length"
                if r.finish_reason is not None:
                    r.text, active[i] = detok[i].text, False
                    self._remember(st, i, seen[i][:-1])
                yield StreamEvent(i, t, piece, lp, r if r.finish_reason else None)
            if not active.any():
                return
            logits = eng.decode(st, fed, active)  # rows that finished keep their state

    def _remember(self, st, row: int, tokens) -> None:
        """The end-of-generation snapshot of a finished row (its last sampled token is not in its
        state): the next turn of a conversation, which resends the reply, starts from it."""
        if self.cache is not None and self.cache.budget > 0:
            self.cache.commit(st, row, [prefix.capture(self.engine, st, row, tokens)])

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None, seed=None, stop=None,
                 stop_tokens=None, return_details: bool = False, n: int = 1, best_of: int | None = None):
        """Prompts (list of str or of token-id lists) -> new token ids per prompt, or with
        ``return_details`` one ``Completion`` per prompt.

        temperature 0 is greedy (argmax); top_k, top_p, repetition_penalty as in
        ``runtime.sampling``; seed: an int (each row's generator seeded with it, so a row draws
        the same alone or in any batch) or one seed per prompt; stop: strings that end a row
        (its text is cut before them); stop_tokens: token ids that end a row (e.g.
        ``[rt.eos_token_id]``; none by default, so a row runs to max_new_tokens).
        n: completions per prompt (the prompt is prefilled once and its state copied; choice j
        is seeded seed + j, so it equals a lone call seeded seed + j), returned prompt-major
        (n per prompt); best_of: draw that many per prompt and return the n with the highest
        summed log-probability.
        """
        k = n if best_of is None else best_of
        if best_of is not None and (isinstance(best_of, bool) or not isinstance(best_of, (int, np.integer))
                                    or isinstance(n, bool) or not isinstance(n, (int, np.integer)) or best_of < n):
            raise InputError(f"best_of must be an integer >= n ({n!r}), got {best_of!r}")
        req = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                            stop_tokens, k)
        for _ in self._steps(**req):
            pass
        results = req["results"]
        if k != n:
            ranked = []
            for i in range(len(req["ids"])):
                group = results[i * k:(i + 1) * k]
                ranked += sorted(group, key=lambda r: -sum(r.logprobs))[:n]
            results = ranked
        return results if return_details else [r.tokens for r in results]

    # ------------------------------------------------------------------ saved states
    def save_state(self, prompt, path) -> Path:
        """The state after ``prompt`` (a str or token ids) written to ``path``: taken from the prefix
        cache when it holds it, else computed. ``load_state`` of that file, here or in another
        process over the same export, lets a later prompt that starts with the same tokens
        continue from it without recomputing them."""
        if self.cache is None:
            raise InputError("saved states need an ONNX Runtime engine")
        ids = self.encode([prompt])[0]
        snap = self.cache.find(ids) if self.cache.enabled else None
        if snap is None or snap.position != ids.size:
            st = self.engine.new_state(1)
            self.engine.reserve(st, 0, ids.size)
            logits = self.engine.prefill(st, [0], [ids])
            self.prompt_tokens_computed += ids.size
            snap = prefix.capture(self.engine, st, 0, ids, logits[0])
            snap.bank = prefix.bank_chunks(st, 0, 0, ids.size // self.engine.chunk)
        return prefix.save_snapshot(self.engine, snap, path)

    def load_state(self, path) -> int:
        """Read a state saved by ``save_state`` (refused in one line when it comes from another
        export or state format) and keep it, pinned, in this runtime's prefix cache. Returns the
        number of tokens it holds."""
        if self.cache is None:
            raise InputError("saved states need an ONNX Runtime engine")
        snap = prefix.load_snapshot(self.engine, path)
        self.cache.put(snap)
        return snap.position

    def score(self, texts, top_logprobs: int = 0, batch: int = 8) -> list[TokenScores]:
        """Per-token log-probabilities of given texts (a list of str or of token-id lists): one
        ``scoring.TokenScores`` per text, ``logprobs[t]`` = log p(token t | the tokens before it)
        (NaN for the first token, which nothing precedes: prepend e.g. ``rt.eos_token_id`` to score
        it), ``.total`` their sum (a perplexity is exp(-total / (T - 1))), and the
        ``top_logprobs`` most likely tokens at each position. Texts run ``batch`` at a time, each
        in pieces whose logits stay within ``scoring.SCORE_LOGIT_BYTES``."""
        for name, v, lo in (("top_logprobs", top_logprobs, 0), ("batch", batch, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= self.vocab_size:
                raise InputError(f"{name} must be an integer in [{lo}, {self.vocab_size}], got {v!r}")
        if not scoring.can_score(self.engine):
            raise InputError(scoring.NO_SCORES if hasattr(self.engine, "sessions") else
                             "score runs on an export's ONNX engine (runtime.load), not on the torch backend")
        ids, out = self.encode(texts), []
        for a in range(0, len(ids), batch):
            part = ids[a:a + batch]
            need = sum(self.engine.row_bytes(0) + self.engine.bank_bytes(x.size) for x in part)
            if self.state_memory is not None and need > self.state_memory:
                raise InputError(f"{len(part)} texts need {need / 2**20:.1f} MiB of decode state, over state_memory "
                                 f"({self.state_memory / 2**20:.1f} MiB): lower batch or raise state_memory")
            st = self.engine.new_state(len(part))
            for b, x in enumerate(part):
                self.engine.reserve(st, b, x.size)
            out += score_prefill(self.engine, st, list(range(len(part))), part, int(top_logprobs))[1]
        return out

    def stream(self, prompt, max_new_tokens: int = 64, **options) -> Iterator[str]:
        """One prompt (a str or a token-id list) -> its new text, piece by piece as it is produced.
        Pieces never split a UTF-8 character; options as ``generate``."""
        for ev in self.stream_batch([prompt], max_new_tokens, **options):
            if ev.piece:
                yield ev.piece


def _describe(p) -> str:
    a = np.asarray(p, dtype=object) if not isinstance(p, np.ndarray) else p
    return f"{type(p).__name__} of shape {a.shape}"
