"""The ONNX Runtime engine under generation and serving: the graphs of one export, and the state.

``Engine`` runs an export's ``extend`` (prefill in pieces, prompts of any lengths) and
``decode`` (one token per row) graphs, joined in one session (``joined``), and its ``close``
graph (once a row fills a chunk). A ``State``
holds a batch of sequences (``ops.state``, format 5: every tensor per layer, batch first):

- the open chunk's K/V, S and xa per layer, one numpy buffer each for the whole batch, bound to
  the per-token graph once (a persistent ``IOBinding``). The per-token graph only reads them and
  returns each row's new k/v row, which the engine writes at the row's slot (a few hundred bytes
  per row and layer): the state is never copied through a graph, and rows a step does not touch
  keep their bytes. A prompt piece (the extend graph) returns its tokens' k/v rows the same way
  (``slots.write_piece`` puts them in the window). (An input is never bound as an output: ORT
  documents no aliasing between them, so the one write the step needs is the engine's.)
- each row's bank of closed chunks, one array per row that grows with the chunks it closes
  (to a power of two of chunks, at most the export's capacity), so memory follows what the rows hold, not
  ``batch x capacity``. Where the retrieval stops (``retrieval_until``), the bank keeps only the
  chunks a retrieving chunk reads (``ops.state.bank_limit``: 6 for GPT-2's 1024 positions, chunk
  128 and the look-back window), however long the row grows. The chunk close runs for the closing rows only, one row at a time over
  views of that row's buffers and bank (no copy); the engine writes the closed chunk into its
  slot and the next S into the row.

On every execution provider the state lives in host memory (on CUDA, ORT copies what a graph
reads to the device for each run).

Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelLoadError
from ..ops import state as S
from ..util import release_free_memory
from .joined import FLAG, idle_inputs, joined_model, shared_weights
from .prefix import PREFILL_TOKENS, next_pieces
from .slots import piece_rows_from, slide, write_piece, write_rows
from . import scoring

GRAPHS = ("extend", "decode", "close")
# Pieces of at most STEP_PIECES tokens on held rows run as per-token steps: the extend graph
# attends over each row's combined sequence (held look-back window, open chunk, piece), ~70 ms
# at GPT-2 small for a piece of a few tokens, against ~20 ms for a one-row step; a step computes
# every row of the state (~43 ms at 16 rows), so only while tokens x rows <= STEP_ROWS
# (docs/results/extend-pieces.md). A fresh one-token prompt in a one-row state too (one step).
STEP_PIECES, STEP_ROWS = 3, 16
PRECISIONS = ("fp32", "fp16", "int8")
# The command that writes a precision's graphs.
PRECISION_ENGINE = {"fp32": "the main command", "fp16": "--engine fp16", "int8": "--engine int8"}


def graph_file(name: str, precision: str) -> str:
    """extend.onnx, extend_fp16.onnx, extend_int8.onnx ..."""
    return f"{name}{'' if precision == 'fp32' else '_' + precision}.onnx"


def read_metadata(path) -> dict:
    """The ``bsbr_export`` metadata JSON of an exported graph, without loading its weights."""
    import onnx

    if Path(path).is_file() and Path(path).stat().st_size == 0:  # onnx reads it as an empty graph
        raise ModelLoadError(f"{path}: empty file (0 bytes), not a graph (an interrupted write or copy; "
                             f"export it again)")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file
        raise ModelLoadError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    props = {p.key: p.value for p in m.metadata_props}
    if "bsbr_export" not in props:
        raise ModelLoadError(f"{path}: not a bsbr-export graph (no bsbr_export metadata)")
    return json.loads(props["bsbr_export"])


class _Spec:
    """``ops.state.StateSpec`` from the config dict an export records (an export without
    ``local_window`` has the default, one-chunk window)."""

    def __new__(cls, config: dict) -> S.StateSpec:
        from ..config import LOOKBACK_CHUNKS

        E, H = config["n_embd"], config["n_head"]
        d = E // H
        norm = config["retrieval"] == "normalised"
        dp = d // config["compression"] if config.get("compression") else d
        window = config.get("local_window", "chunk")
        if window not in LOOKBACK_CHUNKS:
            raise ModelLoadError(f"unknown local window {window!r} in the export's config; "
                                 f"this runtime reads {', '.join(LOOKBACK_CHUNKS)}")
        return S.StateSpec(layer=config["n_layer"], head=H, chunk=config["chunk_size"], head_dim=d,
                           state_dim=dp, state_cols=d + norm, embd=E, normalised=norm,
                           lookback=LOOKBACK_CHUNKS[window],
                           bank_limit=S.bank_limit(config.get("retrieval_until"), config["chunk_size"],
                                                   LOOKBACK_CHUNKS[window]))


def row_bytes(spec: S.StateSpec, tokens: int, capacity: int) -> int:
    """Bytes of one row's state in the engine once it holds ``tokens`` tokens: its buffers (K, V,
    S, xa of every layer) and its bank as ``State.bank_room`` grows it (``_grown``) to at most
    ``capacity`` slots."""
    fixed = spec.layer * sum(int(np.prod(spec.layer_shape(n, 1))) for n in State.BUFFERS) * 4
    held, cap = min(tokens // spec.chunk, capacity), 0
    while cap < held:
        cap = _grown(cap, held, capacity)
    return fixed + (sum(int(np.prod(spec.shape(n, 1, cap))) for n in S.BANKED.values()) * 4 if cap else 0)


def _grown(cap: int, need: int, capacity: int) -> int:
    """A bank's next capacity: the smallest power of two >= ``need`` (so a bank is copied
    log2(capacity) times over a row's life, whichever way it was filled), at most ``capacity``."""
    return min(1 << max(need - 1, 1).bit_length(), max(capacity, need))


