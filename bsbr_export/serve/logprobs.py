"""A completion choice as its events come, with log-probabilities in OpenAI's legacy completions
format: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, the echoed prompt's
entries first (``echo`` with ``logprobs``: its first token's log-probability and top entry are
null, nothing precedes it), then each generated token's.

- ``tokens``: each token's own string, never its decode in isolation: a byte-level token whose
  bytes are not whole UTF-8 (part of a character) is ``"bytes:\\xNN..."`` (OpenAI's convention,
  as vLLM), a special token its content (``<|endoftext|>``).
- ``top_logprobs``: {token string: logprob} of the ``logprobs`` most likely tokens and always
  the chosen one (so up to ``logprobs`` + 1 entries); distinct ids never share a key (a second
  id whose string is taken is keyed ``token_id:N``).
- ``text_offset``: where each token's text begins in the choice's text, counted over the tokens'
  own bytes (a token that begins inside a character has that character's offset), so text held
  back while a stop string or a character is incomplete does not shift the offsets.
"""

from __future__ import annotations

import codecs

REPLACEMENT = "\ufffd"


def _raw(tok):
    return tok._tok  # the ``tokenizers`` object behind ``runtime.text.Tokenizer``


def token_string(tok, t: int) -> str:
    """Token ``t``'s own string (see the module docstring)."""
    t = int(t)
    if t in tok.special_ids:
        return _raw(tok).id_to_token(t) or ""
    if tok.byte_level:
        b = tok.token_bytes(t)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)
    s = tok.decode([t])
    return s if s and REPLACEMENT not in s else (_raw(tok).id_to_token(t) or s)


def top_entry(tok, top: dict | None, chosen: int, logprob: float) -> dict[str, float]:
    """{token string: logprob} of ``top`` ({id: logprob}, most likely first) with the chosen token
    added when it is not among them; a string taken by another id is keyed ``token_id:N``."""
    out, ids = {}, dict(top or {})
    ids.setdefault(int(chosen), float(logprob))
    for t, lp in ids.items():
        key = token_string(tok, t)
        out["token_id:%d" % t if key in out else key] = float(lp)
    return out


class Offsets:
    """Where each token of a text begins, in characters, from ``base``: over the tokens' bytes
    for byte-level tokenizers (characters completed so far), else over the decode of the tokens
    so far."""

    def __init__(self, tok, base: int = 0):
        self.tok, self.n, self.ids = tok, base, []
        self.base = base
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tok.byte_level else None

    def take(self, t: int) -> int:
        at = self.n
        if self._utf8 is not None:
            self.n += len(self._utf8.decode(self.tok.token_bytes(int(t))))
        else:
            self.ids.append(int(t))
            self.n = self.base + len(self.tok.decode(self.ids).rstrip(REPLACEMENT))
        return at


class Choice:
    """One prompt's text, tokens and logprobs as its events come (``request.Event``: the prompt's
    scores, then one per generated token, then its end). ``piece``: the text the last event
    added (the echoed prompt on the prompt's event when echo waited for its scores)."""

    def __init__(self, srv, body, index: int, prompt):
        self.index, self.prompt_tokens, self.tok = index, int(prompt.size), srv.tokenizer
        self.echo = self.tok.decode(prompt.tolist()) if body.echo else ""
        self.want_logprobs, self.k = body.logprobs is not None, body.logprobs or 0
        self.scores_prompt = bool(body.echo) and self.want_logprobs  # echo waits for the prompt's entries
        self.text, self.finish_reason, self.error, self.piece = self.echo, None, None, ""
        self.tokens, self.logprob_sum = [], 0.0  # the generated tokens' summed log-probability (best_of)
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if self.k else None, "text_offset": []}
        self._offsets = Offsets(self.tok, len(self.echo))

    def add(self, ev) -> dict | None:
        """Record an event; returns its logprobs fragment (streaming) when asked for."""
        if getattr(ev, "prompt", None) is not None:
            self.piece = self.echo
            return self._extend(self._prompt_fragment(ev.prompt))
        self.tokens.append(ev.token)
        self.logprob_sum += ev.logprob
        self.text += ev.piece
        self.piece = ev.piece
        if not self.want_logprobs:
            return None
        return self._extend({"tokens": [token_string(self.tok, ev.token)], "token_logprobs": [ev.logprob],
                             "top_logprobs": [top_entry(self.tok, ev.top, ev.token, ev.logprob)] if self.k else None,
                             "text_offset": [self._offsets.take(ev.token)]})

    def _prompt_fragment(self, s) -> dict:
        ids, offsets = s.tokens.tolist(), Offsets(self.tok)
        lps = [None] + [float(x) for x in s.logprobs[1:]]
        tops = None
        if self.k:
            tops = [None] + [top_entry(self.tok, s.top(t), ids[t], lps[t]) for t in range(1, len(ids))]
        return {"tokens": [token_string(self.tok, t) for t in ids], "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": [offsets.take(t) for t in ids]}

    def _extend(self, frag: dict) -> dict:
        for k in ("tokens", "token_logprobs", "text_offset"):
            self.lp[k] += frag[k]
        if self.lp["top_logprobs"] is not None:
            self.lp["top_logprobs"] += frag["top_logprobs"]
        return frag

    def end(self, ev) -> None:
        self.finish_reason, self.error = ev.finish_reason, ev.error

    def json(self) -> dict:
        return {"index": self.index, "text": self.text, "logprobs": self.lp if self.want_logprobs else None,
                "finish_reason": self.finish_reason}
