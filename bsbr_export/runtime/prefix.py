"""The prefix cache: a sequence's exact state after a token prefix, kept for the next request
that starts with the same tokens, and saved states.

A BSBR sequence's state after ``p`` tokens is its open chunk's k/v rows (with the look-back
window, the previous chunk's too), the open chunk's S and the closed chunks in its bank. A
closed chunk never changes, so the state after a prefix is the same whatever follows it: a
snapshot is exact by construction, and a request whose prompt starts with a snapshot's tokens
continues from it and computes only the rest.

Snapshots are taken where the state is whole between two graph calls: at the ends of prompt
pieces cut at snapshot points (every ``interval`` tokens, a multiple of the chunk size, and
every chunk boundary in the prompt's last ``interval`` tokens), at the end of each prompt, and at
the end of each generation (the last sampled token is not in the state). A snapshot stores its S, its k/v rows,
its logits when it ends a prompt, and only the bank chunks its parent (the longest cached
snapshot that is a prefix of it) does not hold: a 4096-token prompt's snapshots share their
closed chunks along the chain instead of each copying the bank. Restoring walks the chain.

The cache has a byte budget; past it, the least recently used snapshots that no other snapshot
builds on are evicted. Snapshots taken while a prompt is fed are committed only once the prompt
is complete, so a request cancelled or failed in its prefill leaves nothing behind.

Why every ``interval`` tokens and not at every chunk boundary: a snapshot's state is only whole
at the end of a graph call, and pieces cut at every boundary cost more (one more call each, and
the dense layers on 128-row matrices instead of 512 or more). Pieces of ``SNAPSHOT_INTERVAL`` tokens cost nothing extra; the boundaries of a prompt's last
``interval`` tokens catch the common shape of shared prefixes (a system prompt or a few-shot
header followed by a short question), at the cost of a few more pieces at the prompt's end.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelLoadError
from ..ops import state as S

PREFILL_TOKENS = 1024  # tokens per extend call in ``Engine.prefill``: bounds a prefill's activations
SNAPSHOT_INTERVAL = 512  # tokens between snapshots inside a prompt (rounded down to whole chunks)
STATE_FILE_TAG = "bsbr-export-state"


def snapshot_points(n: int, chunk: int, interval: int) -> list[int]:
    """Where a prompt of ``n`` tokens is cut for snapshots: every ``interval`` tokens, every chunk
    boundary in its last ``interval`` tokens, and ``n`` itself (sorted)."""
    step = max(chunk, interval // chunk * chunk)
    tail = max(chunk, -(-(n - step) // chunk) * chunk)
    return sorted(set(range(step, n, step)) | set(range(tail, n, chunk)) | {n})


def next_pieces(seqs, done, budget: int, end=None) -> tuple[list[int], list]:
    """One extend call's pieces of a prefill: the rows (indices into ``seqs``) with tokens left
    after ``done[i]`` and each one's next piece, in order, ``budget`` tokens in all; ``end(i)``
    (optional) is where row i's piece must stop at the latest (a snapshot point)."""
    sel, pieces = [], []
    for i, x in enumerate(seqs):
        if done[i] < len(x) and budget > 0:
            stop = min(done[i] + budget, len(x) if end is None else end(i))
            pieces.append(x[done[i]:stop])
            sel.append(i)
            budget -= stop - done[i]
    return sel, pieces


def next_cut(fed: int, n: int, chunk: int, interval: int) -> int:
    """The first snapshot point after ``fed`` tokens of an ``n``-token prompt."""
    return next(p for p in snapshot_points(n, chunk, interval) if p > fed)


@dataclass(eq=False)
class Snapshot:
    """The state after ``tokens`` (their count is the position)."""

    tokens: np.ndarray  # int64 (p,)
    S: np.ndarray  # (layer, H, d', dc)
    kv: tuple  # (lo, K rows (layer, H, hi - lo, d), V rows): the k/v rows the state holds
    logits: np.ndarray | None = None  # (V,) after the last token: the next token needs no compute
    bank: dict = field(default_factory=dict)  # {BANK_H: (layer, H, n, d), BANK_F: ...}: chunks first .. held
    first: int = 0  # the first chunk this snapshot's bank holds (its parent's held chunks)
    parent: "Snapshot | None" = None
    children: int = 0
    key: bytes = b""
    pinned: bool = False

    @property
    def position(self) -> int:
        return int(self.tokens.size)

    @property
    def nbytes(self) -> int:
        arrays = [self.S, self.kv[1], self.kv[2], *self.bank.values()] + ([self.logits] if self.logits is not None else [])
        return sum(a.nbytes for a in arrays) + self.tokens.nbytes


