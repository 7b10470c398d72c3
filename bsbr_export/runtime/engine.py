"""The ONNX Runtime engine under generation and serving: the graphs of one export, and the state.

``Engine`` runs an export's ``extend`` (prefill in pieces, prompts of any lengths),
``decode`` (one token per row) and ``close`` (once a row fills a chunk) graphs. A ``State``
holds a batch of sequences: the carried tensors of ``ops.state`` (batch first) as ORT values
that stay bound from one step to the next, and each row's position. Every graph reads its state
from one set of buffers and writes the next state into a second set (an input cannot alias an
output), and the two swap; logits are the only per-step copy to the host. On CPU the buffers
are numpy arrays that ORT reads and writes in place; on the CUDA execution provider they live
on the device.

Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelLoadError
from ..ops import state as S

GRAPHS = ("extend", "decode", "close")
PRECISIONS = ("fp32", "fp16", "int8")
# The command that writes a precision's graphs.
PRECISION_ENGINE = {"fp32": "the main command", "fp16": "--engine fp16", "int8": "--engine int8"}


def graph_file(name: str, precision: str) -> str:
    """extend.onnx, extend_fp16.onnx, extend_int8.onnx ..."""
    return f"{name}{'' if precision == 'fp32' else '_' + precision}.onnx"


def read_metadata(path) -> dict:
    """The ``bsbr_export`` metadata JSON of an exported graph, without loading its weights."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file
        raise ModelLoadError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    props = {p.key: p.value for p in m.metadata_props}
    if "bsbr_export" not in props:
        raise ModelLoadError(f"{path}: not a bsbr-export graph (no bsbr_export metadata)")
    return json.loads(props["bsbr_export"])


def shared_weights(paths) -> dict:
    """{initializer name: OrtValue} over one copy-on-write map of each weights file that the
    graphs at ``paths`` read, so that every session uses the same memory for its weights.
    A tensor that lies beyond its file's end is refused (``api.check_export`` checks the exact
    size of each weights file against every graph of the directory before anything loads)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    maps, values = {}, {}
    for path in paths:
        m = onnx.load(str(path), load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL or t.name in values:
                continue
            info = {e.key: e.value for e in t.external_data}
            f = Path(path).parent / info["location"]
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if f not in maps:
                if not f.is_file():
                    raise ModelLoadError(f"{f.parent}: missing the weights file {f.name}")
                maps[f] = np.memmap(f, dtype=np.uint8, mode="c")
            if offset + length > maps[f].size:
                raise ModelLoadError(f"{f}: {maps[f].size} bytes, but the graphs read up to byte {offset + length} "
                                     f"(a truncated or foreign weights file)")
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = maps[f][offset:offset + length].view(dtype).reshape(tuple(t.dims))
            values[t.name] = ort.OrtValue.ortvalue_from_numpy(arr)
    return values


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
                           lookback=LOOKBACK_CHUNKS[window])


@dataclass
class Buffer:
    """An ORT value the graphs read or write, and on CPU the numpy array that is its memory."""

    value: object
    host: np.ndarray | None


class State:
    """A batch of sequences: the carried state and the tokens each row holds.

    The open chunk (k, v) and S live in two buffer sets that the graphs read from and write to
    in turn; the banks live once: graphs only read them, and the engine writes each closed
    chunk into its slot in place.
    """

    DOUBLE = (S.K, S.V, S.S)  # written by a graph every step or piece

    def __init__(self, engine: "Engine", batch: int):
        self.batch, self.capacity = batch, engine.capacity
        self.positions = np.zeros(batch, dtype=np.int64)
        self._engine = engine
        shape = lambda n: engine.spec.shape(n, batch, self.capacity)  # noqa: E731
        self.cur = {n: engine.buffer(shape(n)) for n in S.CARRIED}
        self.spare = {n: engine.buffer(shape(n)) for n in self.DOUBLE}
        self.xa = engine.buffer(shape(S.XA))

    def swap(self, names) -> None:
        for n in names:
            if n in self.spare:
                self.cur[n], self.spare[n] = self.spare[n], self.cur[n]

    def rows(self, rows) -> dict[str, np.ndarray]:
        """Host copies of the given rows' carried tensors."""
        return {n: self._engine.to_host(v)[rows] for n, v in self.cur.items()}

    def set_rows(self, rows, arrays: dict[str, np.ndarray], positions) -> None:
        """Write whole rows (e.g. a new sequence's state into a running batch)."""
        for n, v in self.cur.items():
            self._engine.write(v, (rows,), arrays[n])
        self.positions[rows] = positions

    def bank(self, new: dict[str, np.ndarray], rows, first_slot, count) -> None:
        """Write the chunks a graph closed into the banks: row rows[i] gets new[..][i, :, :, :count[i]]
        at slots first_slot[i] .. first_slot[i] + count[i] - 1."""
        for n, a in new.items():
            bank = self.cur[S.BANKED[n]]
            for i, r in enumerate(rows):
                if count[i]:
                    j = int(first_slot[i])
                    self._engine.write(bank, (int(r), slice(None), slice(None), slice(j, j + int(count[i]))),
                                       a[i, :, :, :int(count[i])])


