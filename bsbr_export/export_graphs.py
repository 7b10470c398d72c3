"""The four graphs of an export, built node by node: prefill, extend, per-token decode, chunk close.

The graphs are built node by node (``bsbr_export.graph``) from the model's weights, so every op
is ours to choose; the BSBR attention itself comes from ``ops.onnx_graph`` (its fused step is
the local function ``bsbr::ChunkAttention[Normalised]``, which ONNX Runtime runs as is and
TensorRT's parser can replace with a plugin). ``inline=True`` writes the standard-ops graph.

The decode state's names, dims and layout are those of ``ops.state`` (batch first):

``model.onnx`` (prefill)
    input_ids int64 [batch, seq] -> logits [batch, seq, vocab] and the state after the prompt,
    per layer (state_k.0 ...; its banks hold the closed chunks: capacity = seq // chunk).
``decode.onnx`` (every token)
    input_ids [batch, 1], position int64 [batch] (tokens each row already holds), and per layer
    i state_k.i, state_v.i, state_S.i -> logits [batch, vocab], state_row_k.i, state_row_v.i
    [batch, head, 1, head_dim] (the token's k/v: the caller writes them at the row's slot
    position % chunk; the graph reads the state and writes none of it), state_xa_out.i (the
    token's ln_1 output).
``close.onnx`` (once per chunk, for the rows whose last decoded token filled the chunk)
    position [batch] (of that token), per layer state_k.i, state_v.i, state_xa.i, state_bank_h.i,
    state_bank_F.i (each row's bank at any capacity that holds its closed chunks) ->
    state_S_out.i (the next chunk's), state_new_h.i, state_new_F.i (the closed chunk, for the
    caller to bank). Keeping the banks out of the per-token graph reads them once per chunk.

Every state tensor is per layer (``ops.state``, format 5: ``NAME.LAYER``), so a runtime binds
each layer's buffer as it is. With the look-back local window (``local_window="lookback"``)
state_k/state_v hold the previous chunk's rows before the open chunk's (``StateSpec.window``),
the attention nodes are ``bsbr::ChunkAttention[Normalised]Lookback``, and the caller slides
K/V after a close.

Every float input and output is float32 (fp16 graphs cast at their edges); the metadata
property ``bsbr_export`` records the version, the configuration and the state format.
``ExportSpec`` says which graphs and forms an export holds (``export.export_onnx`` writes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import BSBRConfig
from .graph import NEG, Graph
from .ops import onnx_extend as ops_extend
from .ops import onnx_graph as ops_onnx
from .ops.onnx_short import causal_bias
from .ops import state

OPSET = 18


@dataclass(frozen=True)
class ExportSpec:
    """What an export writes and how it is validated (names, axes, opset, tolerances)."""

    max_seq_len: int = 1024
    opset: int = OPSET
    inline: bool = False
    fp16: bool = False
    # int8 dense weights, activations per token (MatMulIntegerToFloat); int8_head: the LM head too.
    int8: bool = False
    int8_head: bool = True
    # "bsbr"; "full" (standard causal attention) and "none" (dense floor) exist for benchmarks.
    attention: str = "bsbr"
    state_outputs: bool = True
    # The prefill graph takes plain causal attention, through one If per layer, for prompts within
    # the exact span (chunk size x (look-back + 1) tokens: nothing to retrieve), and so does the
    # extend graph for fresh rows. ORT runs it; the graphs TensorRT parses are written without it
    # (their plugin is not placed inside an If), and so are int8 graphs: their per-token
    # quantization can turn the two paths' fp32 rounding differences into whole quantization
    # steps, and an int8 prompt gives the same bits fed whole or in pieces (graph.Graph.qlinear).
    short_prompts: bool = True

    def __post_init__(self):
        from .errors import ConfigError

        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ConfigError(f"max sequence length must be an integer >= 1, got {self.max_seq_len!r}")
        if self.attention not in ("bsbr", "full", "none"):
            raise ConfigError(f"attention must be bsbr, full or none, got {self.attention!r}")
        if self.opset < 18:
            raise ConfigError(f"opset must be >= 18, got {self.opset}")
        if self.fp16 and self.int8:
            raise ConfigError("an export is fp16 or int8, not both")

    @property
    def short_path(self) -> bool:
        return self.short_prompts and not self.int8 and self.attention == "bsbr"

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8" if self.int8 else "fp32"


def _np(t):
    return t.detach().to("cpu").float().numpy()


class _Weights:
    """Names the model's tensors once in the graph; linear weights stored (in, out)."""

    def __init__(self, g: Graph, model, int8: bool = False, int8_head: bool = False):
        self.g, self.sd = g, {k: _np(v) for k, v in model.state_dict().items()}
        self.int8, self.int8_head = int8, int8 and int8_head

    def __call__(self, key, transpose=False):
        name = key
        if name not in self.g.inits:
            a = self.sd[key].T if transpose else self.sd[key]
            self.g.weight(name, a)
        return name

    def dense(self, key):
        """A dense layer's weight (stored (in, out)): int8 in an int8 export, else as ``__call__``."""
        if not self.int8:
            return self(key, True)
        name = key + ".int8"
        if name not in self.g.inits:
            self.g.qweight(name, self.sd[key].T)
        return name

    def head(self):
        """The LM head's weight (E, V) for ``Graph.linear`` when it is int8, else None."""
        if not self.int8_head:
            return None
        name = "wte.weight.T.int8"
        if name not in self.g.inits:
            self.g.qweight(name, self.sd["wte.weight"].T)
        return name


