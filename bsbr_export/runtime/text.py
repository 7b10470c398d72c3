"""Text in and out of the runtime, without transformers: the tokenizer of an export (through the
``tokenizers`` package), incremental detokenisation and stop strings.

Detokenisation streams through ``tokenizers``' ``DecodeStream`` (any tokenizer: byte-level,
byte-fallback, word pieces), which holds back the tokens of a character split across tokens
until it is complete, so a streamed piece never carries half a character (nor a U+FFFD that a
later token would have completed). Special tokens (``<|endoftext|>``) add no text, as in
``Tokenizer.decode``. At the end of a row, the full decode of its tokens is the check: whatever
it holds beyond the streamed text (a trailing incomplete character, as U+FFFD) is the last
piece, so the concatenated pieces equal the decode of all tokens.

Stop strings are at most ``MAX_STOP_CHARS`` characters each. They are matched as the text grows,
one automaton per stop string (Knuth-Morris-Pratt), so each new character costs the same
whatever the length of the text and of the stop strings; the automaton's state is also the
longest end of the text that could begin a stop string, which is held back from the pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"
MAX_STOP_CHARS = 512  # characters of one stop string (the server answers 400 beyond)
# Texts (characters) and token lists at least this long go through the tokenizer's batch calls,
# which release the GIL while they run: a long prompt does not stall the server's other threads.
LONG_INPUT = 1 << 14


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the character standing for each byte in a token."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """An export's tokenizer (``DIR/bsbr/tokenizer.json``, or ``DIR/tokenizer.json``)."""

    def __init__(self, tok, eos_token_id: int | None = None):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self.eos_token_id = eos_token_id
        dec = json.loads(tok.to_str()).get("decoder") or {}
        self.byte_level = dec.get("type") == "ByteLevel"
        self._bytes: dict[int, bytes] = {}
        self._byte_of = _byte_decoder() if self.byte_level else None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(path)
        f = next((p for p in (d / "bsbr" / TOKENIZER_FILE, d / TOKENIZER_FILE) if p.is_file()), None)
        if f is None:
            raise ModelLoadError(f"{d}: no {TOKENIZER_FILE} (looked in {d / 'bsbr'} and {d})")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises its own exception type
            raise ModelLoadError(f"{f}: cannot be read as a tokenizer ({str(e).splitlines()[0][:200]})") from None
        return cls(tok, _eos_id(f.parent, tok))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"a text prompt must be a str, got {type(text).__name__}")
        if len(text) >= LONG_INPUT:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if len(ids) >= LONG_INPUT:
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the text (b"" for special tokens); byte-level tokenizers only."""
        b = self._bytes.get(token)
        if b is None:
            s = None if token in self.special_ids else self._tok.id_to_token(token)
            if s is None:
                b = b""
            elif all(c in self._byte_of for c in s):
                b = bytes(self._byte_of[c] for c in s)
            else:  # an added, non-special token: its text as written
                b = s.encode("utf-8")
            self._bytes[token] = b
        return b

    def detokenizer(self, stop: Sequence[str] = (), skip_special: bool = True) -> "Detokenizer":
        return Detokenizer(self, stop, skip_special)


def _eos_id(d: Path, tok) -> int | None:
    """The end-of-text token: the checkpoint's ``eos_token_id``, else the tokenizer config's
    ``eos_token``."""
    cfg = d / "config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            return eos
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            return tok.token_to_id(eos)
    return None


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: None, one str or a sequence of non-empty str of at most
    ``MAX_STOP_CHARS`` characters."""
    if stop is None:
        return ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InputError(f"stop strings must be non-empty str, got {s!r}")
        if len(s) > MAX_STOP_CHARS:
            raise InputError(f"a stop string has {len(s)} characters, over the limit of {MAX_STOP_CHARS}")
    return stop


class Detokenizer:
    """One row's text, token by token: ``push(token) -> (piece, stopped)``, then ``finish()``.

    ``text`` is the row's text so far, cut before the first stop string once one appears.
    Pieces hold back any end of the text that could begin a stop string, so no streamed text
    is ever taken back. ``skip_special=False``: special tokens add their text (``<|endoftext|>``).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special: bool = True):
        from tokenizers.decoders import DecodeStream

        self.tok, self.stop, self.skip_special = tokenizer, check_stop(stop), skip_special
        self._stream = DecodeStream(skip_special_tokens=skip_special)
        self._stops = _StopMatcher(self.stop)
        self._ids: list[int] = []
        self._full = ""  # everything decoded so far
        self._sent = 0  # characters of _full already returned as pieces
        self.stopped = False

    @property
    def text(self) -> str:
        return self._full if not self.stopped else self._full[:self._cut]

    def arm(self, stop: Sequence[str]) -> None:
        """Look for ``stop`` strings in the text that comes from now on (a request's min_tokens)."""
        self.stop = check_stop(stop)
        self._stops = _StopMatcher(self.stop)  # a fresh matcher sees only what comes next

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        token = int(token)
        self._ids.append(token)
        return self._advance(self._stream.step(self.tok._tok, token) or "", final=False)

    def finish(self) -> str:
        """The text held back (a possible stop-string start, an incomplete character as U+FFFD):
        what the full decode of the row's tokens holds beyond the streamed text."""
        if self.stopped:
            return ""
        full = self.tok.decode(self._ids, skip_special_tokens=self.skip_special)
        piece, _ = self._advance(full[len(self._full):] if full.startswith(self._full) else "", final=True)
        return piece

    def _advance(self, new: str, final: bool) -> tuple[str, bool]:
        at = len(self._full)
        self._full += new
        hit = self._stops.feed(new, at) if self.stop and new else None
        if hit is not None:
            self._cut, self.stopped = hit, True
            piece = self._full[self._sent:self._cut] if self._cut > self._sent else ""
            self._sent = max(self._sent, self._cut)
            return piece, True
        end = len(self._full) if final else len(self._full) - self._stops.held()
        piece = self._full[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece, False


class _StopMatcher:
    """Stop strings over a growing text, one character at a time (Knuth-Morris-Pratt): for each
    stop string, the length of its longest beginning that ends the text so far. Each character
    costs amortised O(1) per stop string, however long the text and the stop strings."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)

    def feed(self, text: str, offset: int) -> int | None:
        """Advance over ``text`` (its first character at index ``offset`` of the whole text);
        the start of the earliest stop string that ends in it, or None."""
        best = None
        for k, s in enumerate(self.stops):
            q, fail, n = self.state[k], self.fail[k], len(s)
            for i, c in enumerate(text):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                    if q == n:
                        start = offset + i - n + 1
                        best = start if best is None else min(best, start)
                        break
            self.state[k] = q
        return best

    def held(self) -> int:
        """The longest end of the text that is a proper beginning of a stop string."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[i] = the longest proper border of s[:i + 1]."""
    f, q = [0] * len(s), 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = f[q - 1]
        if s[i] == s[q]:
            q += 1
        f[i] = q
    return f
