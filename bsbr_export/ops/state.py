"""The decode state: one specification for torch, the ONNX graphs, the runtime and the benchmark.

Generating token by token keeps, per sequence, layer and head (docs/bsbr-math.md, "Decode"):

    state_k, state_v  [batch, layer, head, chunk, head_dim]             the open chunk's keys/values
    state_S           [batch, layer, head, state_dim, state_cols]       the open chunk's retrieved state
    state_bank_h      [batch, layer, head, capacity, head_dim]          meta keys of closed chunks
    state_bank_F      [batch, layer, head, capacity, state_dim, state_cols]  states of closed chunks

and, between the per-token graph and the chunk-closing graph only,

    state_xa          [batch, layer, 1, embd]       the closing token's ln_1 output per layer

The per-token graph reads k, v and S and returns the token's own k/v row per layer
(``state_row_k``/``state_row_v`` [batch, head, 1, head_dim]), which the caller writes at the
row's slot: nothing else of the state moves. The extend graph (prompts, pieces) likewise returns
the piece's k/v rows (``state_row_k``/``state_row_v`` [batch, head, piece_rows, head_dim]: those
from ``runtime.slots.piece_rows_from`` on, which a window can still hold) and not the window:
the caller writes them at their slots, moving the window on where the piece closes chunks
(``runtime.slots``). The chunk-closing graph runs for the closing rows only and returns the
next S and the closed chunk (``state_new_h``, ``state_new_F``) for the caller to bank.

With the look-back local window (``BSBRConfig.local_window == "lookback"``) ``state_k``/``state_v``
hold ``window`` = (1 + lookback) x chunk rows instead of ``chunk``: the previous chunk's
keys/values first, then the open chunk's; after a chunk closes the caller slides them (the
closed chunk becomes the previous one). The manifest records ``window`` among the sizes (and
the config its ``local_window``), from which loaders size state_k/state_v.

Batch is the first axis of every tensor, so a server slices or replaces one sequence's state
along axis 0. The shapes above are the *stacked* form (torch's recurrent state, the prefill
comparison in tests, ``State.rows``/``set_rows``); the ONNX graphs read and write every tensor
per layer (since format 4): ``state_k.3`` is layer 3's (batch, head, chunk, head_dim), so the engine
binds each layer's buffer directly, with no split of a layer axis on the way in and no Concat on
the way out (``layer_name``, ``StateSpec.layer_shape``, ``stack``). ``state_cols`` is ``head_dim`` for the plain retrieval; the normalised retrieval
carries its normaliser z (resp. Z) as one extra, last column of every F (resp. S), so both
variants have the same five tensors. ``capacity`` is the number of chunk slots in the bank: any
number >= 1 that holds the row's closed chunks in the close and extend graphs (the runtime
grows each row's bank with what it holds), the number of closed chunks in the prefill graph's
output. Every tensor is float32 in every export (fp16
graphs cast at their edges). ``FORMAT`` is written into every export and read back by loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 1: layer-first state, Z kept apart in torch. 2: batch-first, normaliser as the last column.
# 3: the graphs return the chunks they close (state_new_h, state_new_F); the caller writes them
#    into the bank in place, so the bank is never copied through a graph.
# (The look-back window's state_k/state_v of ``window`` rows is sized by the manifest: still 3.)
# 4: every graph input and output per layer (``state_k.0`` ...); the per-token graph returns the
#    token's k/v row (state_row_k/v) for the caller to write at its slot, and no longer returns
#    the open chunk; the chunk-closing graph reads K/V, xa and the banks and returns the next S and
#    the closed chunk (the caller slides a look-back window).
# 5: the extend graph returns the piece's k/v rows (state_row_k/v, [batch, head, piece_rows, head_dim])
#    in place of the K/V window after the piece; the caller writes them into the window.
FORMAT = 5

K, V, S, BANK_H, BANK_F, XA = "state_k", "state_v", "state_S", "state_bank_h", "state_bank_F", "state_xa"
NEW_H, NEW_F = "state_new_h", "state_new_F"  # chunks a graph closed, for the caller to bank
ROW_K, ROW_V = "state_row_k", "state_row_v"  # the decoded token's k/v, for the caller to write at its slot
# The state a sequence carries from one token to the next, in this order everywhere.
CARRIED = (K, V, S, BANK_H, BANK_F)
# Per-token graph: reads the open chunk and its retrieved state; returns the token's k/v row and xa.
DECODE_IN, DECODE_OUT = (K, V, S), (ROW_K, ROW_V, XA)
# Chunk-closing graph, once per chunk and only for the rows that close: reads the full chunk, the
# closing token's xa and the bank; returns the next S and the finished chunk's (h, F).
CLOSE_IN, CLOSE_OUT = (K, V, XA, BANK_H, BANK_F), (S, NEW_H, NEW_F)
# Prefill in pieces: reads the whole state, returns the piece's k/v rows, S and the chunks it closed.
EXTEND_OUT = (ROW_K, ROW_V, S, NEW_H, NEW_F)
BANKED = {NEW_H: BANK_H, NEW_F: BANK_F}  # where the caller writes each returned chunk
# The extend graph's flat indices (row x piece position, row-major) whose logits it returns: each
# row's last new token for generation, every position of a piece for prompt log-probabilities.
# An export without this input returns the last token's logits only (it cannot score prompts).
LOGIT_ROWS = "logit_rows"
FRESH = (NEW_H, NEW_F, ROW_K, ROW_V)  # outputs that replace no input: named as they are
OUT_SUFFIX = "_out"  # a graph output that replaces an input of the same name

DIMS = {
    K: ("batch", "layer", "head", "chunk", "head_dim"),
    V: ("batch", "layer", "head", "chunk", "head_dim"),
    S: ("batch", "layer", "head", "state_dim", "state_cols"),
    BANK_H: ("batch", "layer", "head", "capacity", "head_dim"),
    BANK_F: ("batch", "layer", "head", "capacity", "state_dim", "state_cols"),
    XA: ("batch", "layer", "one", "embd"),
    NEW_H: ("batch", "layer", "head", "chunks", "head_dim"),
    NEW_F: ("batch", "layer", "head", "chunks", "state_dim", "state_cols"),
    ROW_K: ("batch", "layer", "head", "one", "head_dim"),
    ROW_V: ("batch", "layer", "head", "one", "head_dim"),
}
DYNAMIC = ("batch", "capacity", "chunks")  # the dimensions a graph leaves symbolic
LAYER_AXIS = 1  # every tensor is [batch, layer, ...]


def out_name(name: str) -> str:
    """A graph output's name: a carried tensor's with the suffix, a returned chunk or row as is."""
    return name if name in FRESH else name + OUT_SUFFIX


def layer_name(name: str, layer: int) -> str:
    """The graph input or output of one layer: ``state_k.3``, ``state_S_out.3``."""
    return f"{name}.{layer}"


def stack(values: dict, names, n_layer: int, out: bool = False) -> dict:
    """Per-layer arrays by graph name -> stacked arrays (batch, layer, ...) by state name."""
    return {n: np.stack([values[layer_name(out_name(n) if out else n, i)] for i in range(n_layer)], axis=LAYER_AXIS)
            for n in names}


@dataclass(frozen=True)
class StateSpec:
    """Sizes of every dimension of the decode state, for one model configuration."""

    layer: int
    head: int
    chunk: int
    head_dim: int
    state_dim: int
    state_cols: int
    embd: int
    normalised: bool
    lookback: int = 0  # earlier chunks kept in state_k/state_v beside the open one
    bank_limit: int | None = None  # closed chunks a retrieval ever reads (``bank_limit``); None: all

    @classmethod
    def from_config(cls, cfg) -> "StateSpec":
        norm = cfg.retrieval == "normalised"
        return cls(layer=cfg.n_layer, head=cfg.n_head, chunk=cfg.chunk_size, head_dim=cfg.head_dim,
                   state_dim=cfg.state_dim, state_cols=cfg.head_dim + norm, embd=cfg.n_embd, normalised=norm,
                   lookback=cfg.lookback, bank_limit=bank_limit(cfg.retrieval_until, cfg.chunk_size, cfg.lookback))

    @property
    def window(self) -> int:
        """Rows of state_k/state_v: the open chunk and the ``lookback`` chunks before it."""
        return (1 + self.lookback) * self.chunk

    def dims(self, name: str) -> tuple:
        """The dimension names of tensor ``name`` (``DIMS``; the K/V rows are ``window`` with look-back)."""
        if self.lookback and name in (K, V):
            return tuple("window" if dim == "chunk" else dim for dim in DIMS[name])
        return DIMS[name]

    def capacity(self, max_len: int) -> int:
        """Bank slots needed to hold ``max_len`` tokens: ceil(max_len / chunk)."""
        return -(-max_len // self.chunk)

    def size(self, dim: str, batch: int | None = None, capacity: int | None = None):
        if dim == "batch":
            return batch if batch is not None else dim
        if dim in ("capacity", "chunks"):
            return capacity if capacity is not None else dim
        return 1 if dim == "one" else getattr(self, dim)

    def shape(self, name: str, batch: int | None = None, capacity: int | None = None) -> list:
        """The stacked shape of tensor ``name``; ``batch``/``capacity`` left as their names when
        not given (the form ONNX value infos take)."""
        return [self.size(dim, batch, capacity) for dim in self.dims(name)]

    def layer_shape(self, name: str, batch: int | None = None, capacity: int | None = None) -> list:
        """One layer's shape of tensor ``name``: the graphs' inputs and outputs (since format 4)."""
        shape = self.shape(name, batch, capacity)
        return shape[:LAYER_AXIS] + shape[LAYER_AXIS + 1:]

    def zeros(self, batch: int, capacity: int, names=CARRIED) -> dict[str, np.ndarray]:
        """A zero state (float32) for ``batch`` sequences and ``capacity`` bank slots."""
        return {n: np.zeros(self.shape(n, batch, capacity), dtype=np.float32) for n in names}

    def nbytes(self, batch: int, capacity: int, itemsize: int = 4) -> int:
        """Bytes of the carried state at the given capacity."""
        return sum(int(np.prod(self.shape(n, batch, capacity))) * itemsize for n in CARRIED)

    def bank_slots(self, max_len: int) -> int:
        """Bank slots a sequence of up to ``max_len`` tokens ever fills: ``capacity``, at most ``bank_limit``."""
        return self.banked(self.capacity(max_len) * self.chunk)

    def banked(self, tokens: int) -> int:
        """Closed chunks a sequence of ``tokens`` tokens keeps in its bank (at most ``bank_limit``)."""
        held = tokens // self.chunk
        return held if self.bank_limit is None else min(held, self.bank_limit)

    def bytes_at(self, context: int, batch: int = 1, itemsize: int = 4) -> int:
        """Bytes a state holding ``context`` tokens needs: its bank sized to the chunks it keeps."""
        return self.nbytes(batch, self.banked(context), itemsize)

    def to_dict(self) -> dict:
        """What an export records about its state (ONNX metadata and manifest); ``sizes`` holds
        ``window``, the rows of state_k/state_v."""
        sizes = {k: v for k, v in self.__dict__.items() if k not in ("normalised", "lookback", "bank_limit")}
        return {"format": FORMAT, "names": list(CARRIED), "dims": {n: list(self.dims(n)) for n in DIMS},
                "io": "per layer: NAME.LAYER, the dims without 'layer'",
                "sizes": sizes | {"window": self.window},
                "normaliser": "last column of state_S and state_bank_F" if self.normalised else None,
                "dtype": "float32"}


def kv_cache_bytes(n_layer: int, n_embd: int, context: int, batch: int = 1, itemsize: int = 4) -> int:
    """Bytes of a standard GPT-2 KV cache (keys and values of every layer) holding ``context``
    tokens: what the BSBR state is compared with."""
    return 2 * n_layer * batch * context * n_embd * itemsize


def window_cache_bytes(n_layer: int, n_embd: int, window: int, sinks: int = 0, context: int | None = None,
                       batch: int = 1, itemsize: int = 4) -> int:
    """Bytes of the KV cache of a sliding-window baseline (``ops.baselines``): keys and values of
    the ``window`` most recent tokens and the ``sinks`` first ones, every layer; fewer while the
    context is shorter than that."""
    rows = window + sinks if context is None else min(context, window + sinks)
    return kv_cache_bytes(n_layer, n_embd, rows, batch, itemsize)


def bank_limit(retrieval_until: int | None, chunk: int, lookback: int) -> int | None:
    """Closed chunks a bank ever needs where the retrieval stops (``retrieval_until``): chunk
    i < U = ceil(until / chunk) retrieves from chunks j < i - lookback, so only chunks
    j < U - 1 - lookback are read (6 for GPT-2's 1024 positions, chunk 128 and the look-back
    window); at least one (every graph takes a bank of one slot or more). None: every chunk."""
    if retrieval_until is None:
        return None
    return max(1, -(-int(retrieval_until) // chunk) - 1 - lookback)