def _positions(g: Graph, cfg: BSBRConfig, t):
    """Position ids of int64 token indices ``t`` under the configured policy."""
    L, N = cfg.chunk_size, cfg.n_positions
    in_chunk = g.op("Mod", t, g.const(L))
    if cfg.position_policy == "chunk":
        return in_chunk
    return g.op("Where", g.op("Less", t, g.const(N)), t, g.op("Add", in_chunk, g.const(N - L)))


def _mlp_and_residual(g, W, cfg, p, x):
    m = g.linear(g.layer_norm(x, W(p + "ln_2.weight"), W(p + "ln_2.bias"), cfg.layer_norm_epsilon),
                 W.dense(p + "mlp.c_fc.weight"), W(p + "mlp.c_fc.bias"))
    m = g.linear(g.activation(m, cfg.activation_function), W.dense(p + "mlp.c_proj.weight"), W(p + "mlp.c_proj.bias"))
    return g.op("Add", x, m)


def _qkv(g, W, cfg, p, xa):
    E, H, d = cfg.n_embd, cfg.n_head, cfg.head_dim
    qkv = g.linear(xa, W.dense(p + "attn.c_attn.weight"), W(p + "attn.c_attn.bias"))
    q, k, v = g.op("Split", qkv, g.const([E, E, E]), axis=-1, outputs=3)
    return [g.split_heads(t, H, d) for t in (q, k, v)]  # (B, H, N, d)


def _graph_for(model, spec: ExportSpec, sink=None):
    """A graph builder in the export's precision (writing large weights to ``sink``) and the namer
    of the model's weights."""
    g = Graph(np.float16 if spec.fp16 else np.float32, sink=sink)
    return g, _Weights(g, model, int8=spec.int8, int8_head=spec.int8_head)


def _lm_head(g: Graph, W, cfg: BSBRConfig, x, rows: bool = True):
    """ln_f, then logits against the tied embedding: (..., E) -> (rows, V) (a Gemm), or with
    ``rows=False`` (B, T, E) -> (B, T, V) by one MatMul whose result is the graph's output
    itself: a Gemm on (B*T, E) and a Reshape would hold the [B*T, V] logits twice (GPT-2 small,
    8192 tokens x batch 3: 4.9 GB more at the peak)."""
    x = g.layer_norm(x, W("ln_f.weight"), W("ln_f.bias"), cfg.layer_norm_epsilon)
    head = W.head()
    if head is not None:  # int8: x @ wte^T from the transposed, quantized copy (the embedding stays fp32)
        return g.linear(g.op("Reshape", x, g.const([-1, cfg.n_embd])) if rows else x, head)
    if rows:
        return g.op("Gemm", g.op("Reshape", x, g.const([-1, cfg.n_embd])), W("wte.weight"), transB=1)
    return g.op("MatMul", x, g.op("Transpose", W("wte.weight"), perm=[1, 0]))


