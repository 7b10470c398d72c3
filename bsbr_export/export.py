"""BSBR model -> ONNX: the prefill graph (``model.onnx``) and the decode graph (``decode.onnx``).

The graphs are built node by node from the model's weights, so every op is ours to
choose. The fused chunk attention is an ONNX local function ``bsbr::ChunkAttention``
whose body is standard ops: ONNX Runtime runs it as is, and TensorRT's parser can
substitute a plugin of the same name and namespace. ``inline=True`` writes the
standard-ops-only graph instead.

Prefill graph (``model.onnx``)
    inputs:  input_ids int64 [batch, seq]
    outputs: logits float32 [batch, seq, vocab], and the decode state after the prompt:
             state_k, state_v   [n_layer, batch, H, L, d]   the open chunk's keys/values
             state_S            [n_layer, batch, H, d', d]  retrieved state of the open chunk
             state_bank_h       [n_layer, batch, H, n_closed, d]
             state_bank_F       [n_layer, batch, H, n_closed, d', d]
Decode graph (``decode.onnx``), every token
    inputs:  input_ids int64 [batch, 1], position int64 [] (tokens already consumed),
             state_k, state_v, state_S
    outputs: logits float32 [batch, vocab], state_k_out, state_v_out (the token written
             at slot position % L), state_xa_out [n_layer, batch, 1, E] (the token's ln_1
             output per layer, needed only when the chunk closes)
Chunk-closing graph (``close.onnx``), once per chunk, after the token at slot L - 1
    inputs:  position, state_k, state_v, state_xa, state_bank_h, state_bank_F
             (banks padded to a fixed capacity [.., C_max, ..])
    outputs: state_S_out (retrieved state of the next chunk), state_bank_h_out,
             state_bank_F_out (chunk position // L's F and meta key h written in)
    Splitting the closing step out keeps the banks out of the per-token graph: they are
    read and written once per chunk instead of being copied through every step.
The normalised retrieval carries the normaliser z as one extra column of every F and S.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import BSBRConfig

DOMAIN = "bsbr"
FUNCTION = "ChunkAttention"
OPSET = 18
NEG = -30000.0  # masked score: far below any real score, finite in fp16
STATE_NAMES = ("state_k", "state_v", "state_S", "state_bank_h", "state_bank_F")
DECODE_INPUTS = ("state_k", "state_v", "state_S")
CLOSE_INPUTS = ("state_k", "state_v", "state_xa", "state_bank_h", "state_bank_F")


@dataclass(frozen=True)
class ExportSpec:
    """What an export writes and how it is validated (names, axes, opset, tolerances)."""

    max_seq_len: int = 1024
    opset: int = OPSET
    inline: bool = False
    fp16: bool = False
    # "bsbr"; "full" (standard causal attention) and "none" (dense floor) exist for benchmarks.
    attention: str = "bsbr"
    state_outputs: bool = True
    input_names: tuple = ("input_ids",)
    output_names: tuple = ("logits",)
    dynamic_axes: dict = field(default_factory=lambda: {"input_ids": ("batch", "seq"),
                                                        "logits": ("batch", "seq", "vocab")})
    # Parity tolerance on logits (max abs) against torch fp32, per precision.
    atol: dict = field(default_factory=lambda: {"fp32": 1e-4})

    def __post_init__(self):
        from .errors import ConfigError

        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ConfigError(f"max sequence length must be an integer >= 1, got {self.max_seq_len!r}")
        if self.attention not in ("bsbr", "full", "none"):
            raise ConfigError(f"attention must be bsbr, full or none, got {self.attention!r}")
        if self.opset < 18:
            raise ConfigError(f"opset must be >= 18, got {self.opset}")


# --------------------------------------------------------------------------- graph builder

class Graph:
    """A small ONNX graph builder: unique names, numpy initializers, one call per node."""

    def __init__(self, float_dtype=np.float32, prefix=""):
        from onnx import TensorProto

        self.nodes, self.inits, self.n = [], {}, 0
        self.fdt = float_dtype
        self.fproto = TensorProto.FLOAT16 if float_dtype == np.float16 else TensorProto.FLOAT
        self.prefix = prefix

    def name(self, hint):
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def op(self, op_type, *inputs, outputs=1, domain="", name=None, **attrs):
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name or self.name(op_type),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def input(self, name):
        """A float32 graph input in the graph's precision (no Cast in fp32 graphs)."""
        return self.op("Cast", name, to=self.fproto) if self.fdt == np.float16 else name

    def output(self, value, name):
        """Expose ``value`` as the float32 graph output ``name``. In fp32 graphs the producing
        node's output is renamed rather than copied through a Cast."""
        from onnx import TensorProto

        if self.fdt == np.float16:
            return self.op("Cast", value, to=TensorProto.FLOAT, outputs=[name])
        for node in self.nodes:
            for seq in (node.output, node.input):
                for i, n in enumerate(seq):
                    if n == value:
                        seq[i] = name
        return name

    def weight(self, name, array, dtype=None):
        """An initializer in the graph's float type (or ``dtype``)."""
        a = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.fdt))
        assert name not in self.inits, name
        self.inits[name] = a
        return name

    def const(self, value, dtype=np.int64):
        a = np.asarray(value, dtype=dtype)
        key = f"const_{a.dtype}_{'_'.join(map(str, a.shape))}_{hashlib.md5(a.tobytes()).hexdigest()[:10]}"
        if key not in self.inits:
            self.inits[key] = a
        return key

    def fconst(self, value):
        return self.const(value, self.fdt)

    # -- building blocks
    def linear(self, x, w_name, b_name):
        return self.op("Add", self.op("MatMul", x, w_name), b_name)

    def layer_norm(self, x, w, b, eps):
        # LayerNorm is computed in fp32 whatever the graph's precision.
        from onnx import TensorProto

        if self.fdt == np.float16:
            y = self.op("LayerNormalization", self.op("Cast", x, to=TensorProto.FLOAT),
                        self.op("Cast", w, to=TensorProto.FLOAT), self.op("Cast", b, to=TensorProto.FLOAT),
                        axis=-1, epsilon=eps)
            return self.op("Cast", y, to=TensorProto.FLOAT16)
        return self.op("LayerNormalization", x, w, b, axis=-1, epsilon=eps)

    def gelu_tanh(self, x):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's gelu_new.
        x3 = self.op("Mul", self.op("Mul", x, x), x)
        inner = self.op("Mul", self.op("Add", x, self.op("Mul", x3, self.fconst(0.044715))),
                        self.fconst(math.sqrt(2.0 / math.pi)))
        return self.op("Mul", self.op("Mul", x, self.fconst(0.5)),
                       self.op("Add", self.op("Tanh", inner), self.fconst(1.0)))

    def activation(self, x, name):
        if name in ("gelu_new", "gelu_pytorch_tanh"):
            return self.gelu_tanh(x)
        if name == "gelu":
            return self.op("Mul", self.op("Mul", x, self.fconst(0.5)),
                           self.op("Add", self.op("Erf", self.op("Mul", x, self.fconst(1 / math.sqrt(2)))),
                                   self.fconst(1.0)))
        return self.op("Relu", x)

    def softmax(self, x, axis=-1):
        from onnx import TensorProto

        if self.fdt == np.float16:
            y = self.op("Softmax", self.op("Cast", x, to=TensorProto.FLOAT), axis=axis)
            return self.op("Cast", y, to=TensorProto.FLOAT16)
        return self.op("Softmax", x, axis=axis)

    def dim(self, x, i: int):
        """Dimension i >= 0 of x as a 1-element int64 tensor."""
        return self.op("Shape", x, start=i, end=i + 1)

    def cat(self, *parts):
        return self.op("Concat", *parts, axis=0)