class State:
    """A batch of sequences: per-layer buffers (K, V, S, xa: (batch, ...)), each row's bank
    (``None`` until the row closes a chunk; then {state_bank_h: (layer, 1, H, cap, d),
    state_bank_F: (layer, 1, H, cap, d', dc)}) and the tokens each row holds."""

    BUFFERS = (S.K, S.V, S.S, S.XA)

    def __init__(self, engine: "Engine", batch: int):
        sp = engine.spec
        self.batch, self.capacity = batch, engine.capacity
        self.positions = np.zeros(batch, dtype=np.int64)
        self._engine = engine
        self.buf = {n: [np.zeros(sp.layer_shape(n, batch), dtype=np.float32) for _ in range(sp.layer)]
                    for n in self.BUFFERS}
        self.banks: list[dict | None] = [None] * batch
        self._io = None  # the per-token graph's binding, made on first use

    def nbytes(self) -> int:
        """Bytes of the state the rows hold now (buffers and banks)."""
        return sum(a.nbytes for bufs in self.buf.values() for a in bufs) + \
            sum(a.nbytes for b in self.banks if b is not None for a in b.values())

    def bank_room(self, row: int, chunks: int, exact: bool = False) -> dict:
        """Row ``row``'s bank with room for ``chunks`` closed chunks, at most the engine's bank
        slots (grown to a power of two: ``_grown``; to exactly ``chunks`` with ``exact``; the
        chunks it holds are kept)."""
        chunks = min(chunks, self.capacity)
        bank = self.banks[row]
        cap = 0 if bank is None else bank[S.BANK_H].shape[3]
        if chunks <= cap:
            return bank
        new_cap = chunks if exact else _grown(cap, chunks, self.capacity)
        sp = self._engine.spec
        grown = {n: np.zeros([sp.layer] + sp.layer_shape(n, 1, new_cap), dtype=np.float32) for n in S.BANKED.values()}
        if bank is not None:
            for n, a in bank.items():
                grown[n][:, :, :, :cap] = a
        self.banks[row] = grown
        return grown

    def rows(self, rows) -> dict[str, np.ndarray]:
        """Host copies of the given rows' carried tensors, stacked (rows, layer, ...); banks at
        the largest number of chunks those rows hold (at least 1)."""
        idx = np.arange(self.batch)[rows]
        idx = np.atleast_1d(idx)
        sp, L = self._engine.spec, self._engine.chunk
        out = {n: np.stack([b[idx] for b in self.buf[n]], axis=1) for n in (S.K, S.V, S.S)}
        held = np.minimum(self.positions[idx] // L, self.capacity)
        cap = max(1, int(held.max(initial=0)))
        for n in S.BANKED.values():
            out[n] = np.zeros(sp.shape(n, len(idx), cap), dtype=np.float32)
            for i, r in enumerate(idx):
                if held[i]:
                    out[n][i] = self.banks[r][n][:, 0, :, :cap] if self.banks[r][n].shape[3] >= cap else \
                        np.pad(self.banks[r][n][:, 0], [(0, 0)] * 2 + [(0, cap - self.banks[r][n].shape[3])] +
                               [(0, 0)] * (self.banks[r][n].ndim - 4))
        return out

    def set_rows(self, rows, arrays: dict, positions) -> None:
        """Write whole rows (e.g. a new sequence's state into a running batch): ``arrays`` holds
        stacked (rows, layer, ...) tensors or scalars by state name; a bank's first
        position // chunk slots (at most the bank's slots) are the row's closed chunks."""
        idx = np.atleast_1d(np.arange(self.batch)[rows])
        pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), idx.shape)
        for n in (S.K, S.V, S.S):
            a = arrays[n]
            for i, b in enumerate(self.buf[n]):
                b[idx] = a if np.ndim(a) == 0 else np.asarray(a)[:, i]
        for b in self.buf[S.XA]:
            b[idx] = 0.0
        for j, r in enumerate(idx):
            held = min(int(pos[j]) // self._engine.chunk, self.capacity)
            self.banks[r] = None
            if held:
                bank = self.bank_room(int(r), held)
                for n in S.BANKED.values():
                    a = arrays[n]
                    bank[n][:, 0, :, :held] = a if np.ndim(a) == 0 else np.asarray(a)[j, :, :, :held]
        self.positions[idx] = pos


class Engine:
    """The graphs of one export in ONNX Runtime (see the module docstring). ``profile``: ORT's
    profile of the per-token session, written to ``<profile>_<date>.json`` (``end_profiling``)."""

    def __init__(self, export_dir, precision: str = "fp32", providers=None, threads: int | None = None,
                 session_options: dict | None = None, optimization: str = "all", prepack: bool | str = "decode",
                 max_len: int | None = None, join: bool = True, profile: str | None = None):
        from .runners import check_providers, provider_name, session_from_onnx

        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        d = Path(export_dir)
        if not d.is_dir():
            raise ModelLoadError(f"{d}: no such export directory")
        paths = {g: d / graph_file(g, precision) for g in GRAPHS}
        missing = [p.name for p in paths.values() if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{d}: missing {', '.join(missing)} (export with decode graphs, "
                                 f"{PRECISION_ENGINE[precision]})")
        meta = read_metadata(paths["extend"])
        fmt = meta.get("state", {}).get("format")
        if fmt != S.FORMAT:
            raise ModelLoadError(f"{d}: state format {fmt} but this runtime reads format {S.FORMAT}; "
                                 f"re-export with this version of bsbr-export")
        self.meta, self.config, self.precision = meta, meta["config"], precision
        # The graphs take any capacity; the export's maximum is the default (the parity grid ran to it).
        self.max_len = int(max_len or meta["max_seq_len"])
        self.vocab_size = int(self.config["vocab_size"])
        self.spec = _Spec(self.config)
        window = meta["state"].get("sizes", {}).get("window", self.spec.window)
        if window != self.spec.window:
            raise ModelLoadError(f"{d}: the state records {window} K/V rows but its config a window of "
                                 f"{self.spec.window}; re-export with this version of bsbr-export")
        self.chunk = self.spec.chunk
        # Bank slots per row: the export's chunks, at most those a retrieval reads (``StateSpec.bank_limit``).
        self.capacity = self.spec.bank_slots(self.max_len)
        self.providers = check_providers(providers)
        first = provider_name(self.providers[0])
        self.device = "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        # One copy of the weights for every session (ORT shared initializers; an int8 export
        # maps its own file and the fp32 file it shares with the fp32 graphs). ORT's prepacking
        # gives a session a packed copy of its own of the dense weights; the prompt and per-token
        # graphs run as one session (``join``, see ``joined``), so by default (``prepack="decode"``)
        # both read one packed copy (unpacked, a batched step repacks every weight: GPT-2 small,
        # 16 rows, Gemm 63 ms per step against 28). ``True`` packs the close too, ``False`` nothing.
        if prepack not in (True, False, "decode"):
            raise InputError(f"prepack must be True, False or 'decode', got {prepack!r}")
        self.paths, self.joined = paths, bool(join)
        self._weights = shared_weights(paths.values())
        packed = {g: prepack is True or (prepack == "decode" and g == "decode") for g in GRAPHS}
        step = joined_model(paths["extend"], paths["decode"]) if join else None
        config = {g: ({} if packed[g] else {"session.disable_prepacking": "1"}) | dict(session_options or {})
                  for g in GRAPHS}
        # The per-token graph keeps ORT's memory arena (its activations are small and the same
        # every step); prefill pieces and closes hand theirs back after each run (a 16-row prefill
        # would otherwise keep its peak resident for the server's life).
        import onnxruntime as ort

        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.sessions = {g: session_from_onnx(p, threads, self.providers, optimization, config=config[g],
                                              initializers=self._weights, arena=g != "close",
                                              model=step if g == "decode" else None,
                                              profile_prefix=profile if g == "decode" else None)
                         for g, p in paths.items() if not (join and g == "extend")}
        self.sessions.setdefault("extend", self.sessions["decode"])

    # ------------------------------------------------------------------ state
    def new_state(self, batch: int) -> State:
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be a positive integer, got {batch!r}")
        return State(self, batch)

    def reset_rows(self, st: State, rows) -> None:
        """Free rows: zero state, no bank, position 0."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        st.set_rows(rows, dict.fromkeys(S.CARRIED, 0.0), 0)

    def copy_rows(self, st: State, src: int, dst) -> None:
        """Rows ``dst`` take row ``src``'s whole state (n completions of one prefilled prompt)."""
        dst = [int(d) for d in np.atleast_1d(dst)]
        if dst:
            arrays = st.rows([src])
            st.set_rows(dst, {k: np.repeat(a, len(dst), axis=0) for k, a in arrays.items()},
                        int(st.positions[src]))

    def reserve(self, st: State, row: int, tokens: int) -> None:
        """Give row ``row`` the bank it needs to hold ``tokens`` tokens now (the chunks it holds
        are kept), so that it never grows while the row generates (a server reserves a request's
        memory at admission)."""
        if tokens // self.chunk:
            st.bank_room(int(row), tokens // self.chunk, exact=True)

    def bank_bytes(self, tokens: int) -> int:
        """Bytes of the bank ``reserve`` gives a row of ``tokens`` tokens."""
        held = min(tokens // self.chunk, self.capacity)
        return sum(int(np.prod(self.spec.shape(n, 1, held))) for n in S.BANKED.values()) * 4

    def row_bytes(self, tokens: int) -> int:
        """Bytes of one row's state once it holds ``tokens`` tokens (``row_bytes``)."""
        return row_bytes(self.spec, tokens, self.capacity)

    def _check_room(self, st: State, rows, extra) -> None:
        need = st.positions[rows] + np.asarray(extra)
        if (need > self.max_len).any():
            b = int(np.argmax(need > self.max_len))
            raise InputError(f"row {int(np.atleast_1d(rows)[b])} would hold {int(need[b])} tokens, over the "
                             f"export's maximum of {self.max_len} (the state's capacity)")

    # ------------------------------------------------------------------ the graphs
    @staticmethod
    def _value(arr: np.ndarray):
        """An ORT value over the memory of a C-contiguous numpy array (no copy on CPU)."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(arr)

    def _bind(self, io, inputs: dict, outputs: dict) -> None:
        """Bind per-layer arrays ({graph name: array}) as inputs and outputs."""
        for name, arr in inputs.items():
            io.bind_ortvalue_input(name, self._value(arr))
        for name, arr in outputs.items():
            io.bind_ortvalue_output(name, self._value(arr))

    def _layers(self, names, arrays_of, out: bool = False) -> dict:
        """{``NAME[_out].i``: arrays_of(name)[i]} for every layer."""
        return {S.layer_name(S.out_name(n) if out else n, i): a for n in names for i, a in enumerate(arrays_of(n))}

    def extend(self, st: State, rows, ids_list, every=None):
        """Feed each listed row its next tokens (prefill, or a prompt continued in pieces).

        rows: row indices; ids_list: one 1-D int64 array (>= 1 token) per row. Returns the last new
        token's logits (len(rows), V); with ``every`` (a bool per row) also ``scoring.split_rows``'s.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) != len(ids_list) or len(rows) == 0:
            raise InputError(f"extend needs one token list per row, got {len(rows)} rows and {len(ids_list)} lists")
        if len(set(rows.tolist())) != len(rows) or rows.min() < 0 or rows.max() >= st.batch:
            raise InputError(f"rows must be distinct indices in [0, {st.batch}), got {rows.tolist()}")
        seqs = [self._check_ids(x) for x in ids_list]
        lengths = np.array([len(x) for x in seqs], dtype=np.int64)
        self._check_room(st, rows, lengths)
        steps = int(lengths.max()) * st.batch <= (STEP_ROWS if st.positions[rows].any() else 1)
        if steps and lengths.max() <= STEP_PIECES and not np.any(every):
            return self._extend_by_steps(st, rows, seqs, every)
        B, L, sp = len(rows), self.chunk, self.spec
        ids = np.zeros((B, int(lengths.max())), dtype=np.int64)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = x
        pos = st.positions[rows].copy()
        held = pos // L
        kept_held = np.minimum(held, self.capacity)  # the closed chunks a bank keeps (StateSpec.bank_limit)
        whole = B == st.batch and (rows == np.arange(st.batch)).all()
        # This piece's rows of the buffers (the buffers themselves when it is the whole batch) and their banks, with
        # room for the chunks they hold after the piece: one row's own bank, read in place, else the rows' side by side.
        take = (lambda a: a) if whole else (lambda a: np.ascontiguousarray(a[rows]))  # noqa: E731
        ins = self._layers((S.K, S.V, S.S), lambda n: [take(b) for b in st.buf[n]])
        cap = max(1, min(self.capacity, int(((pos + lengths) // L).max())))
        banks = st.banks[rows[0]] if B == 1 else None
        if banks is None or banks[S.BANK_H].shape[3] < cap:
            banks = {n: np.zeros([sp.layer] + sp.layer_shape(n, B, cap), np.float32) for n in S.BANKED.values()}
            for i, r in enumerate(rows):
                for n in banks if kept_held[i] else ():
                    banks[n][:, i, :, :kept_held[i]] = st.banks[r][n][:, 0, :, :kept_held[i]]
        ins |= self._layers(S.BANKED.values(), lambda n: banks[n])
        # S after the piece, and the piece's own k/v rows (the engine writes them into the window).
        outs = {S.S: [np.empty(sp.layer_shape(S.S, B), dtype=np.float32) for _ in range(sp.layer)]}
        n_rows = ids.shape[1] - piece_rows_from(lengths, sp.window)  # those a window can hold
        outs |= {n: [np.empty((B, sp.head, n_rows, sp.head_dim), np.float32) for _ in range(sp.layer)]
                 for n in (S.ROW_K, S.ROW_V)}
        feed, logits, counts = scoring.logit_rows(self, lengths, ids.shape[1], every)
        io = self.sessions["extend"].io_binding()
        flag = {FLAG: np.array(True)} if self.joined else {}
        self._bind(io, ins | {"input_ids": ids, "lengths": lengths, "position": pos} | feed | flag,
                   self._layers(outs, outs.__getitem__, out=True) | {"logits": logits})
        # The closed chunks: as many as the piece's combined sequence spans, so ORT sizes them
        # (outputs are returned in the order they were bound: these last).
        new_names = list(self._layers(S.BANKED, lambda n: range(sp.layer), out=True))
        for name in new_names:
            io.bind_output(name, "cpu")
        self.sessions["extend"].run_with_iobinding(io, self._shrink)
        values = io.get_outputs()[-len(new_names):]
        for n in S.BANKED:
            outs[n] = [values[new_names.index(S.layer_name(n, i))].numpy() for i in range(sp.layer)]
        for b, a in zip(st.buf[S.S], outs[S.S]):
            b[rows] = a
        write_piece([*st.buf[S.K], *st.buf[S.V]], [*outs[S.ROW_K], *outs[S.ROW_V]], rows, pos, lengths, L, sp.lookback)
        # The chunks the piece closed, into their slots (those within the bank's slots).
        count = np.minimum((pos + lengths) // L, self.capacity) - kept_held
        for i, r in enumerate(rows):
            if count[i] > 0:
                bank = st.bank_room(int(r), int(held[i] + count[i]))
                for new, n in S.BANKED.items():
                    for layer, a in enumerate(outs[new]):
                        bank[n][layer, 0, :, held[i]:held[i] + count[i]] = a[i, :, :count[i]]
        st.positions[rows] += lengths
        release_free_memory()  # the piece's activations: the arena-less session freed them to the C heap
        return logits if every is None else scoring.split_rows(logits, counts, every)

    def _extend_by_steps(self, st: State, rows, seqs, every):
        """``extend`` of a few tokens per row as per-token steps (``STEP_PIECES``, ``STEP_ROWS``)."""
        tokens, last = np.zeros(st.batch, np.int64), np.empty((len(rows), self.vocab_size), np.float32)
        for j in range(max(len(x) for x in seqs)):
            now = [(i, r) for i, r in enumerate(rows) if j < len(seqs[i])]
            active = np.zeros(st.batch, bool)
            for i, r in now:
                tokens[r], active[r] = seqs[i][j], True
            logits = self.decode(st, tokens, active)
            for i, r in now:
                last[i] = logits[r]
        return last if every is None else (last, [None] * len(rows))

    def prefill(self, st: State, rows, ids_list, max_tokens: int = PREFILL_TOKENS) -> np.ndarray:
        """``extend`` in bounded calls: each feeds at most ``max_tokens`` tokens in all (a longer
        prompt goes in pieces), so a prefill's activations stay bounded whatever the batch and
        the prompts' lengths. Returns the logits of each row's last token (len(rows), V)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        seqs = [self._check_ids(x) for x in ids_list]
        if len(rows) != len(seqs) or len(rows) == 0:
            raise InputError(f"prefill needs one token list per row, got {len(rows)} rows and {len(seqs)} lists")
        self._check_room(st, rows, [len(x) for x in seqs])
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        done = [0] * len(rows)
        while True:
            sel, pieces = next_pieces(seqs, done, max_tokens)
            if not sel:
                return out
            logits = self.extend(st, rows[sel], pieces)
            for j, i in enumerate(sel):
                done[i] += len(pieces[j])
                if done[i] == len(seqs[i]):
                    out[i] = logits[j]

    def _decode_binding(self, st: State):
        """The per-token graph's binding over the state's buffers, made once per state."""
        if st._io is None:
            sp = self.spec
            st._feeds = {"input_ids": np.zeros((st.batch, 1), np.int64), "position": np.zeros(st.batch, np.int64)}
            st._rows = {n: [np.zeros(sp.layer_shape(n, st.batch), np.float32) for _ in range(sp.layer)]
                        for n in S.DECODE_OUT}
            st._io = self.sessions["decode"].io_binding()
            ins = st._feeds | self._layers(S.DECODE_IN, st.buf.__getitem__)
            if self.joined:  # the prompt graph's own inputs, empty
                ins |= {FLAG: np.array(False)} | idle_inputs(self.sessions["decode"], ins)
            self._bind(st._io, ins,
                       self._layers(S.DECODE_OUT, st._rows.__getitem__, out=True))
        return st._io

    def decode(self, st: State, tokens, active=None) -> np.ndarray:
        """One token per row -> logits (batch, V). Rows outside ``active`` (a bool mask; all rows
        by default) keep every byte of their state and their position, whatever they are fed."""
        tokens = self._check_ids(tokens, "tokens")
        if tokens.shape != (st.batch,):
            raise InputError(f"tokens must be one per row, shape ({st.batch},), got {tokens.shape}")
        active = np.ones(st.batch, bool) if active is None else np.asarray(active, dtype=bool)
        self._check_room(st, np.flatnonzero(active), 1)
        io = self._decode_binding(st)
        st._feeds["input_ids"][:, 0] = tokens
        st._feeds["position"][:] = st.positions
        logits = np.empty((st.batch, self.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", self._value(logits))
        self.sessions["decode"].run_with_iobinding(io)
        # The token's k/v into its slot, for the active rows only (xa stays in scratch: the close reads it).
        act = np.flatnonzero(active)
        pos = st.positions[act]
        slot = self.spec.window - self.chunk + pos % self.chunk
        write_rows([*st.buf[S.K], *st.buf[S.V]], [*st._rows[S.ROW_K], *st._rows[S.ROW_V]], act, slot)
        for r in act[pos % self.chunk == self.chunk - 1]:
            self._close_row(st, int(r))
        st.positions[act] += 1
        return logits

    def _close_row(self, st: State, r: int) -> None:
        """The chunk close of row ``r`` (its last decoded token filled the chunk): the close graph
        over views of the row's buffers and bank; the next S is written into the row's S, the
        closed chunk into its bank slot (when the bank keeps it: ``StateSpec.bank_limit``); a look-back
        window slides by one chunk."""
        sp, L = self.spec, self.chunk
        pos = st.positions[r]
        j = int(pos // L)
        bank = st.bank_room(r, j + 1)
        view = lambda n: [b[r:r + 1] for b in (st._rows if n == S.XA else st.buf)[n]]  # noqa: E731  no copy
        new = {n: [np.empty(sp.layer_shape(n, 1, 1), np.float32) for _ in range(sp.layer)] for n in S.BANKED}
        ins = self._layers((S.K, S.V, S.XA), view) | self._layers(S.BANKED.values(), lambda n: list(bank[n]))
        outs = self._layers((S.S,), view, out=True) | self._layers(S.BANKED, new.__getitem__, out=True)
        io = self.sessions["close"].io_binding()
        self._bind(io, ins | {"position": np.array([pos], np.int64)}, outs)
        self.sessions["close"].run_with_iobinding(io)
        for n, b in S.BANKED.items() if j < self.capacity else ():
            for layer, a in enumerate(new[n]):
                bank[b][layer, 0, :, j] = a[0, :, 0]
        slide([*st.buf[S.K], *st.buf[S.V]], r, L, sp.lookback)  # look-back: the closed chunk becomes the previous one

    def _check_ids(self, ids, what: str = "prompt") -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            raise InputError(f"{what} token ids must be integers, got {a.dtype}")
        if a.size == 0:
            raise InputError(f"{what} is empty: give at least one token")
        if a.min() < 0 or a.max() >= self.vocab_size:
            raise InputError(f"{what} token ids must lie in [0, {self.vocab_size}), got [{a.min()}, {a.max()}]")
        return a.astype(np.int64)