def capture(engine, st, row: int, tokens, logits=None) -> Snapshot:
    """The row's state now, but its bank (``attach`` copies the chunks its parent lacks)."""
    sp, L, p = engine.spec, engine.chunk, int(st.positions[row])
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size != p:
        raise ValueError(f"row {row} holds {p} tokens, snapshot of {tokens.size}")
    lo = 0 if (sp.lookback and p >= L) else sp.window - L
    hi = sp.window - L + p % L
    take = lambda n: np.stack([b[row, :, lo:hi] for b in st.buf[n]])  # noqa: E731
    return Snapshot(tokens=tokens.copy(), S=np.stack([b[row] for b in st.buf[S.S]]), kv=(lo, take(S.K), take(S.V)),
                    logits=None if logits is None else np.array(logits, dtype=np.float32))


def bank_chunks(st, row: int, first: int, held: int) -> dict:
    """Copies of the row's closed chunks ``first`` .. ``held`` - 1 ({} when there are none)."""
    if held <= first:
        return {}
    return {n: st.banks[row][n][:, 0, :, first:held].copy() for n in S.BANKED.values()}


def restore(engine, st, row: int, snap: Snapshot) -> None:
    """Write ``snap``'s state into ``row`` (its bank from the snapshot's chain)."""
    held = snap.position // engine.chunk
    lo, k, v = snap.kv
    for n, rows in ((S.K, k), (S.V, v)):
        for layer, b in enumerate(st.buf[n]):
            b[row] = 0.0
            b[row, :, lo:lo + rows.shape[2]] = rows[layer]
    for layer, b in enumerate(st.buf[S.S]):
        b[row] = snap.S[layer]
    for b in st.buf[S.XA]:
        b[row] = 0.0
    st.banks[row] = None
    if held:
        bank = st.bank_room(row, held)
        node = snap
        while node is not None:
            for n, a in node.bank.items():
                bank[n][:, 0, :, node.first:node.first + a.shape[2]] = a
            node = node.parent
    st.positions[row] = snap.position