# --------------------------------------------------------------------------- the local function

FUNCTION_NORMALISED = "ChunkAttentionNormalised"


def chunk_attention_function(opset: int, float_dtype=np.float32, normalised: bool = False):
    """The fused op as an ONNX local function with attribute ``chunk_size``.

    ``bsbr::ChunkAttention(q, k, v, S, g) -> o``:
        o_t = causal softmax over the keys of t's chunk + g * q_t S_{chunk(t)}.
    ``bsbr::ChunkAttentionNormalised(q, k, v, qf, S, Z, g) -> o`` (normalised retrieval):
        o_t = (sum_s e^{s_ts} v_s + g qf_t S) / (sum_s e^{s_ts} + g qf_t . Z).
    q, k, v, qf: (B, H, T, d); S: (B, H, C, d, d); Z: (B, H, C, d); g: (H,); o: (B, H, T, d).
    """
    from onnx import AttributeProto, helper

    g = Graph(float_dtype, prefix="f_")
    # L = the node's chunk_size attribute, through an attribute reference.
    L = "L"
    g.nodes.append(helper.make_node("Constant", [], [L], name="chunk_size_const"))
    g.nodes[-1].attribute.extend([helper.make_attribute_ref("value_int", AttributeProto.INT,
                                                            ref_attr_name="chunk_size")])
    consts = []  # function bodies hold constants as Constant nodes, not initializers

    def c(value, dtype=np.int64):
        name = g.name("c")
        consts.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), np.shape(value),
            np.asarray(value, dtype=dtype).flatten().tolist())))
        return name

    g.const = c  # type: ignore[method-assign]
    g.fconst = lambda v: c(v, float_dtype)  # type: ignore[method-assign]
    one, zero = c([1]), c([0])
    L1 = g.op("Reshape", L, one)  # (1,)
    shape = g.op("Shape", "q")  # [B, H, T, d]
    B_H = g.op("Slice", shape, zero, c([2]))
    T = g.op("Slice", shape, c([2]), c([3]))
    d = g.op("Slice", shape, c([3]), c([4]))
    C = g.op("Div", g.op("Sub", g.op("Add", T, L1), one), L1)
    padlen = g.op("Sub", g.op("Mul", C, L1), T)
    pads = g.cat(c([0, 0, 0]), zero, c([0, 0]), padlen, zero)  # pad the seq axis at its end
    chunked = g.cat(B_H, C, L1, d)  # (B, H, C, L, d)

    def chunks(x):
        return g.op("Reshape", g.op("Pad", x, pads), chunked)

    qc, kc, vc = chunks("q"), chunks("k"), chunks("v")
    scale = g.op("Div", g.fconst(1.0), g.op("Sqrt", g.op("Cast", d, to=g.fproto)))
    scores = g.op("Mul", g.op("MatMul", qc, g.op("Transpose", kc, perm=[0, 1, 2, 4, 3])), scale)  # (B,H,C,L,L)
    LL = g.cat(L1, L1)
    ones = g.op("ConstantOfShape", LL, value=helper.make_tensor("one", 1, [1], [1.0]))  # fp32: Trilu has kernels
    causal = g.op("Cast", g.op("Trilu", ones, upper=0), to=9)  # (L, L) bool, key <= query
    scores = g.op("Where", causal, scores, g.fconst(NEG))
    gg = g.op("Reshape", "g", c([1, -1, 1, 1, 1]))
    if normalised:
        o = _normalised_combine(g, scores, vc, chunks("qf"), "S", g.op("Unsqueeze", "Z", c([-1])), gg)
        inputs, name = ["q", "k", "v", "qf", "S", "Z", "g"], FUNCTION_NORMALISED
    else:
        local = g.op("MatMul", g.softmax(scores), vc)  # (B, H, C, L, d)
        o = g.op("Add", local, g.op("Mul", gg, g.op("MatMul", qc, "S")))
        inputs, name = ["q", "k", "v", "S", "g"], FUNCTION
    o = g.op("Reshape", o, g.cat(B_H, c([-1]), d))  # (B, H, C*L, d)
    g.op("Slice", o, zero, T, c([2]), outputs=["o"])
    return helper.make_function(DOMAIN, name, inputs, ["o"], consts + g.nodes,
                                [helper.make_opsetid("", opset)], attributes=["chunk_size"],
                                doc_string="BSBR fused chunk attention (see bsbr_export.attention)")


