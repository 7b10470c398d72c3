"""Text in and out of the runtime, without transformers: the tokenizer of an export (through the
``tokenizers`` package), incremental detokenisation and stop strings.

Detokenisation is incremental over bytes: each token's bytes go through an incremental UTF-8
decoder, which holds back the bytes of a character split across tokens until it is complete,
so a streamed piece never carries half a character (nor a U+FFFD that a later token would
have completed). Special tokens (``<|endoftext|>``) add no text, as in ``Tokenizer.decode``,
and the concatenated pieces equal the decode of all tokens. Tokenizers whose decoder is not
byte-level fall back to decoding the row's tokens so far and holding back a trailing U+FFFD.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"


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

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"a text prompt must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

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

    def detokenizer(self, stop: Sequence[str] = ()) -> "Detokenizer":
        return Detokenizer(self, stop)


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
    """Stop strings as a tuple: None, one str or a sequence of non-empty str."""
    if stop is None:
        return ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InputError(f"stop strings must be non-empty str, got {s!r}")
    return stop


class Detokenizer:
    """One row's text, token by token: ``push(token) -> (piece, stopped)``, then ``finish()``.

    ``text`` is the row's text so far, cut before the first stop string once one appears.
    Pieces hold back any end of the text that could begin a stop string, so no streamed text
    is ever taken back.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, check_stop(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._full = ""  # everything decoded so far
        self._sent = 0  # characters of _full already returned as pieces
        self.stopped = False

    @property
    def text(self) -> str:
        return self._full if not self.stopped else self._full[:self._cut]

    def _decoded(self, token: int, final: bool = False) -> str:
        if self.tok.byte_level:
            return self._utf8.decode(self.tok.token_bytes(token) if token is not None else b"", final)
        if token is not None:
            self._ids.append(token)
        s = self.tok.decode(self._ids)
        if s.endswith(REPLACEMENT) and not final:  # may be half a character: wait for the next token
            s = s.rstrip(REPLACEMENT)
        new = s[len(self._full):] if s.startswith(self._full) else ""
        return new

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._advance(self._decoded(int(token)), final=False)

    def finish(self) -> str:
        """The text held back (a possible stop-string start, an incomplete character as U+FFFD)."""
        if self.stopped:
            return ""
        piece, _ = self._advance(self._decoded(None, final=True), final=True)
        return piece

    def _advance(self, new: str, final: bool) -> tuple[str, bool]:
        start = max(0, len(self._full) - max((len(s) for s in self.stop), default=0) + 1)
        self._full += new
        if self.stop:
            hits = [i for i in (self._full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self._cut, self.stopped = min(hits), True
                piece = self._full[self._sent:self._cut] if self._cut > self._sent else ""
                self._sent = max(self._sent, self._cut)
                return piece, True
        end = len(self._full) if final else len(self._full) - _held(self._full, self.stop)
        piece = self._full[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece, False


def _held(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