class Engine:
    """The graphs of one export in ONNX Runtime (see the module docstring)."""

    def __init__(self, export_dir, precision: str = "fp32", providers=None, threads: int | None = None,
                 session_options: dict | None = None, optimization: str = "all", prepack: bool = False,
                 max_len: int | None = None):
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
        self.capacity = self.spec.capacity(self.max_len)
        self.providers = check_providers(providers)
        first = provider_name(self.providers[0])
        self.device = "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        # One copy of the weights for the three sessions (ORT shared initializers; an int8 export
        # maps its own file and the fp32 file it shares with the fp32 graphs). ORT's
        # prepacking would give each session a packed copy of its own (measured at GPT-2 small:
        # 1.4-2.0 GB resident instead of 0.9 GB): off unless ``prepack`` asks for it.
        self._weights = shared_weights(paths.values())
        config = ({} if prepack else {"session.disable_prepacking": "1"}) | dict(session_options or {})
        self.sessions = {g: session_from_onnx(p, threads, self.providers, optimization, config=config,
                                              initializers=self._weights) for g, p in paths.items()}

    # ------------------------------------------------------------------ buffers
    def buffer(self, shape, dtype=np.float32):
        """A zeroed ORT value of ``shape`` on the engine's device (a numpy array's memory on CPU)."""
        import onnxruntime as ort

        host = np.zeros(shape, dtype=dtype)
        if self.device != "cpu":
            return Buffer(ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0), None)
        # On CPU the engine's row writes go straight into the memory ORT reads and writes.
        return Buffer(ort.OrtValue.ortvalue_from_numpy(host), host)

    def to_host(self, buf: "Buffer") -> np.ndarray:
        """The buffer's array: the very memory on CPU, a copy from the device on CUDA."""
        return buf.host if buf.host is not None else buf.value.numpy()

    def write(self, buf: "Buffer", index, data) -> None:
        """buf[index] = data: in place on CPU; through a host copy of the buffer on CUDA."""
        host = self.to_host(buf)
        host[index] = data
        if buf.host is None:
            buf.value.update_inplace(host)

    # ------------------------------------------------------------------ state
    def new_state(self, batch: int) -> State:
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be a positive integer, got {batch!r}")
        return State(self, batch)

    def reset_rows(self, st: State, rows) -> None:
        """Free rows: zero state, position 0."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        st.set_rows(rows, dict.fromkeys(S.CARRIED, 0.0), 0)

    def _check_room(self, st: State, rows, extra) -> None:
        need = st.positions[rows] + np.asarray(extra)
        if (need > self.max_len).any():
            b = int(np.argmax(need > self.max_len))
            raise InputError(f"row {int(np.atleast_1d(rows)[b])} would hold {int(need[b])} tokens, over the "
                             f"export's maximum of {self.max_len} (the state's capacity)")

    # ------------------------------------------------------------------ the graphs
    def _run(self, graph: str, st: State, feeds: dict, ins, outs, out_host: dict | None = None):
        """Run ``graph`` with state inputs ``ins`` from the current set and state outputs ``outs``
        into the spare set; ``out_host`` binds numpy outputs (logits, closed chunks) by name."""
        sess = self.sessions[graph]
        io = sess.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        for n in ins:
            io.bind_ortvalue_input(n, (st.xa if n == S.XA else st.cur[n]).value)
        for n in outs:
            io.bind_ortvalue_output(S.out_name(n), (st.xa if n == S.XA else st.spare[n]).value)
        for name, arr in (out_host or {}).items():
            io.bind_ortvalue_output(name, self._host_value(arr))
        sess.run_with_iobinding(io)
        st.swap(outs)

    def _new_chunks(self, batch: int, chunks: int) -> dict[str, np.ndarray]:
        return {n: np.empty(self.spec.shape(n, batch, chunks), dtype=np.float32) for n in S.BANKED}

    def _host_value(self, arr: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(arr)

    def extend(self, st: State, rows, ids_list) -> np.ndarray:
        """Feed each listed row its next tokens (prefill, or a prompt continued in pieces).

        rows: row indices; ids_list: one 1-D int64 array (>= 1 token) per row. Returns the
        logits of each row's last new token, float32 (len(rows), V).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) != len(ids_list) or len(rows) == 0:
            raise InputError(f"extend needs one token list per row, got {len(rows)} rows and {len(ids_list)} lists")
        if len(set(rows.tolist())) != len(rows) or rows.min() < 0 or rows.max() >= st.batch:
            raise InputError(f"rows must be distinct indices in [0, {st.batch}), got {rows.tolist()}")
        seqs = [self._check_ids(x) for x in ids_list]
        lengths = np.array([len(x) for x in seqs], dtype=np.int64)
        self._check_room(st, rows, lengths)
        ids = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = x
        logits = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        if len(rows) == st.batch and (rows == np.arange(st.batch)).all():
            sub = st
        else:  # a sub-batch: its rows' state out, the piece, and back in
            sub = State(self, len(rows))
            sub.set_rows(slice(None), st.rows(rows), st.positions[rows])
        pos = sub.positions.copy()
        feeds = {"input_ids": ids, "lengths": lengths, "position": pos}
        L = self.chunk
        new = self._new_chunks(len(rows), (ids.shape[1] + 2 * L - 2) // L)  # the piece's chunks, aligned
        self._run("extend", sub, feeds, S.CARRIED, State.DOUBLE, {"logits": logits} | new)
        sub.bank(new, range(len(rows)), pos // L, (pos + lengths) // L - pos // L)
        sub.positions += lengths
        if sub is not st:
            st.set_rows(rows, sub.rows(slice(None)), sub.positions)
        return logits

    def decode(self, st: State, tokens, active=None) -> np.ndarray:
        """One token per row -> logits (batch, V). Rows outside ``active`` (a bool mask; all rows
        by default) keep their state and position whatever token they are fed."""
        tokens = self._check_ids(tokens, "tokens")
        if tokens.shape != (st.batch,):
            raise InputError(f"tokens must be one per row, shape ({st.batch},), got {tokens.shape}")
        active = np.ones(st.batch, bool) if active is None else np.asarray(active, dtype=bool)
        self._check_room(st, np.flatnonzero(active), 1)
        logits = np.empty((st.batch, self.vocab_size), dtype=np.float32)
        pos = st.positions.copy()
        self._run("decode", st, {"input_ids": tokens[:, None], "position": pos},
                  S.DECODE_IN, S.DECODE_OUT, {"logits": logits})
        # Slot pos % L of an inactive row lies past the tokens it holds: the write there is unread.
        closing = active & (pos % self.chunk == self.chunk - 1)
        if closing.all() or (closing.any() and self.device != "cpu"):
            # Position 0 never closes a chunk: rows that are not closing keep their S.
            new = self._new_chunks(st.batch, 1)
            slid = tuple(n for n in self.spec.close_out if n not in S.BANKED)  # S (look-back: and K, V)
            self._run("close", st, {"position": np.where(closing, pos, 0)}, S.CLOSE_IN, slid, new)
            st.bank(new, np.arange(st.batch), pos // self.chunk, closing.astype(np.int64))
        elif closing.any():
            self._close_rows(st, np.flatnonzero(closing), pos)
        st.positions[active] += 1
        return logits

    def _close_rows(self, st: State, rows: np.ndarray, pos: np.ndarray) -> None:
        """The chunk close for some rows only (CPU): their state rows in, their S and closed chunk
        back in place, so a batch whose rows close at different steps pays per closing row."""
        sess, io = self.sessions["close"], self.sessions["close"].io_binding()
        io.bind_cpu_input("position", pos[rows])
        for n in S.CLOSE_IN:
            io.bind_cpu_input(n, np.ascontiguousarray(self.to_host(st.xa if n == S.XA else st.cur[n])[rows]))
        kept = {n: np.empty(self.spec.shape(n, len(rows), self.capacity), dtype=np.float32)
                for n in self.spec.close_out if n not in S.BANKED}  # S (look-back: and the slid K, V)
        new = self._new_chunks(len(rows), 1)
        for name, arr in ({S.out_name(n): a for n, a in kept.items()} | new).items():
            io.bind_ortvalue_output(name, self._host_value(arr))
        sess.run_with_iobinding(io)
        for n, a in kept.items():
            self.write(st.cur[n], (rows,), a)
        st.bank(new, rows, pos[rows] // self.chunk, np.ones(len(rows), dtype=np.int64))

    def _check_ids(self, ids, what: str = "prompt") -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            raise InputError(f"{what} token ids must be integers, got {a.dtype}")
        if a.size == 0:
            raise InputError(f"{what} is empty: give at least one token")
        if a.min() < 0 or a.max() >= self.vocab_size:
            raise InputError(f"{what} token ids must lie in [0, {self.vocab_size}), got [{a.min()}, {a.max()}]")
        return a.astype(np.int64)