def _normalised_combine(g: Graph, scores, v, qf, S_full, Z_col, gg):
    """(E v + g e^{-M} qf S) / (rowsum(E) + g e^{-M} qf Z), E = e^{scores - M},
    M = max(rowmax(scores), 0), in fp32: the shared-denominator formula scaled by e^{-M}.

    scores (..., n_q, n_k) masked with NEG; v (..., n_k, d); qf (..., n_q, d);
    S_full (..., d, d); Z_col (..., d, 1); gg broadcastable to (..., n_q, 1).
    One exponential of the scores and no softmax: on CPU, ORT's ReduceLogSumExp kernel is
    much slower than ReduceMax + Exp + ReduceSum (it led the short-sequence profile before).
    """
    from onnx import TensorProto

    f32 = (lambda x: g.op("Cast", x, to=TensorProto.FLOAT)) if g.fdt == np.float16 else (lambda x: x)
    scores, v, qf, S_full, Z_col, gg = (f32(t) for t in (scores, v, qf, S_full, Z_col, gg))
    axis = g.const([-1])
    m = g.op("Max", g.op("ReduceMax", scores, axis, keepdims=1), g.const([0.0], np.float32))  # (..., n_q, 1)
    e = g.op("Exp", g.op("Sub", scores, m))  # masked entries -> 0, the rest <= 1
    wb = g.op("Mul", gg, g.op("Exp", g.op("Neg", m)))
    num = g.op("Add", g.op("MatMul", e, v), g.op("Mul", wb, g.op("MatMul", qf, S_full)))
    den = g.op("Add", g.op("ReduceSum", e, axis, keepdims=1), g.op("Mul", wb, g.op("MatMul", qf, Z_col)))
    o = g.op("Div", num, den)
    return g.op("Cast", o, to=TensorProto.FLOAT16) if g.fdt == np.float16 else o


def _feature(g: Graph, x, name: str):
    """The feature map before compression: identity, elu(x) + 1 or relu(x)."""
    if name == "elu1":
        # elu(x) + 1 = max(x, 0) + exp(min(x, 0)): ORT's CPU Elu kernel is slower than these three.
        return g.op("Add", g.op("Relu", x), g.op("Exp", g.op("Min", x, g.fconst(0.0))))
    if name == "relu":
        return g.op("Relu", x)
    return x


