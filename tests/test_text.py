"""Tokenizer, incremental detokenisation and stop strings of ``bsbr_export.runtime.text``
(the bundled model's tokenizer; no ONNX, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export.errors import InputError, ModelLoadError
from bsbr_export.runtime.text import REPLACEMENT, Tokenizer, check_stop

MULTIBYTE = "déjà vu — naïve 日本語の文字 🙂🐍 ∑x² ok"


@pytest.fixture(scope="module")
def tok(bundled_dir):
    return Tokenizer.from_dir(bundled_dir)


def _stream(tok, ids, stop=()):
    d = tok.detokenizer(stop)
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = d.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(d.finish())
    return pieces, d


def test_tokenizer_matches_transformers(tok, bundled_dir):
    tf = pytest.importorskip("transformers")
    ref = tf.AutoTokenizer.from_pretrained(bundled_dir)
    for s in ("def parse(self, text):\n    return text", MULTIBYTE, "  x\t\ty"):
        assert tok.encode(s) == ref(s)["input_ids"]
        assert tok.decode(tok.encode(s)) == s
    assert tok.eos_token_id == 0 and tok.byte_level


def test_pieces_never_split_a_utf8_character(tok):
    ids = tok.encode(MULTIBYTE)
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any(REPLACEMENT in p for p in pieces)
    # The case is exercised: some token carries only part of a character's bytes.
    partial = [t for t in ids if _incomplete(tok.token_bytes(t))]
    assert partial, "no token of the text splits a character; pick a text that does"
    assert "" in pieces[:-1]  # those tokens' bytes were held back


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_random_tokens_stream_equals_decode(tok):
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tok.vocab_size, 40).tolist()
        pieces, _ = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)


def test_special_tokens_add_no_text(tok):
    ids = tok.encode("ab") + [tok.eos_token_id] + tok.encode("cd")
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == "abcd" == tok.decode(ids)


def test_stop_string_across_tokens_cuts_the_text(tok):
    text = "x = 1\nreturn value\n\ny = 2"
    ids = tok.encode(text)
    pieces, d = _stream(tok, ids, stop=["\n\n"])
    assert d.stopped and d.text == "x = 1\nreturn value"
    assert "".join(pieces) == d.text  # nothing streamed is taken back
    # The earliest of several stop strings wins; a stop string at the very start gives no text.
    _, d = _stream(tok, ids, stop=["value", "return"])
    assert d.text == "x = 1\n"
    _, d = _stream(tok, ids, stop=["x ="])
    assert d.text == "" and d.stopped


def test_held_back_prefix_of_a_stop_string_is_released(tok):
    ids = tok.encode("a\nb")
    pieces, d = _stream(tok, ids, stop=["\nc"])
    assert not d.stopped and "".join(pieces) == "a\nb" == d.text
    assert pieces[ids.index(tok.encode("\n")[0])] == ""  # "\n" held until "b" shows it is not "\nc"


def test_stop_strings_checked():
    assert check_stop(None) == () and check_stop("x") == ("x",)
    for bad in ([""], [3], ["ok", None]):
        with pytest.raises(InputError):
            check_stop(bad)


def test_missing_tokenizer_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)


def test_other_tokenizers_stream_through_their_decode():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"a": 0, "é": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(hf)
    assert not tok.byte_level
    ids = tok.encode("a é b a")
    pieces, d = _stream(tok, ids, stop=["b a"])
    assert d.stopped and "".join(pieces) == d.text == tok.decode(ids).split("b a")[0]


def test_stop_string_over_the_limit_is_refused():
    from bsbr_export.runtime.text import MAX_STOP_CHARS

    assert check_stop(["x" * MAX_STOP_CHARS]) == ("x" * MAX_STOP_CHARS,)
    with pytest.raises(InputError, match=f"limit of {MAX_STOP_CHARS}"):
        check_stop(["ok", "x" * (MAX_STOP_CHARS + 1)])


def _push_all(tok, ids, stop):
    import time

    d = tok.detokenizer(stop)
    t0 = time.perf_counter()
    for t in ids:
        d.push(t)
    return time.perf_counter() - t0, d


def test_held_back_check_does_not_grow_with_the_stop_strings(tok):
    """Four stop strings at the length limit cost about what four short ones do per token (the
    check is linear in the new text, not a slice per length per stop per token)."""
    from bsbr_export.runtime.text import MAX_STOP_CHARS

    text = ("def parse(self, text):\n    return [int(x) for x in text.split()]\n" * 60)[:3000]
    ids = tok.encode(text)
    short = [c * 8 for c in "☃☂☀☁"]  # characters the text never holds: every token is released
    long = [c * MAX_STOP_CHARS for c in "☃☂☀☁"]
    _push_all(tok, ids[:50], short)  # warm-up
    t_short = min(_push_all(tok, ids, short)[0] for _ in range(2))
    t_long, d = min((_push_all(tok, ids, long) for _ in range(2)), key=lambda x: x[0])
    assert d.text == tok.decode(ids) and not d.stopped
    print(f"[stops] {len(ids)} tokens: 4 stops of 8 chars {t_short * 1e3:.1f} ms, of {MAX_STOP_CHARS} "
          f"{t_long * 1e3:.1f} ms")
    assert t_long < 4 * t_short + 0.02


def test_stop_strings_found_where_they_end_and_held_back_by_their_longest_start(tok):
    """Overlapping and self-similar stop strings: the earliest-starting occurrence cuts the
    text; a partial match is held back exactly as long as it could still become a stop string."""
    rng = np.random.default_rng(3)
    alphabet = "ab\n"
    for _ in range(200):
        text = "".join(rng.choice(list(alphabet), 40))
        stops = ["".join(rng.choice(list(alphabet), int(rng.integers(1, 6)))) for _ in range(3)]
        ids = tok.encode(text)
        pieces, d = _stream(tok, ids, stops)
        full = tok.decode(ids)
        hits = [full.find(s) for s in stops if full.find(s) >= 0]
        # the streamed text stops at the earliest stop string that ends within the text
        want = full[:min(hits)] if hits else full
        ends = sorted((full.find(s) + len(s), full.find(s)) for s in stops if full.find(s) >= 0)
        if ends:  # the first stop string to end wins; among those ending at once, the earliest start
            first_end = ends[0][0]
            want = full[:min(st for e, st in ends if e == first_end)]
        assert d.text == "".join(pieces) == want, (text, stops)


def test_streamed_text_equals_the_full_decode_on_random_ids(tok):
    """Random token ids (special tokens and tokens holding part of a character among them),
    half of the sequences ending mid-character: the pieces add up to the full decode."""
    rng = np.random.default_rng(1)
    partial = [t for t in range(tok.vocab_size) if REPLACEMENT in tok.decode([t])]
    assert len(partial) > 50
    for k in range(300):
        ids = rng.integers(0, tok.vocab_size, int(rng.integers(1, 30))).tolist()
        if k % 5 == 0:
            ids[int(rng.integers(0, len(ids)))] = tok.eos_token_id
        if k % 2:
            ids.append(int(rng.choice(partial)))
        pieces, _ = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids
        assert all(REPLACEMENT not in p for p in pieces[:-1]) or REPLACEMENT in tok.decode(ids)