class PrefixCache:
    """Snapshots keyed by their exact token prefix, within ``budget`` bytes (LRU eviction of
    snapshots no other builds on). ``interval``: tokens between snapshots inside a prompt."""

    def __init__(self, engine, budget: int, interval: int = SNAPSHOT_INTERVAL):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise InputError(f"prefix cache budget must be a number of bytes >= 0, got {budget!r}")
        self.engine, self.budget = engine, budget
        self.interval = max(engine.chunk, interval // engine.chunk * engine.chunk)
        self._nodes: OrderedDict[bytes, Snapshot] = OrderedDict()  # least recently used first
        self._lengths: dict[int, int] = {}  # position -> snapshots of that length
        self.bytes = self.pinned_bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "hit_tokens": 0}

    @property
    def enabled(self) -> bool:
        """Whether requests look snapshots up (a budget, or loaded states)."""
        return self.budget > 0 or self.pinned_bytes > 0

    def __len__(self) -> int:
        return len(self._nodes)

    @staticmethod
    def _key(tokens) -> bytes:
        return np.ascontiguousarray(tokens, dtype=np.int64).tobytes()

    def find(self, ids, below: int | None = None, need_logits: bool = True) -> Snapshot | None:
        """The longest snapshot whose tokens start ``ids``: shorter than ``ids``, or as long when it
        has the logits of its last token (``need_logits``); at most ``below`` tokens when given."""
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.size if below is None else min(below, ids.size)
        for p in sorted((p for p in self._lengths if p <= n), reverse=True):
            snap = self._nodes.get(self._key(ids[:p]))
            if snap is not None and (p < ids.size or not need_logits or snap.logits is not None):
                return snap
        return None

    def lookup(self, ids) -> Snapshot | None:
        """``find`` for a new request: counts a hit or a miss and marks the chain as used."""
        snap = self.find(ids) if self.enabled else None
        if snap is None:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += snap.position
        node = snap
        while node is not None:
            self._nodes.move_to_end(node.key)
            node = node.parent
        return snap

    def commit(self, st, row: int, snaps) -> None:
        """Insert snapshots captured from ``row`` (in order of position), each with the bank chunks
        its parent lacks, copied from the row's bank (closed chunks never change, so the row's
        bank still holds them). Snapshots that do not fit the budget are dropped."""
        for snap in snaps:
            key = self._key(snap.tokens)
            if self.budget <= 0 or key in self._nodes:
                continue
            parent = self.find(snap.tokens, below=snap.position - 1, need_logits=False)
            held, first = snap.position // self.engine.chunk, 0
            if parent is not None:
                first = parent.position // self.engine.chunk
            snap.bank = bank_chunks(st, row, first, held)
            snap.first, snap.parent, snap.key = first, parent, key
            size = snap.nbytes
            if size > self.budget or not self._make_room(size, keep=parent):
                snap.parent = None
                continue
            if parent is not None:
                parent.children += 1
            self._nodes[key] = snap
            self._lengths[snap.position] = self._lengths.get(snap.position, 0) + 1
            self.bytes += size

    def put(self, snap: Snapshot) -> None:
        """Insert a snapshot that holds its whole bank (a loaded state), pinned: it is never
        evicted and does not count against the budget (``unpin_all`` ends that)."""
        key = self._key(snap.tokens)
        old = self._nodes.get(key)
        if old is not None:
            if old.pinned:
                return
            self._evict(old, count=False)
        snap.key, snap.parent, snap.first, snap.pinned = key, None, 0, True
        self._nodes[key] = snap
        self._lengths[snap.position] = self._lengths.get(snap.position, 0) + 1
        self.pinned_bytes += snap.nbytes

    def unpin_all(self) -> None:
        for snap in [s for s in self._nodes.values() if s.pinned]:
            self.pinned_bytes -= snap.nbytes
            snap.pinned = False
            if snap.children == 0:
                self._evict(snap, count=False)
            else:  # snapshots build on it: it stays, counted, until they go
                self.bytes += snap.nbytes
        self._make_room(0, keep=None)

    def _make_room(self, size: int, keep: Snapshot | None) -> bool:
        """Evict least recently used leaves (never ``keep`` or its chain) until ``size`` fits."""
        chain = set()
        while keep is not None:
            chain.add(keep.key)
            keep = keep.parent
        while self.bytes + size > self.budget:
            victim = next((s for k, s in self._nodes.items()
                           if s.children == 0 and not s.pinned and k not in chain), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, snap: Snapshot, count: bool = True) -> None:
        del self._nodes[snap.key]
        self._lengths[snap.position] -= 1
        if not self._lengths[snap.position]:
            del self._lengths[snap.position]
        if not snap.pinned:
            self.bytes -= snap.nbytes
        if snap.parent is not None:
            snap.parent.children -= 1
        self.stats["evictions"] += count

    def clear(self) -> None:
        for snap in list(self._nodes.values()):
            snap.parent = None
        self._nodes.clear()
        self._lengths.clear()
        self.bytes = self.pinned_bytes = 0

    def metrics(self) -> dict:
        return {**self.stats, "bytes": self.bytes + self.pinned_bytes, "entries": len(self._nodes),
                "budget": self.budget}