def _state_infos(spec: state.StateSpec, names, out: bool = False, seq=None):
    """Value infos of the state tensors ``names``, one per layer (``state_k.0`` ...: format 5);
    ``seq``: the k/v rows' length (the extend graph's piece: ``"piece_rows"``), else one."""
    from onnx import TensorProto, helper

    def shape(n):
        sh = spec.layer_shape(n)
        return sh[:2] + [seq] + sh[3:] if seq is not None and n in (state.ROW_K, state.ROW_V) else sh

    return [helper.make_tensor_value_info(state.layer_name(state.out_name(n) if out else n, i), TensorProto.FLOAT,
                                          shape(n)) for n in names for i in range(spec.layer)]


def _state_inputs(g: Graph, names, n_layer: int) -> dict:
    """{name: [layer 0's input, ...]} in the graph's precision."""
    return {n: [g.input(state.layer_name(n, i)) for i in range(n_layer)] for n in names}


def _state_outputs(g: Graph, values: dict, out: bool = True) -> None:
    """Expose per-layer lists of state values as the graph outputs ``NAME[_out].LAYER``."""
    for n, parts in values.items():
        for i, val in enumerate(parts):
            g.output(val, state.layer_name(state.out_name(n) if out else n, i))


def prefill_graph(model, spec: ExportSpec, sink=None):
    """The ``model.onnx`` graph: logits and the decode state after the prompt."""
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    E, d, L = cfg.n_embd, cfg.head_dim, cfg.chunk_size
    g, W = _graph_for(model, spec, sink)
    zero, one = g.const([0]), g.const([1])
    ids = "input_ids"
    T = g.dim(ids, 1)
    g.lead = g.op("Shape", ids)  # [B, T]: the dense layers' rows
    Tsc = g.op("Squeeze", T, zero)
    t = g.op("Range", g.const(0), Tsc, g.const(1))  # (T,)
    x = g.op("Add", g.op("Gather", W("wte.weight"), ids), g.op("Gather", W("wpe.weight"), _positions(g, cfg, t)))
    # Chunk bookkeeping: C chunks, last(j) = min((j+1)L, T) - 1, n_done complete chunks.
    L1 = g.const([L])
    C = g.op("Div", g.op("Add", T, g.const([L - 1])), L1)
    Csc = g.op("Squeeze", C, zero)
    j = g.op("Range", g.const(0), Csc, g.const(1))  # (C,)
    last = g.op("Sub", g.op("Min", g.op("Mul", g.op("Add", j, g.const(1)), g.const(L)), Tsc), g.const(1))
    n_done = g.op("Div", T, L1)  # (1,)
    n_cur = g.op("Sub", T, g.op("Mul", n_done, L1))
    n = cfg.lookback  # chunk i retrieves from chunks j < i - n
    decay = cfg.retrieval_weights == "decay"
    jn = g.op("Add", j, g.const(n)) if n else j
    earlier = g.op("Less", g.op("Unsqueeze", jn, zero), g.op("Unsqueeze", j, one))  # (C, C): [i, j] = j < i - n
    U = cfg.retrieving_chunks  # chunks i >= U retrieve nothing
    if U is not None:
        earlier = g.op("And", earlier, g.op("Less", g.op("Unsqueeze", j, one), g.const(U)))
    r_idx = g.op("Max", g.op("Sub", n_done, one), zero)  # meta query of the open chunk
    ctx = dict(T=T, C=C, L1=L1, last=last, n_done=n_done, n_cur=n_cur, earlier=earlier, r_idx=r_idx)
    if spec.short_path:  # T <= the exact span: causal attention (one mask)
        ctx["exact"] = g.op("LessOrEqual", Tsc, g.const(L * (cfg.lookback + 1)))
        ctx["causal_bias"] = causal_bias(g, T, ctx["exact"])
    jd = g.op("Range", g.const(0), g.op("Squeeze", n_done, zero), g.const(1)) if n or decay else None
    if n:  # the bank's chunks the open chunk n_done retrieves from: j < n_done - n, (1, n_done)
        ctx["bank_before_window"] = g.op("Unsqueeze", g.op("Less", g.op("Add", jd, g.const(n)), n_done), zero)
    if U is not None:  # none when the open chunk is past retrieval_until
        open_ok = g.op("Less", n_done, g.const([U]))  # (1,)
        ctx["bank_before_window"] = (g.op("And", ctx["bank_before_window"], open_ok) if n else open_ok)
    if decay:  # ages i - 1 - n - j of the decaying retrieval weights: (C, C), and the open chunk's (n_done,)
        ctx["age"] = g.op("Sub", g.op("Unsqueeze", g.op("Sub", j, g.const(1 + n)), one), g.op("Unsqueeze", j, zero))
        ctx["bank_age"] = g.op("Sub", g.op("Sub", n_done, g.const([1 + n])), jd)
    states = {n: [] for n in state.CARRIED}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), cfg.layer_norm_epsilon)
        q, k, v = _qkv(g, W, cfg, p, xa)
        if spec.attention == "bsbr":
            o = ops_onnx.bsbr_layer(g, W, cfg, p, xa, q, k, v, ctx, states if spec.state_outputs else None)
        elif spec.attention == "full":
            o = _full_attention(g, q, k, v, T, d)
        else:  # "none": the dense floor keeps every projection and skips attention itself
            o = v
        x = g.op("Add", x, g.linear(g.merge_heads(o, E), W.dense(p + "attn.c_proj.weight"),
                                    W(p + "attn.c_proj.bias")))
        x = _mlp_and_residual(g, W, cfg, p, x)
    g.output(_lm_head(g, W, cfg, x, rows=False), "logits")  # (B, T, V)
    inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]
    if all(states.values()):
        _state_outputs(g, states, out=False)
        outputs += _state_infos(model.state_spec(), state.CARRIED)
    return g, inputs, outputs