# --------------------------------------------------------------------------- model graphs

def _np(t):
    return t.detach().to("cpu").float().numpy()


class _Weights:
    """Names the model's tensors once in the graph; linear weights stored (in, out)."""

    def __init__(self, g: Graph, model):
        self.g, self.sd = g, {k: _np(v) for k, v in model.state_dict().items()}

    def __call__(self, key, transpose=False):
        name = key
        if name not in self.g.inits:
            a = self.sd[key].T if transpose else self.sd[key]
            self.g.weight(name, a)
        return name


def _split_heads(g: Graph, x, H, d):
    """(B, N, E) -> (B, H, N, d)."""
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, H, d])), perm=[0, 2, 1, 3])


def _merge_heads(g: Graph, x, E):
    """(B, H, N, d) -> (B, N, E)."""
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, E]))


def _positions(g: Graph, cfg: BSBRConfig, t):
    """Position ids of int64 token indices ``t`` under the configured policy."""
    L, N = cfg.chunk_size, cfg.n_positions
    in_chunk = g.op("Mod", t, g.const(L))
    if cfg.position_policy == "chunk":
        return in_chunk
    return g.op("Where", g.op("Less", t, g.const(N)), t, g.op("Add", in_chunk, g.const(N - L)))


def _mlp_and_residual(g, W, cfg, p, x):
    m = g.linear(g.layer_norm(x, W(p + "ln_2.weight"), W(p + "ln_2.bias"), cfg.layer_norm_epsilon),
                 W(p + "mlp.c_fc.weight", True), W(p + "mlp.c_fc.bias"))
    m = g.linear(g.activation(m, cfg.activation_function), W(p + "mlp.c_proj.weight", True), W(p + "mlp.c_proj.bias"))
    return g.op("Add", x, m)


def _qkv(g, W, cfg, p, xa):
    E, H, d = cfg.n_embd, cfg.n_head, cfg.head_dim
    qkv = g.linear(xa, W(p + "attn.c_attn.weight", True), W(p + "attn.c_attn.bias"))
    q, k, v = g.op("Split", qkv, g.const([E, E, E]), axis=-1, outputs=3)
    return [_split_heads(g, t, H, d) for t in (q, k, v)]  # (B, H, N, d)


def state_cols(cfg: BSBRConfig) -> int:
    """Columns of a chunk state: d, plus one for the normaliser z of the normalised retrieval."""
    return cfg.head_dim + (cfg.retrieval == "normalised")


def _retrieval_softmax(g, scores, allowed):
    """Softmax over allowed entries; a row with none allowed gives zeros."""
    p = g.softmax(g.op("Where", allowed, scores, g.fconst(NEG)))
    return g.op("Mul", p, g.op("Cast", allowed, to=g.fproto))


def _graph_for(model, spec: ExportSpec):
    """A graph builder in the export's precision and the namer of the model's weights."""
    g = Graph(np.float16 if spec.fp16 else np.float32)
    return g, _Weights(g, model)


def _lm_head(g: Graph, W, cfg: BSBRConfig, x):
    """ln_f, then logits against the tied embedding: (..., E) -> (rows, V)."""
    x = g.layer_norm(x, W("ln_f.weight"), W("ln_f.bias"), cfg.layer_norm_epsilon)
    return g.op("Gemm", g.op("Reshape", x, g.const([-1, cfg.n_embd])), W("wte.weight"), transB=1)


def prefill_graph(model, spec: ExportSpec):
    """The ``model.onnx`` graph: logits and the decode state after the prompt."""
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    E, H, d, dp, L = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size
    g, W = _graph_for(model, spec)
    zero, one = g.const([0]), g.const([1])
    ids = "input_ids"
    T = g.dim(ids, 1)
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
    earlier = g.op("Less", g.op("Unsqueeze", j, zero), g.op("Unsqueeze", j, one))  # (C, C): [i, j] = j < i
    closed = g.op("Less", j, n_done)  # (C,): chunk j complete
    r_idx = g.op("Max", g.op("Sub", n_done, one), zero)  # meta query of the open chunk
    ctx = dict(T=T, C=C, L1=L1, last=last, n_done=n_done, n_cur=n_cur, earlier=earlier, closed=closed,
               r_idx=r_idx)
    states = {n: [] for n in STATE_NAMES}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), cfg.layer_norm_epsilon)
        q, k, v = _qkv(g, W, cfg, p, xa)
        if spec.attention == "bsbr":
            o = _bsbr_layer(g, W, cfg, p, xa, q, k, v, ctx, states if spec.state_outputs else None)
        elif spec.attention == "full":
            o = _full_attention(g, q, k, v, T, d)
        else:  # "none": the dense floor keeps every projection and skips attention itself
            o = v
        x = g.op("Add", x, g.linear(_merge_heads(g, o, E), W(p + "attn.c_proj.weight", True),
                                    W(p + "attn.c_proj.bias")))
        x = _mlp_and_residual(g, W, cfg, p, x)
    logits = _lm_head(g, W, cfg, x)  # (B*T, V)
    logits = g.op("Reshape", logits, g.cat(g.dim(ids, 0), T, g.const([cfg.vocab_size])))
    g.output(logits, "logits")
    for n, parts in states.items():
        if parts:
            st = g.op("Concat", *[g.op("Unsqueeze", s_, zero) for s_ in parts], axis=0)
            g.output(st, n)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"])]
    nl, dc = cfg.n_layer, state_cols(cfg)
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "seq", cfg.vocab_size]),
               helper.make_tensor_value_info("state_k", f, [nl, "batch", H, L, d]),
               helper.make_tensor_value_info("state_v", f, [nl, "batch", H, L, d]),
               helper.make_tensor_value_info("state_S", f, [nl, "batch", H, dp, dc]),
               helper.make_tensor_value_info("state_bank_h", f, [nl, "batch", H, "closed_chunks", d]),
               helper.make_tensor_value_info("state_bank_F", f, [nl, "batch", H, "closed_chunks", dp, dc])]
    return g, inputs, outputs if states["state_k"] else outputs[:1]


