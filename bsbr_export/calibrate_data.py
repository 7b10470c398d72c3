"""The calibrate command's data: the user's text read, checked, tokenised and split.

``--data`` paths are text files (one document each), directories (every file under them,
recursively, in sorted order; hidden files and directories, empty files and binary files,
which hold a NUL byte, are skipped) or ``.jsonl`` files (one document per line, its ``text``
field). Documents are tokenised with the model's own tokenizer (``tokenizer.json`` through the
``tokenizers`` package) and joined with the end-of-text token after each.

Whole documents, in a seeded random order, are set aside as held-out text until it holds about
``HELDOUT_FRACTION`` of the tokens and at least one window (T + 1 tokens: the inputs and the
next token of the last). When one document holds nearly everything, the last document set aside
is cut so that the training text keeps at least one window. Training draws a fresh random window
of T tokens from the training stream at every step; the held-out text is read as fixed
non-overlapping windows.

Every problem (a missing path, an empty or non-UTF-8 file, a bad JSONL line, too few tokens)
raises ``DataError`` with one line, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BSBRExportError, DataError

HELDOUT_FRACTION = 0.1
LISTED_FILES = 100  # files named in the summary (the count is always there)


@dataclass
class Corpus:
    """The tokenised data: training and held-out streams, and where they came from."""

    paths: list[str]
    files: list[str]
    skipped: dict
    documents: int
    heldout_documents: int
    cut_document: bool
    train: np.ndarray
    heldout: np.ndarray
    seq_len: int
    seed: int

    def windows(self, n: int | None = None) -> list:
        """Up to ``n`` fixed held-out windows of T + 1 tokens (``fidelity.windows``: inputs and
        shifted targets, non-overlapping inputs, spread evenly; all of them when n is None)."""
        from .fidelity import windows

        return windows(self.heldout, self.seq_len, n)

    def sample(self, gen, batch: int = 1, length: int | None = None):
        """``batch`` fresh training windows of ``length`` tokens (default T) at random places, (batch, length) int64."""
        import torch

        n = length or self.seq_len
        starts = torch.randint(0, len(self.train) - n + 1, (batch,), generator=gen).tolist()
        return torch.stack([torch.from_numpy(self.train[s:s + n].copy()) for s in starts])

    def fingerprint(self) -> str:
        """sha256 of both streams and the window length: a checkpoint resumes only on the same data."""
        h = hashlib.sha256()
        for part in (self.train, self.heldout, np.asarray([self.seq_len], dtype=np.int64)):
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()

    def summary(self, heldout_windows: int) -> dict:
        return {"paths": self.paths, "files": len(self.files), "file_list": self.files[:LISTED_FILES],
                "files_skipped": self.skipped, "documents": self.documents,
                "documents_train": self.documents - self.heldout_documents + self.cut_document,
                "documents_heldout": self.heldout_documents, "heldout_cut_from_a_document": self.cut_document,
                "tokens_train": int(len(self.train)), "tokens_heldout": int(len(self.heldout)),
                "seq_len": self.seq_len, "heldout_windows": heldout_windows,
                "heldout_windows_available": (len(self.heldout) - 1) // self.seq_len,
                "split_seed": self.seed, "sha256": self.fingerprint()}


# --------------------------------------------------------------------------- reading

def _decode(p: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start} cannot be decoded)") from None


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: {e.strerror or e}") from None


def _jsonl(p: Path, text: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{p} line {n}: no string "text" field (each line must be a JSON object '
                            f'{{"text": "..."}})')
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _walk(d: Path) -> list[Path]:
    """Every file under ``d``, sorted, hidden files and directories left out."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(d).parts)


def read_documents(paths) -> tuple[list[str], list[str], dict]:
    """(document texts, files read, counts of skipped files) of the ``--data`` paths."""
    if not paths:
        raise DataError("no --data given: name at least one text file, directory or .jsonl file")
    docs, files, skipped, seen = [], [], {"empty": 0, "binary": 0}, set()
    for given in map(Path, paths):
        if not given.exists():
            raise DataError(f"--data {given}: no such file or directory")
        explicit = not given.is_dir()
        for p in [given] if explicit else _walk(given):
            key = p.resolve()
            if key in seen or not p.is_file():
                continue
            seen.add(key)
            data = _read(p)
            if not explicit and b"\0" in data:
                skipped["binary"] += 1
                continue
            text = _decode(p, data)
            found = _jsonl(p, text) if p.suffix == ".jsonl" else [text] if text.strip() else []
            if not found:
                if explicit:
                    raise DataError(f"{p}: empty file" if not text.strip() else f"{p}: no text (every line's "
                                    f"text is empty)")
                skipped["empty"] += 1
                continue
            docs.extend(found)
            files.append(str(p))
    if not docs:
        what = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        raise DataError(f"no text in --data {' '.join(map(str, paths))}" + (f" ({what} files skipped)" if what else ""))
    return docs, files, skipped


# --------------------------------------------------------------------------- tokens