def extend_graph(model, spec: ExportSpec, sink=None):
    """The ``extend.onnx`` graph: each row takes its next ``lengths[b]`` tokens on top of the state
    it holds (``position[b]`` tokens), for prompts of any lengths and prompts fed in pieces.

    inputs: input_ids int64 [batch, seq] (right padded), lengths int64 [batch] (new tokens per
    row, 0 leaves a row as it is), position int64 [batch], logit_rows int64 [rows] (flat
    indices b x seq + t of the positions whose logits are returned: each row's last new token
    for generation, every position for prompt log-probabilities), the carried state at a fixed
    capacity; outputs: logits [rows, vocab], per layer state_row_k.i, state_row_v.i [batch, head,
    piece_rows, head_dim] (the piece's k/v from row s = max(0, min(lengths) - window) on, the rows a
    window can still hold: the caller writes them into the rows' windows, ``runtime.slots``), state_S_out.i, state_new_h.i, state_new_F.i (the chunks the piece closed).
    """
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    E = cfg.n_embd
    g, W = _graph_for(model, spec, sink)
    state_in = _state_inputs(g, state.CARRIED, cfg.n_layer)
    ctx = ops_extend.extend_context(g, cfg, "input_ids", "lengths", "position", state_in[state.BANK_H][0],
                                    short_prompts=spec.short_path)
    g.lead = g.op("Shape", "input_ids")  # [B, T]: the dense layers' rows (the piece's tokens)
    x = g.op("Add", g.op("Gather", W("wte.weight"), "input_ids"),
             g.op("Gather", W("wpe.weight"), _positions(g, cfg, ctx["positions"])))  # (B, T, E): the piece
    states = {n: [] for n in state.EXTEND_OUT}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), cfg.layer_norm_epsilon)
        q, k, v = _qkv(g, W, cfg, p, xa)
        o = ops_extend.extend_layer(g, W, cfg, p, xa, q, k, v, ctx | {"layer": i}, state_in, states)
        x = g.op("Add", x, g.linear(g.merge_heads(o, E), W.dense(p + "attn.c_proj.weight"),
                                    W(p + "attn.c_proj.bias")))
        x = _mlp_and_residual(g, W, cfg, p, x)
    # Logits at the positions ``logit_rows`` asks for (flat indices into (B x T)): (rows, V).
    picked = g.op("Gather", g.op("Reshape", x, g.const([-1, E])), state.LOGIT_ROWS, axis=0)
    g.output(_lm_head(g, W, cfg, picked), "logits")
    _state_outputs(g, states)
    st = model.state_spec()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("position", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info(state.LOGIT_ROWS, TensorProto.INT64, ["rows"])]
    inputs += _state_infos(st, state.CARRIED)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", cfg.vocab_size])]
    return g, inputs, outputs + _state_infos(st, state.EXTEND_OUT, out=True, seq="piece_rows")


def _full_attention(g: Graph, q, k, v, T, d):
    """Standard causal softmax attention over all T keys (T x T scores): the baseline graph."""
    from onnx import helper

    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                  g.fconst(1.0 / math.sqrt(d)))  # (B, H, T, T)
    ones = g.op("ConstantOfShape", g.cat(T, T), value=helper.make_tensor("one", 1, [1], [1.0]))
    causal = g.op("Cast", g.op("Trilu", ones, upper=0), to=9)
    return g.op("MatMul", g.softmax(g.op("Where", causal, scores, g.fconst(NEG))), v)