def _bsbr_layer(g: Graph, W, cfg: BSBRConfig, p, xa, q, k, v, ctx, states):
    """BSBR attention of one layer -> o (B, H, T, d); appends the decode state to ``states``."""
    H, d, dp, L = cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size
    zero, one = g.const([0]), g.const([1])
    T, C, L1 = ctx["T"], ctx["C"], ctx["L1"]
    xl = g.op("Gather", xa, ctx["last"], axis=1)  # (B, C, E)
    h = _split_heads(g, g.linear(xl, W(p + "attn.meta_k.weight", True), W(p + "attn.meta_k.bias")), H, d)
    rp = _split_heads(g, g.linear(xl, W(p + "attn.meta_q.weight", True), W(p + "attn.meta_q.bias")), H, d)
    # r_i comes from the end of chunk i-1: shift by one chunk, r_0 unused (zeros).
    r = g.op("Concat", g.op("Mul", g.op("Slice", rp, zero, one, g.const([2])), g.fconst(0.0)),
             g.op("Slice", rp, zero, g.op("Sub", C, one), g.const([2])), axis=2)  # (B, H, C, d)
    # Chunk states F_j = phi(K_j)^T V_j.
    pads = g.cat(g.const([0, 0, 0, 0, 0, 0]), g.op("Sub", g.op("Mul", C, L1), T), zero)
    chunked = g.cat(g.const([0, H]), C, g.const([L, d]))
    norm = cfg.retrieval == "normalised"
    dc = d + 1 if norm else d  # the normalised retrieval carries z_j as an extra column of F_j
    # phi before padding: phi(0) need not be 0, padded rows must stay zero.
    kc = g.op("Reshape", g.op("Pad", _feature(g, k, cfg.feature_map), pads), chunked)  # (B, H, C, L, d)
    vc = g.op("Reshape", g.op("Pad", v, pads), chunked)
    U5 = None
    if cfg.compression is not None:
        U5 = g.op("Unsqueeze", W(p + "attn.U"), g.const([0, 2]))  # (1, H, 1, d, d')
        kc = g.op("MatMul", kc, U5)  # (B, H, C, L, d')
    Fs = g.op("MatMul", g.op("Transpose", kc, perm=[0, 1, 2, 4, 3]), vc)  # (B, H, C, d', d)
    if norm:
        z = g.op("ReduceSum", kc, g.const([-2]), keepdims=0)  # (B, H, C, d')
        Fs = g.op("Concat", Fs, g.op("Unsqueeze", z, g.const([-1])), axis=-1)  # (B, H, C, d', d+1)
    Ff = g.op("Reshape", Fs, g.cat(g.const([0, H]), C, g.const([dp * dc])))  # (B, H, C, d'dc)
    scale = g.fconst(1.0 / math.sqrt(d))
    hT = g.op("Transpose", h, perm=[0, 1, 3, 2])
    sc = g.op("Mul", g.op("MatMul", r, hT), scale)  # (B, H, C, C)
    SZ = g.op("Reshape", g.op("MatMul", _retrieval_softmax(g, sc, ctx["earlier"]), Ff),
              g.cat(g.const([0, H]), C, g.const([dp, dc])))  # (B, H, C, d', dc)
    expand = (lambda t: g.op("MatMul", U5, t)) if U5 is not None else (lambda t: t)
    if norm:
        S, Zc = g.op("Split", SZ, g.const([d, 1]), axis=-1, outputs=2)
        Z_full = g.op("Squeeze", expand(Zc), g.const([-1]))  # (B, H, C, d)
        o = g.op(FUNCTION_NORMALISED, q, k, v, _feature(g, q, cfg.feature_map), expand(S), Z_full,
                 W(p + "attn.g"), domain=DOMAIN, chunk_size=L, plugin_namespace=DOMAIN)
    else:
        o = g.op(FUNCTION, q, k, v, expand(SZ), W(p + "attn.g"), domain=DOMAIN, chunk_size=L,
                 plugin_namespace=DOMAIN)
    if states is None:
        return o
    # Decode state after the prompt: the open chunk's k/v, its S, the bank of closed chunks.
    n_done, n_cur = ctx["n_done"], ctx["n_cur"]
    r_state = g.op("Gather", rp, ctx["r_idx"], axis=2)  # (B, H, 1, d)
    sc_state = g.op("Mul", g.op("MatMul", r_state, hT), scale)  # (B, H, 1, C)
    S_state = g.op("Reshape", g.op("MatMul", _retrieval_softmax(g, sc_state, ctx["closed"]), Ff),
                   g.const([0, H, dp, dc]))  # (B, H, d', dc)
    for name, t_ in (("state_k", k), ("state_v", v)):
        open_rows = g.op("Slice", t_, g.op("Mul", n_done, L1), T, g.const([2]))  # (B, H, n_cur, d)
        states[name].append(g.op("Pad", open_rows, g.cat(g.const([0, 0, 0, 0, 0, 0]), g.op("Sub", L1, n_cur), zero)))
    states["state_S"].append(S_state)
    states["state_bank_h"].append(g.op("Slice", h, zero, n_done, g.const([2])))
    states["state_bank_F"].append(g.op("Slice", Fs, zero, n_done, g.const([2])))
    return o