def prefill(engine, st, rows, ids_list, cache: PrefixCache | None, max_tokens: int) -> tuple[np.ndarray, list[int]]:
    """``Engine.prefill`` through the cache: each row starts from its longest cached prefix, the
    rest goes in pieces of at most ``max_tokens`` tokens in all, cut at snapshot points; the
    snapshots are committed once every row's prompt is in. Returns the logits of each row's
    last token (len(rows), V) and the prompt tokens each row took from the cache."""
    rows = [int(r) for r in np.atleast_1d(rows)]
    seqs = [np.asarray(x, dtype=np.int64) for x in ids_list]
    if cache is None or not cache.enabled:
        return engine.prefill(st, rows, seqs, max_tokens), [0] * len(rows)
    L = engine.chunk
    out = np.empty((len(rows), engine.vocab_size), dtype=np.float32)
    done, pending = [0] * len(rows), [[] for _ in rows]
    for i, (r, x) in enumerate(zip(rows, seqs)):
        snap = cache.lookup(x)
        if snap is not None:
            restore(engine, st, r, snap)
            done[i] = snap.position
            if snap.position == x.size:
                out[i] = snap.logits
    cached = list(done)
    while True:
        sel, pieces = next_pieces(seqs, done, max_tokens, lambda i: next_cut(done[i], seqs[i].size, L, cache.interval))
        if not sel:
            break
        logits = engine.extend(st, [rows[i] for i in sel], pieces)
        for j, i in enumerate(sel):
            done[i] += len(pieces[j])
            n = seqs[i].size
            if done[i] == n:
                out[i] = logits[j]
            if done[i] in snapshot_points(n, L, cache.interval):
                pending[i].append(capture(engine, st, rows[i], seqs[i][:done[i]], logits[j] if done[i] == n else None))
    for r, snaps in zip(rows, pending):
        cache.commit(st, r, snaps)
    return out, cached


# --------------------------------------------------------------------------- saved states

def export_identity(engine) -> str:
    """What a saved state must match: the export's config, precision and state format, its graph
    files and the bytes of the weights its sessions read (sha256, computed once per engine)."""
    ident = getattr(engine, "_identity", None)
    if ident is None:
        h = hashlib.sha256(json.dumps({"config": engine.config, "precision": engine.precision,
                                       "format": S.FORMAT}, sort_keys=True, default=str).encode())
        for path in sorted(engine.paths.values()):
            h.update(Path(path).read_bytes())
        for name in sorted(engine._weights):
            h.update(name.encode())
            h.update(np.ascontiguousarray(engine._weights[name].numpy()).view(np.uint8))
        ident = engine._identity = h.hexdigest()
    return ident


def save_snapshot(engine, snap: Snapshot, path) -> Path:
    """Write ``snap`` (with its whole bank) to ``path`` atomically (a .npz file)."""
    path = Path(path)
    held = snap.position // engine.chunk
    banks = {n: [] for n in S.BANKED.values()}
    chain, node = [], snap
    while node is not None:
        chain.append(node)
        node = node.parent
    for node in reversed(chain):
        for n, a in node.bank.items():
            banks[n].append(a)
    arrays = {"tokens": snap.tokens, "S": snap.S, "K": snap.kv[1], "V": snap.kv[2]}
    for n, parts in banks.items():
        arrays[n] = np.concatenate(parts, axis=2) if parts else np.zeros((0,), np.float32)
    if snap.logits is not None:
        arrays["logits"] = snap.logits
    header = {"tag": STATE_FILE_TAG, "format": S.FORMAT, "export": export_identity(engine),
              "position": snap.position, "held": held, "kv_lo": snap.kv[0]}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_snapshot(engine, path) -> Snapshot:
    """A snapshot from ``save_snapshot``'s file, checked against this engine's export."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such state file")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {k: z[k] for k in z.files if k != "header"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a bsbr-export state file ({type(e).__name__})") from None
    if header.get("tag") != STATE_FILE_TAG:
        raise ModelLoadError(f"{path}: not a bsbr-export state file")
    if header.get("format") != S.FORMAT:
        raise ModelLoadError(f"{path}: state format {header.get('format')}, this runtime reads format {S.FORMAT}")
    if header.get("export") != export_identity(engine):
        raise ModelLoadError(f"{path}: saved from another export (its config or weights differ from this one's)")
    held = int(header["held"])
    bank = {n: arrays[n] for n in S.BANKED.values()} if held else {}
    return Snapshot(tokens=arrays["tokens"].astype(np.int64), S=arrays["S"], kv=(int(header["kv_lo"]), arrays["K"],
                                                                                 arrays["V"]),
                    logits=arrays.get("logits"), bank=bank, first=0)