def decode_graph(model, spec: ExportSpec, sink=None):
    """The ``decode.onnx`` graph: one token per sequence over its state, which it reads and never
    writes. It returns the token's k/v per layer (``state_row_k.i``: the caller writes them at the
    row's slot) and its ln_1 output per layer (``state_xa_out.i``: the chunk close reads it)."""
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    E, L = cfg.n_embd, cfg.chunk_size
    g, W = _graph_for(model, spec, sink)
    zero, one = g.const([0]), g.const([1])
    pos = "position"  # (B,): tokens each row already holds
    g.lead = g.op("Shape", "input_ids")  # [B, 1]: the dense layers' rows
    slot = g.op("Unsqueeze", g.op("Mod", pos, g.const(L)), one)  # (B, 1)
    x = g.op("Add", g.op("Gather", W("wte.weight"), "input_ids"),
             g.op("Unsqueeze", g.op("Gather", W("wpe.weight"), _positions(g, cfg, pos)), one))  # (B, 1, E)
    # K/V rows: the open chunk is the last L of the state's ``window`` (look-back: the previous
    # chunk first); row r holds the open chunk's slot r - (window - L). The token sees the rows
    # before its own slot (its own key is a term of its own), and the previous chunk once there is one.
    rows = model.state_spec().window
    slots = g.op("Unsqueeze", g.op("Range", g.const(L - rows), g.const(L), g.const(1)), zero)  # (1, rows)
    seen = g.op("Less", slots, slot)
    if cfg.lookback:
        chunk = g.op("Unsqueeze", g.op("Div", pos, g.const(L)), one)  # (B, 1)
        seen = g.op("And", seen, g.op("GreaterOrEqual", slots, g.op("Mul", chunk, g.const(-L))))
    visible = g.op("Unsqueeze", seen, g.const([1, 2]))  # (B, 1, 1, rows)
    state_in = _state_inputs(g, state.DECODE_IN, cfg.n_layer)
    out = {n: [] for n in state.DECODE_OUT}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), cfg.layer_norm_epsilon)
        q, k, v = _qkv(g, W, cfg, p, xa)  # (B, H, 1, d)
        Ki, Vi, Si = (state_in[n][i] for n in state.DECODE_IN)
        o = ops_onnx.step_attention(g, W, cfg, p, q, k, v, Ki, Vi, visible, Si)  # (B, H, 1, d)
        x = g.op("Add", x, g.linear(g.merge_heads(o, E), W.dense(p + "attn.c_proj.weight"),
                                    W(p + "attn.c_proj.bias")))
        x = _mlp_and_residual(g, W, cfg, p, x)
        for n, val in zip(state.DECODE_OUT, (k, v, xa)):
            out[n].append(val)
    g.output(_lm_head(g, W, cfg, x), "logits")  # (B, V)
    _state_outputs(g, out)
    st = model.state_spec()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("position", TensorProto.INT64, ["batch"])]
    inputs += _state_infos(st, state.DECODE_IN)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])]
    outputs += _state_infos(st, state.DECODE_OUT, out=True)
    return g, inputs, outputs


def close_graph(model, spec: ExportSpec, sink=None):
    """The ``close.onnx`` graph, run once per chunk for the rows whose last decoded token filled
    its chunk's last slot: the next S and the closed chunk per layer (``ops.onnx_graph.close_chunk``)."""
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    g, W = _graph_for(model, spec, sink)
    state_in = _state_inputs(g, state.CLOSE_IN, cfg.n_layer)
    out = {n: [] for n in state.CLOSE_OUT}
    for i in range(cfg.n_layer):
        vals = ops_onnx.close_chunk(g, W, cfg, i, *(state_in[n][i] for n in state.CLOSE_IN), "position")
        for n, val in zip(state.CLOSE_OUT, vals):
            out[n].append(val)
    _state_outputs(g, out)
    st = model.state_spec()
    inputs = [helper.make_tensor_value_info("position", TensorProto.INT64, ["batch"])]
    inputs += _state_infos(st, state.CLOSE_IN)
    return g, inputs, _state_infos(st, state.CLOSE_OUT, out=True)