def _full_attention(g: Graph, q, k, v, T, d):
    """Standard causal softmax attention over all T keys (T x T scores): the baseline graph."""
    from onnx import helper

    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                  g.fconst(1.0 / math.sqrt(d)))  # (B, H, T, T)
    ones = g.op("ConstantOfShape", g.cat(T, T), value=helper.make_tensor("one", 1, [1], [1.0]))
    causal = g.op("Cast", g.op("Trilu", ones, upper=0), to=9)
    return g.op("MatMul", g.softmax(g.op("Where", causal, scores, g.fconst(NEG))), v)


def decode_graph(model, spec: ExportSpec):
    """The ``decode.onnx`` graph: one token per sequence, state in, state out."""
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    E, H, d, L, nl = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.chunk_size, cfg.n_layer
    g, W = _graph_for(model, spec)
    zero, one = g.const([0]), g.const([1])
    pos = g.op("Reshape", "position", one)  # (1,)
    slot = g.op("Mod", pos, g.const([L]))
    x = g.op("Add", g.op("Gather", W("wte.weight"), "input_ids"),
             g.op("Unsqueeze", g.op("Gather", W("wpe.weight"), _positions(g, cfg, pos)), zero))  # (B, 1, E)
    slots = g.op("Range", g.const(0), g.const(L), g.const(1))  # (L,)
    at_slot = g.op("Unsqueeze", g.op("Equal", slots, slot), one)  # (L, 1)
    visible = g.op("Unsqueeze", g.op("LessOrEqual", slots, slot), zero)  # (1, L)
    scale = g.fconst(1.0 / math.sqrt(d))
    state_in = {n: g.input(n) for n in DECODE_INPUTS}
    layer = {n: [] for n in ("k", "v", "xa")}
    for i in range(nl):
        p = f"h.{i}."
        li = g.const([i])
        own = {n: g.op("Squeeze", g.op("Gather", state_in[n], li, axis=0), zero) for n in DECODE_INPUTS}
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), cfg.layer_norm_epsilon)
        q, k, v = _qkv(g, W, cfg, p, xa)  # (B, H, 1, d)
        kk = g.op("Where", at_slot, k, own["state_k"])  # (B, H, L, d)
        vv = g.op("Where", at_slot, v, own["state_v"])
        sc = g.op("Mul", g.op("MatMul", q, g.op("Transpose", kk, perm=[0, 1, 3, 2])), scale)  # (B, H, 1, L)
        qs = _feature(g, q, cfg.feature_map)
        if cfg.compression is not None:
            qs = g.op("MatMul", qs, g.op("Unsqueeze", W(p + "attn.U"), zero))  # (B, H, 1, d')
        gH = g.op("Reshape", W(p + "attn.g"), g.const([1, H, 1, 1]))
        if cfg.retrieval == "normalised":
            S, Zc = g.op("Split", own["state_S"], g.const([d, 1]), axis=-1, outputs=2)  # (B,H,d',d), (B,H,d',1)
            masked = g.op("Where", visible, sc, g.fconst(NEG))
            o = _normalised_combine(g, masked, vv, qs, S, Zc, gH)  # (B, H, 1, d)
        else:
            local = g.op("MatMul", g.softmax(g.op("Where", visible, sc, g.fconst(NEG))), vv)  # (B, H, 1, d)
            o = g.op("Add", local, g.op("Mul", gH, g.op("MatMul", qs, own["state_S"])))
        x = g.op("Add", x, g.linear(_merge_heads(g, o, E), W(p + "attn.c_proj.weight", True),
                                    W(p + "attn.c_proj.bias")))
        x = _mlp_and_residual(g, W, cfg, p, x)
        layer["k"].append(kk)
        layer["v"].append(vv)
        layer["xa"].append(xa)

    def stack(parts):
        return g.op("Concat", *[g.op("Unsqueeze", s_, zero) for s_ in parts], axis=0)

    logits = _lm_head(g, W, cfg, x)  # (B, V)
    g.output(logits, "logits")
    for n in ("k", "v", "xa"):
        g.output(stack(layer[n]), f"state_{n}_out")
    f = TensorProto.FLOAT
    shapes = state_shapes(cfg)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("position", TensorProto.INT64, [])]
    inputs += [helper.make_tensor_value_info(n, f, shapes[n]) for n in DECODE_INPUTS]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(n + "_out", f, shapes[n]) for n in ("state_k", "state_v", "state_xa")]
    return g, inputs, outputs