def tokenizer(model_dir: Path, eos_fallback: int | None):
    """(the model's tokenizer, its end-of-text id), or a one-line ``DataError``."""
    from .runtime.text import Tokenizer

    try:
        tok = Tokenizer.from_dir(model_dir)
    except BSBRExportError as e:
        raise DataError(f"calibration needs the model's tokenizer: {str(e).splitlines()[0]}") from None
    eos = tok.eos_token_id if tok.eos_token_id is not None else eos_fallback
    if eos is None:
        raise DataError(f"{model_dir}: no end-of-text token (eos_token_id) to separate documents")
    return tok, eos


def split(docs: list[np.ndarray], T: int, seed: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(training stream, held-out stream, held-out documents, whether one was cut): whole documents
    in a seeded order set aside until about ``HELDOUT_FRACTION`` of the tokens and at least T + 1."""
    total = sum(len(d) for d in docs)
    target = max(math.ceil(HELDOUT_FRACTION * total), T + 1)
    held, n = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)).tolist():
        if n >= target:
            break
        held.append(i)
        n += len(docs[i])
    keep = set(held)
    train = [d for i, d in enumerate(docs) if i not in keep]
    heldout = [docs[i] for i in sorted(held)]
    cut = total - n < T  # the last document set aside took too much: it gives its tail back
    if cut:
        last = docs[held[-1]]
        k = target - (n - len(last))
        heldout = [docs[i] for i in sorted(held[:-1])] + [last[:k]]
        train.append(last[k:])
    return np.concatenate(train), np.concatenate(heldout), len(held), cut


def load(paths, model_dir: Path, seq_len: int, vocab_size: int, eos_fallback: int | None = None,
         seed: int = 0) -> Corpus:
    """Read, tokenise and split the ``--data`` paths for windows of ``seq_len`` tokens."""
    texts, files, skipped = read_documents(paths)
    tok, eos = tokenizer(model_dir, eos_fallback)
    docs = []
    for text in texts:
        ids = tok.encode(text)
        if ids:
            docs.append(np.asarray([*ids, eos], dtype=np.int64))
    if not docs:
        raise DataError(f"no text in --data {' '.join(map(str, paths))}: the tokenizer gives no tokens")
    total = sum(len(d) for d in docs)
    top = max(int(d.max()) for d in docs)
    if top >= vocab_size:
        raise DataError(f"{model_dir}: the tokenizer gives token id {top}, beyond the model's vocabulary of "
                        f"{vocab_size}")
    need = 2 * seq_len + 1
    if total < need:
        raise DataError(f"--data holds {total} tokens ({len(docs)} document{'s' if len(docs) != 1 else ''}, "
                        f"an end-of-text token after each); --seq-len {seq_len} needs at least {need}: one "
                        f"training window of {seq_len} and one held-out window of {seq_len + 1}. Add text or "
                        f"lower --seq-len")
    train, heldout, n_held, cut = split(docs, seq_len, seed)
    return Corpus([str(p) for p in paths], files, skipped, len(docs), n_held, cut, train, heldout, seq_len, seed)


# --------------------------------------------------------------------------- sampled from the original

def sampled_plan(tokens: int, seq_len: int, heldout_windows: int) -> tuple[int, int]:
    """(training documents, held-out documents) of ``seq_len`` tokens each for ``tokens`` training
    tokens: about ``HELDOUT_FRACTION`` more held out, at least ``heldout_windows`` windows' worth."""
    train = max(1, math.ceil(tokens / seq_len))
    return train, max(math.ceil(HELDOUT_FRACTION * train), heldout_windows) + 1


def sampled(hf, tokens: int, seq_len: int, heldout_windows: int, seed: int, eos: int,
            progress=None, cache: Path | None = None) -> Corpus:
    """A corpus sampled from the original itself (``self_sample.sample_windows``), for a user with
    nothing but the checkpoint: each document is ``seq_len - 1`` sampled tokens and the end-of-text
    token; the held-out documents are sampled after the training ones, from the same seed. With
    ``cache`` (an .npy path), the documents are read from there when they match, written otherwise
    (a resumed run samples nothing again)."""
    from .self_sample import sample_windows

    n_train, n_held = sampled_plan(tokens, seq_len, heldout_windows)
    n = n_train + n_held
    ids = None
    if cache is not None and cache.is_file():
        ids = np.load(cache)
        if ids.shape != (n, seq_len - 1):
            ids = None
    if ids is None:
        ids = sample_windows(hf, n, seq_len - 1, batch=32, seed=seed, progress=progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp.npy")
            np.save(tmp, ids)
            os.replace(tmp, cache)
    docs = np.concatenate([ids, np.full((n, 1), eos, dtype=np.int64)], axis=1)  # (n, seq_len)
    label = f"(sampled from the original: {n} documents of {seq_len} tokens, seed {seed})"
    return Corpus([label], [], {}, n, n_held, False, docs[:n_train].reshape(-1), docs[n_train:].reshape(-1),
                  seq_len, seed)