def state_shapes(cfg: BSBRConfig) -> dict:
    nl, H, L, d, dp, dc = cfg.n_layer, cfg.n_head, cfg.chunk_size, cfg.head_dim, cfg.state_dim, state_cols(cfg)
    return {"state_k": [nl, "batch", H, L, d], "state_v": [nl, "batch", H, L, d],
            "state_S": [nl, "batch", H, dp, dc], "state_bank_h": [nl, "batch", H, "capacity", d],
            "state_bank_F": [nl, "batch", H, "capacity", dp, dc], "state_xa": [nl, "batch", 1, cfg.n_embd]}


def close_graph(model, spec: ExportSpec):
    """The ``close.onnx`` graph, run once per chunk after the token that fills its last slot.

    inputs: position (of that token), state_k/state_v (the full chunk), state_xa (that token's
    ln_1 output per layer), state_bank_h/state_bank_F; outputs: state_S for the next chunk and
    the banks with chunk position // L written in.
    """
    from onnx import TensorProto, helper

    cfg: BSBRConfig = model.cfg
    g, W = _graph_for(model, spec)
    zero = g.const([0])
    chunk = g.op("Div", g.op("Reshape", "position", g.const([1])), g.const([cfg.chunk_size]))  # (1,)
    state_in = {n: g.input(n) for n in CLOSE_INPUTS}
    layer = {n: [g.op("Squeeze", g.op("Gather", state_in[f"state_{n}"], g.const([i]), axis=0), zero)
                 for i in range(cfg.n_layer)] for n in ("k", "v", "xa")}
    outs = _close_chunk(g, W, cfg, layer, state_in, chunk)
    for n, val in zip(("state_S", "state_bank_h", "state_bank_F"), outs):
        g.output(val, n + "_out")
    f, shapes = TensorProto.FLOAT, state_shapes(cfg)
    inputs = [helper.make_tensor_value_info("position", TensorProto.INT64, [])]
    inputs += [helper.make_tensor_value_info(n, f, shapes[n]) for n in CLOSE_INPUTS]
    outputs = [helper.make_tensor_value_info(n + "_out", f, shapes[n])
               for n in ("state_S", "state_bank_h", "state_bank_F")]
    return g, inputs, outputs


def _close_chunk(b: Graph, W, cfg: BSBRConfig, layer, state_in, chunk):
    """Bank F_j and h_j at j = chunk, build S for chunk j+1: (S, bank_h, bank_F), all layers."""
    H, d, dp = cfg.n_head, cfg.head_dim, cfg.state_dim
    zero, one = b.const([0]), b.const([1])
    cap = b.dim(state_in["state_bank_h"], 3)
    jj = b.op("Range", b.const(0), b.op("Squeeze", cap, zero), b.const(1))  # (cap,)
    at_j = b.op("Equal", jj, chunk)  # (cap,)
    upto_j = b.op("Unsqueeze", b.op("LessOrEqual", jj, chunk), zero)  # (1, cap)
    at_j_h = b.op("Unsqueeze", at_j, one)  # (cap, 1)
    at_j_F = b.op("Unsqueeze", at_j, b.const([1, 2]))  # (cap, 1, 1)
    out = {n: [] for n in ("state_S", "state_bank_h", "state_bank_F")}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        li = b.const([i])
        own = {n: b.op("Squeeze", b.op("Gather", state_in[n], li, axis=0), zero)
               for n in ("state_bank_h", "state_bank_F")}
        kk, vv, xa = layer["k"][i], layer["v"][i], layer["xa"][i]  # (B, H, L, d), (B, H, L, d), (B, 1, E)
        kk = _feature(b, kk, cfg.feature_map)
        if cfg.compression is not None:
            kk = b.op("MatMul", kk, b.op("Unsqueeze", W(p + "attn.U"), zero))  # (B, H, L, d')
        Fj = b.op("MatMul", b.op("Transpose", kk, perm=[0, 1, 3, 2]), vv)  # (B, H, d', d)
        if cfg.retrieval == "normalised":  # z_j as the extra column
            zj = b.op("Transpose", b.op("ReduceSum", kk, b.const([-2]), keepdims=1), perm=[0, 1, 3, 2])  # (B,H,d',1)
            Fj = b.op("Concat", Fj, zj, axis=-1)  # (B, H, d', d+1)
        hj = _split_heads(b, b.linear(xa, W(p + "attn.meta_k.weight", True), W(p + "attn.meta_k.bias")), H, d)
        bank_h = b.op("Where", at_j_h, hj, own["state_bank_h"])  # (B, H, cap, d)
        bank_F = b.op("Where", at_j_F, b.op("Unsqueeze", Fj, b.const([2])), own["state_bank_F"])
        r = _split_heads(b, b.linear(xa, W(p + "attn.meta_q.weight", True), W(p + "attn.meta_q.bias")), H, d)
        sc = b.op("Mul", b.op("MatMul", r, b.op("Transpose", bank_h, perm=[0, 1, 3, 2])),
                  b.fconst(1.0 / math.sqrt(d)))  # (B, H, 1, cap)
        pj = _retrieval_softmax(b, sc, upto_j)
        Fflat = b.op("Reshape", bank_F, b.const([0, H, -1, dp * state_cols(cfg)]))
        S = b.op("Reshape", b.op("MatMul", pj, Fflat), b.const([0, H, dp, state_cols(cfg)]))  # (B, H, d', dc)
        out["state_S"].append(S)
        out["state_bank_h"].append(bank_h)
        out["state_bank_F"].append(bank_F)
    return [b.op("Concat", *[b.op("Unsqueeze", s_, zero) for s_ in parts], axis=0) for parts in out.values()]


# --------------------------------------------------------------------------- writing

def _model_proto(g: Graph, inputs, outputs, name, spec: ExportSpec, cfg: BSBRConfig):
    import json

    import onnx
    from onnx import helper, numpy_helper

    from . import __version__

    graph = helper.make_graph(g.nodes, name, inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in g.inits.items()])
    opsets = [helper.make_opsetid("", spec.opset), helper.make_opsetid(DOMAIN, 1)]
    fn = chunk_attention_function(spec.opset, g.fdt, normalised=cfg.retrieval == "normalised")
    m = helper.make_model(graph, opset_imports=opsets, functions=[fn], producer_name="bsbr-export",
                          ir_version=10)
    meta = {"bsbr_export_version": __version__, "max_seq_len": spec.max_seq_len, "config": cfg.to_dict(),
            "precision": "fp16" if spec.fp16 else "fp32", "inlined": spec.inline}
    helper.set_model_props(m, {"bsbr_export": json.dumps(meta)})
    if spec.inline:
        import onnx.inliner

        m = onnx.inliner.inline_local_functions(m)
        del m.opset_import[:]
        m.opset_import.extend([helper.make_opsetid("", spec.opset)])
    return m


def _save(m, path: Path):
    import onnx

    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)


def onnx_name(graph: str, spec: ExportSpec) -> str:
    """model.onnx / decode.onnx, with an _fp16 suffix for the half-precision graphs."""
    return f"{graph}{'_fp16' if spec.fp16 else ''}.onnx"


def export_onnx(model, out_dir, spec: ExportSpec = ExportSpec(), decode: bool = True, progress=None) -> dict:
    """Write ``model.onnx`` (+ ``decode.onnx``) with external data into ``out_dir``.

    Files are written and checked in a temporary directory next to ``out_dir``;
    only complete, checked files are moved in. Returns {file name: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    written = {}
    try:
        jobs = [(onnx_name("model", spec), prefill_graph, "bsbr_prefill")]
        if decode:
            jobs.append((onnx_name("decode", spec), decode_graph, "bsbr_decode"))
            jobs.append((onnx_name("close", spec), close_graph, "bsbr_close_chunk"))
        for fname, build, gname in jobs:
            if progress:
                progress(f"building {fname}")
            g, inputs, outputs = build(model, spec)
            m = _model_proto(g, inputs, outputs, gname, spec, model.cfg)
            if progress:
                progress(f"writing and checking {fname}")
            _save(m, tmp / fname)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            if f.suffix == ".onnx":
                written[f.name] = out / f.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
