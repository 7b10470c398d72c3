"""BSBR attention as ONNX nodes: the fused op's local function and the pieces the graphs share.

The same small pieces as the torch forms (``ops.chunk``, ``ops.recurrent``), written once as
graph nodes through ``bsbr_export.graph.Graph``:

    feature        the feature map (identity, elu+1, relu)
    chunk_states   F_j = phi(K_j)^T V_j, with z_j as a last column for the normalised retrieval
    attend         masked local scores + the retrieved term -> o (plain sum or normalised combine)
    combine        the normalised shared-denominator formula, in fp32
    chunk_attention_function   the fused op ``bsbr::ChunkAttention[Normalised][Lookback]`` (local
                   function with attribute ``chunk_size``; TensorRT may swap in a plugin of the
                   same name; ``Lookback``: the local softmax also covers the previous chunk)
    bsbr_layer     one layer's attention over a whole prompt, and the decode state after it
    step_attention one token's attention over the earlier rows of its window, itself and its
                   retrieved state (the state read, never rewritten)
    close_chunk    one layer's chunk close: the finished chunk's h, F and the next chunk's S,
                   the bank read in place

The extend graph's pieces (a prefill that continues a state) are in ``ops.onnx_extend``. State
tensors are batch first, one layer each, and named by ``ops.state``.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph import NEG, Graph
from .onnx_short import causal_attention
from .state import BANK_F, BANK_H, K, S, V, StateSpec

DOMAIN = "bsbr"
FUNCTION = "ChunkAttention"
FUNCTION_NORMALISED = "ChunkAttentionNormalised"
LOOKBACK_SUFFIX = "Lookback"  # the same ops with the look-back local window: ChunkAttentionLookback ...


def function_name(normalised: bool, lookback: int = 0) -> str:
    """The fused op's name: ChunkAttention[Normalised][Lookback]."""
    return (FUNCTION_NORMALISED if normalised else FUNCTION) + (LOOKBACK_SUFFIX if lookback else "")


def feature(g: Graph, x, name: str):
    """The elementwise feature map before compression: identity, elu(x) + 1 or relu(x)."""
    if name == "elu1":
        # elu(x) + 1 = max(x, 0) + exp(min(x, 0)): ORT's CPU Elu kernel is slower than these three.
        return g.op("Add", g.op("Relu", x), g.op("Exp", g.op("Min", x, g.fconst(0.0))))
    if name not in ("relu", "identity"):
        raise ValueError(f"feature map {name!r} has no ONNX form")
    return g.op("Relu", x) if name == "relu" else x


def phi(g: Graph, W, cfg, p, x):
    """The layer's feature map on x (B, H, N, d): ``feature``, the learned map elu(x W_h + b_h) + 1
    with the layer's W (H, d, d) and b (H, d) (``ops.chunk.LearnedFeature``), or the hedgehog map
    [softmax(x W_h), softmax(-x W_h)], W (H, d, d/2) (``ops.chunk.HedgehogFeature``)."""
    if cfg.feature_map == "hedgehog":
        y = g.op("MatMul", x, W(p + "attn.fm.W"))  # (B, H, N, d/2)
        return g.op("Concat", g.op("Softmax", y, axis=-1), g.op("Softmax", g.op("Neg", y), axis=-1), axis=-1)
    if cfg.feature_map != "learned":
        return feature(g, x, cfg.feature_map)
    b = g.op("Unsqueeze", W(p + "attn.fm.b"), g.const([1]))  # (H, 1, d)
    return feature(g, g.op("Add", g.op("MatMul", x, W(p + "attn.fm.W")), b), "elu1")


def _last_two_swapped(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def chunk_states(g: Graph, fk, v, U, normalised: bool, rank: int):
    """F = fk^T v over the chunk axis (-2), fk = feature(k) of rank ``rank`` (..., L, d), times U
    (broadcastable (..., d, d') or None) first; with the normaliser z = sum fk as a last column:
    (..., d', d [+ 1])."""
    if U is not None:
        fk = g.op("MatMul", fk, U)  # (..., L, d')
    Fs = g.op("MatMul", g.op("Transpose", fk, perm=_last_two_swapped(rank)), v)  # (..., d', d)
    if normalised:
        z = g.op("ReduceSum", fk, g.const([-2]), keepdims=0)  # (..., d')
        Fs = g.op("Concat", Fs, g.op("Unsqueeze", z, g.const([-1])), axis=-1)  # (..., d', d + 1)
    return Fs


def attend_two(g: Graph, own, prev, v, v_prev, qs, S_full, Z_col, gg, normalised: bool, later):
    """``attend`` over two blocks of keys scored apart: the chunk's own (own, masked by an additive
    bias, and v) and the previous chunk's (prev, v_prev), with one row maximum. ``later`` (C, 1, 1)
    is false for chunk 0, whose previous block (zero keys and values) counts nothing: its exponentials
    leave the denominator after the row sums, never through a (C, L, L) mask (the normalised row
    maximum is at least 0, the zero keys' score, so they cannot raise it). Plain: softmax over both
    blocks + g qs S; normalised: ``combine``'s formula over both."""
    from onnx import TensorProto

    f32 = (lambda x: g.op("Cast", x, to=TensorProto.FLOAT)) if g.fdt == np.float16 else (lambda x: x)
    own, prev, v, v_prev, qs, S_full, gg = (f32(t) for t in (own, prev, v, v_prev, qs, S_full, gg))
    axis = g.const([-1])
    if not normalised:  # a plain row maximum may be below 0: chunk 0's block is masked outright
        prev = g.op("Add", prev, g.op("Where", later, g.const([0.0], np.float32), g.const([NEG], np.float32)))
    m = g.op("Max", g.op("ReduceMax", own, axis, keepdims=1), g.op("ReduceMax", prev, axis, keepdims=1))
    if normalised:
        m = g.op("Max", m, g.const([0.0], np.float32))
    e_own, e_prev = g.op("Exp", g.op("Sub", own, m)), g.op("Exp", g.op("Sub", prev, m))
    num = g.op("Add", g.op("MatMul", e_own, v), g.op("MatMul", e_prev, v_prev))
    den_prev = g.op("Mul", g.op("ReduceSum", e_prev, axis, keepdims=1), g.op("Cast", later, to=TensorProto.FLOAT))
    den = g.op("Add", g.op("ReduceSum", e_own, axis, keepdims=1), den_prev)
    qS = g.op("MatMul", qs, S_full)
    if normalised:
        wb = g.op("Mul", gg, g.op("Exp", g.op("Neg", m)))
        o = g.op("Div", g.op("Add", num, g.op("Mul", wb, qS)),
                 g.op("Add", den, g.op("Mul", wb, g.op("MatMul", qs, f32(Z_col)))))
    else:
        o = g.op("Add", g.op("Div", num, den), g.op("Mul", gg, qS))
    return g.op("Cast", o, to=TensorProto.FLOAT16) if g.fdt == np.float16 else o


def combine(g: Graph, scores, v, qf, S_full, Z_col, gg, v_self=None):
    """(E v + g e^{-M} qf S) / (rowsum(E) + g e^{-M} qf Z), E = e^{scores - M},
    M = max(rowmax(scores), 0), in fp32: the shared-denominator formula scaled by e^{-M}.

    scores (..., n_q, n_k) masked with NEG; v (..., n_k, d); qf (..., n_q, d);
    S_full (..., d, d); Z_col (..., d, 1); gg broadcastable to (..., n_q, 1).
    One exponential of the scores and no softmax: on CPU, ORT's ReduceLogSumExp kernel is
    much slower than ReduceMax + Exp + ReduceSum (it led the short-sequence profile before).
    ``v_self`` and ``Z_col`` None: see ``attend`` (then S_full is the (..., d', d + 1) state
    with Z as its last column, read by one product).
    """
    from onnx import TensorProto

    f32 = (lambda x: g.op("Cast", x, to=TensorProto.FLOAT)) if g.fdt == np.float16 else (lambda x: x)
    scores, v, qf, S_full, gg = (f32(t) for t in (scores, v, qf, S_full, gg))
    axis = g.const([-1])
    m = g.op("Max", g.op("ReduceMax", scores, axis, keepdims=1), g.const([0.0], np.float32))  # (..., n_q, 1)
    e = g.op("Exp", g.op("Sub", scores, m))  # masked entries -> 0, the rest <= 1
    wb = g.op("Mul", gg, g.op("Exp", g.op("Neg", m)))
    if Z_col is None:  # one product with the state, then its columns: S and Z are never split
        qS, qZ = _columns(g, g.op("MatMul", qf, S_full))
    else:
        qS, qZ = g.op("MatMul", qf, S_full), g.op("MatMul", qf, f32(Z_col))
    num = g.op("Add", _values(g, e, v, None if v_self is None else f32(v_self)), g.op("Mul", wb, qS))
    den = g.op("Add", g.op("ReduceSum", e, axis, keepdims=1), g.op("Mul", wb, qZ))
    o = g.op("Div", num, den)
    return g.op("Cast", o, to=TensorProto.FLOAT16) if g.fdt == np.float16 else o


def _columns(g: Graph, x):
    """x (..., d + 1) -> its first d columns and its last one (small tensors: a product's result)."""
    return (g.op("Slice", x, g.const([0]), g.const([-1]), g.const([-1])),
            g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([-1])))


def _values(g: Graph, w, v, v_self):
    """w v over the keys; with ``v_self`` the last column of w weighs v_self (the query's own
    value, which is in no key tensor) and the others v."""
    if v_self is None:
        return g.op("MatMul", w, v)
    w_keys, w_self = _columns(g, w)
    return g.op("Add", g.op("MatMul", w_keys, v), g.op("Mul", w_self, v_self))


def attend(g: Graph, scores, v, qs, S_full, Z_col, gg, v_self=None, normalised=None):
    """Masked local scores (..., n_q, n_k) and the retrieved state -> o (..., n_q, d).
    Plain (``Z_col`` None and not ``normalised``): softmax(scores) v + g qs S. Normalised: ``combine``.
    ``v_self`` (..., 1, d): the last score column is the query's own key and v_self its value, v
    holds the other keys' (the decode step, which reads its window and never writes into it).
    ``normalised=True`` with ``Z_col`` None: S_full carries Z as its last column (read as is)."""
    if Z_col is not None or normalised:
        return combine(g, scores, v, qs, S_full, Z_col, gg, v_self)
    return g.op("Add", _values(g, g.softmax(scores), v, v_self), g.op("Mul", gg, g.op("MatMul", qs, S_full)))


def chunk_attention_function(opset: int, float_dtype=np.float32, normalised: bool = False, lookback: int = 0):
    """The fused op as an ONNX local function with attribute ``chunk_size``.

    ``bsbr::ChunkAttention(q, k, v, S, g) -> o``:
        o_t = causal softmax over the keys of t's chunk + g * q_t S_{chunk(t)}.
    ``bsbr::ChunkAttentionNormalised(q, k, v, qf, S, Z, g) -> o`` (normalised retrieval):
        o_t = (sum_s e^{s_ts} v_s + g qf_t S) / (sum_s e^{s_ts} + g qf_t . Z).
    q, k, v, qf: (B, H, T, d); S: (B, H, C, d, d); Z: (B, H, C, d); g: (H,); o: (B, H, T, d).
    ``lookback=1`` names them ``...Lookback``: the softmax of t covers the keys s <= t of t's chunk
    and all keys of the chunk before it (scores (B, H, C, L, 2L)).
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
    shape = g.op("Shape", "q")  # [B, H, T, d]
    B_H = g.op("Slice", shape, zero, c([2]))
    T = g.op("Slice", shape, c([2]), c([3]))
    d = g.op("Slice", shape, c([3]), c([4]))
    # Chunks of min(L, T) tokens: a prompt within one chunk is one chunk of T tokens (no padding to
    # L, no L x L scores); longer prompts are chunks of L, the last one padded.
    L1 = g.op("Min", g.op("Reshape", L, one), T)  # (1,)
    C = g.op("Div", g.op("Sub", g.op("Add", T, L1), one), L1)
    padlen = g.op("Sub", g.op("Mul", C, L1), T)
    chunked = g.cat(B_H, C, L1, d)  # (B, H, C, L, d)
    exact = g.op("Equal", g.op("Squeeze", padlen, zero), c(0))
    names = ["q", "k", "v"] + (["qf"] if normalised else [])
    # A Pad copies even when it adds nothing: a length that is a multiple of the chunk is only
    # reshaped (an If over the remainder; its branch reads the inputs in place).
    pads = g.cat(c([0, 0, 0]), zero, c([0, 0]), padlen, zero)  # pad the seq axis at its end
    qc, kc, vc, *rest = _branch(g, exact, names, lambda x: g.op("Reshape", x, chunked),
                                lambda x: g.op("Reshape", g.op("Pad", x, pads), chunked))
    scale = g.op("Div", g.fconst(1.0), g.op("Sqrt", g.op("Cast", d, to=g.fproto)))
    LL = g.cat(L1, L1)
    ones = g.op("ConstantOfShape", LL, value=helper.make_tensor("one", 1, [1], [1.0]))  # fp32: Trilu has kernels
    causal = g.op("Cast", g.op("Trilu", ones, upper=0), to=9)  # (L, L) bool, key <= query
    bias = g.op("Where", causal, g.fconst(0.0), g.fconst(NEG))  # (L, L): added, never a (C, L, L) Where
    gg = g.op("Reshape", "g", c([1, -1, 1, 1, 1]))
    qs = rest[0] if normalised else qc
    S_in, Z_col = "S", g.op("Unsqueeze", "Z", c([-1])) if normalised else None
    kT = lambda x: g.op("Transpose", x, perm=[0, 1, 2, 4, 3])  # noqa: E731
    if lookback:
        # The previous chunk as an L x L block of its own: scores against the chunk-shifted K/V (one
        # Pad each: L zero rows in front, L rows fewer at the end), one row maximum shared by the two
        # blocks; no (C, L, 2L) concatenation of keys, values or mask.
        shift = g.cat(c([0, 0]), L1, zero, c([0, 0]), g.op("Sub", padlen, L1), zero)
        prev_k, prev_v = (g.op("Reshape", g.op("Pad", x, shift), chunked) for x in ("k", "v"))
        qk = g.op("Mul", qc, scale)  # the scale on the queries: L x d, not 2 L x L
        own = g.op("Add", g.op("MatMul", qk, kT(kc)), bias)  # (B, H, C, L, L)
        prev = g.op("MatMul", qk, kT(prev_k))  # chunk 0's block: zero keys and values
        later = g.op("Unsqueeze", g.op("Greater", g.op("Range", c(0), g.op("Squeeze", C, zero), c(1)), c(0)),
                     c([1, 2]))  # (C, 1, 1): chunk 0 has no previous chunk
        o = attend_two(g, own, prev, vc, prev_v, qs, S_in, Z_col, gg, normalised, later)
    else:
        scores = g.op("Add", g.op("Mul", g.op("MatMul", qc, kT(kc)), scale), bias)  # (B, H, C, L, L)
        o = attend(g, scores, vc, qs, S_in, Z_col, gg)
    flat = g.cat(B_H, c([-1]), d)  # (B, H, C L, d), then the first T rows
    _branch(g, exact, [o], lambda x: g.op("Reshape", x, flat),
            lambda x: g.op("Slice", g.op("Reshape", x, flat), zero, T, c([2])), outputs=["o"])
    inputs = ["q", "k", "v", "qf", "S", "Z", "g"] if normalised else ["q", "k", "v", "S", "g"]
    name = function_name(normalised, lookback)
    return helper.make_function(DOMAIN, name, inputs, ["o"], consts + g.nodes,
                                [helper.make_opsetid("", opset)], attributes=["chunk_size"],
                                doc_string="BSBR fused chunk attention (see bsbr_export.ops.chunk)")


def _branch(g: Graph, cond, xs, then_fn, else_fn, outputs=None):
    """One If node: ``then_fn(x)`` for every x of ``xs`` where ``cond`` holds, else ``else_fn(x)``."""
    return g.if_else(cond, lambda: [then_fn(x) for x in xs], lambda: [else_fn(x) for x in xs], outputs)


def fused_chunk_attention(g: Graph, W, cfg, p, q, k, v, SZ, U5):
    """The fused op's node: q, k, v (B, H, T, d) and each chunk's retrieved state SZ
    (B, H, C, d', dc), expanded by U5 (1, H, 1, d, d') or None -> o (B, H, T, d)."""
    expand = (lambda t: g.op("MatMul", U5, t)) if U5 is not None else (lambda t: t)
    S_, Zc = _split_state(g, SZ, cfg.head_dim, cfg.retrieval == "normalised")
    attrs = dict(domain=DOMAIN, chunk_size=cfg.chunk_size, plugin_namespace=DOMAIN)
    name = function_name(Zc is not None, cfg.lookback)
    if Zc is None:
        return g.op(name, q, k, v, expand(S_), W(p + "attn.g"), **attrs)
    Z_full = g.op("Squeeze", expand(Zc), g.const([-1]))  # (B, H, C, d)
    return g.op(name, q, k, v, phi(g, W, cfg, p, q), expand(S_), Z_full, W(p + "attn.g"), **attrs)


def retrieval_softmax(g: Graph, scores, allowed):
    """Softmax over allowed entries; a row with none allowed gives zeros."""
    p = g.softmax(g.op("Where", allowed, scores, g.fconst(NEG)))
    return g.op("Mul", p, g.op("Cast", allowed, to=g.fproto))


def retrieval_weights(g: Graph, W, cfg, p, scores, allowed, age=None):
    """The retrieval weights p_ij of ``cfg.retrieval_weights`` (``ops.chunk.weigh``) over the
    allowed entries of ``scores`` (r_i . h_j / sqrt d), zeros elsewhere, in ``scores``' shape:
    ``softmax`` (``retrieval_softmax``), ``sum`` (ones), ``decay`` (lambda_h ** age, lambda the
    layer's ``attn.decay``; age int64: i - 1 - lookback - j), ``gate`` (sigmoid). ``allowed``
    (bool, broadcastable) None: every entry. Computed in fp32 (fp16 graphs cast)."""
    from onnx import TensorProto

    mode = cfg.retrieval_weights
    if mode == "softmax":
        return retrieval_softmax(g, scores, allowed) if allowed is not None else g.softmax(scores)
    f32 = (lambda x: g.op("Cast", x, to=TensorProto.FLOAT)) if g.fdt == np.float16 else (lambda x: x)
    one = g.const([1.0], np.float32)
    if mode == "sum":
        w = one
    elif mode == "decay":
        lam = g.op("Reshape", f32(W(p + "attn.decay")), g.const([1, cfg.n_head, 1, 1]))
        w = g.op("Pow", lam, g.op("Cast", g.op("Max", age, g.const(0)), to=TensorProto.FLOAT))
    elif mode == "gate":
        w = g.op("Sigmoid", f32(scores))
    else:
        raise ValueError(f"retrieval weights {mode!r} have no ONNX form")
    if allowed is not None:
        w = g.op("Mul", w, g.op("Cast", allowed, to=TensorProto.FLOAT))
    w = g.op("Expand", w, g.op("Shape", scores))
    return g.op("Cast", w, to=TensorProto.FLOAT16) if g.fdt == np.float16 else w


def _meta(g: Graph, W, p, x, which: str, H: int, d: int, lead=None):
    """Meta keys (``meta_k``) or meta queries (``meta_q``) of ``x`` (B, N, E): (B, H, N, d).
    ``lead``: Shape(x)[:2] when the caller has it."""
    lead = lead if lead is not None else g.op("Shape", x, end=-1)
    return g.split_heads(g.linear(x, W(f"{p}attn.{which}.weight", True), W(f"{p}attn.{which}.bias"), lead=lead),
                         H, d)


def _split_state(g: Graph, SZ, d: int, normalised: bool):
    """Retrieved state (..., d', dc) -> (S (..., d', d), Z column (..., d', 1) or None)."""
    if not normalised:
        return SZ, None
    return g.op("Split", SZ, g.const([d, 1]), axis=-1, outputs=2)


def bsbr_layer(g: Graph, W, cfg, p, xa, q, k, v, ctx, states):
    """BSBR attention of one layer over the prompt -> o (B, H, T, d); appends the layer's decode
    state after the prompt to ``states`` (a dict of lists by state name) unless it is None."""
    H, d, dp, L = cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size
    dc = StateSpec.from_config(cfg).state_cols
    norm = cfg.retrieval == "normalised"
    zero, one = g.const([0]), g.const([1])
    T, L1 = ctx["T"], ctx["L1"]
    rows = _meta_rows(g, ctx, states is not None, (H, d, dp, dc, L), xa)
    scale = g.fconst(1.0 / math.sqrt(d))
    U5 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), g.const([0, 2]))  # (1,H,1,d,d')

    def meta():
        # Meta keys and queries only where something reads them: the first C-1 chunks' (chunk C-1 is
        # retrieved by no chunk of the prompt) or, with the state, the n_done closed chunks' (the bank).
        # A prompt within one chunk then runs no meta projection at all (zero rows).
        xl = g.op("Gather", xa, rows["last"], axis=1)  # (B, Cm, E)
        h = _meta(g, W, p, xl, "meta_k", H, d, rows["lead"])  # (B, H, Cm, d)
        rp = _meta(g, W, p, xl, "meta_q", H, d, rows["lead"])
        # Chunk states of the same Cm chunks, all complete (Cm <= n_done): the first Cm * L tokens, no padding.
        full = lambda t: g.op("Reshape", g.op("Slice", t, zero, rows["full"], g.const([2])),  # noqa: E731
                              rows["chunked"])
        Fs = chunk_states(g, full(phi(g, W, cfg, p, k)), full(v), U5, norm, rank=5)  # (B, H, Cm, d', dc)
        return h, rp, g.op("Reshape", Fs, rows["flat"]), Fs  # Ff: (B, H, Cm, d'dc)

    def retrieve_and_attend(h, rp, Ff, _Fs=None):
        Cp = rows["C_prev"]  # C - 1
        if states is not None:  # Cm = n_done >= C - 1 rows: the retrieval reads the first C - 1
            h, rp, Ff = (g.op("Slice", t_, zero, Cp, g.const([2])) for t_ in (h, rp, Ff))
        # r_i comes from the end of chunk i-1: shift by one chunk, r_0 unused (zeros).
        r0 = g.op("Mul", g.op("Slice", q, zero, one, g.const([2])), g.fconst(0.0))  # (B, H, 1, d)
        r = g.op("Concat", r0, rp, axis=2)  # (B, H, C, d)
        sc = g.op("Mul", g.op("MatMul", r, g.op("Transpose", h, perm=[0, 1, 3, 2])), scale)  # (B, H, C, C-1)
        SZ = g.op("Reshape", g.op("MatMul", retrieval_weights(g, W, cfg, p, sc, rows["earlier"], rows.get("age")),
                                  Ff), rows["states"])  # (B, H, C, d', dc)
        return [fused_chunk_attention(g, W, cfg, p, q, k, v, SZ, U5)]

    # A prompt within the exact span (``ctx["exact"]``) is plain causal softmax attention: one If
    # takes it, and the retrieval, with nothing to retrieve, does not run.
    exact = ctx.get("exact")
    short = lambda: [causal_attention(g, q, k, v, ctx["causal_bias"], scale)]  # noqa: E731
    if states is None:
        long = lambda: retrieve_and_attend(*meta())  # noqa: E731
        return long()[0] if exact is None else g.if_else(exact, short, long)
    h, rp, Ff, Fs = meta()
    o = (retrieve_and_attend(h, rp, Ff)[0] if exact is None
         else g.if_else(exact, short, lambda: retrieve_and_attend(h, rp, Ff)))
    # Decode state after the prompt: the open chunk's k/v, its S, the bank of closed chunks.
    n_done, n_cur = ctx["n_done"], ctx["n_cur"]
    # The meta query of the last closed chunk (a sum over its one row, or zeros before any chunk closed).
    r_state = g.op("ReduceSum", g.op("Slice", rp, ctx["r_idx"], n_done, g.const([2])), g.const([2]),
                   keepdims=1)  # (B, H, 1, d)
    sc_state = g.op("Mul", g.op("MatMul", r_state, g.op("Transpose", h, perm=[0, 1, 3, 2])), scale)  # (B,H,1,n_done)
    # Look-back: the open chunk retrieves from the closed chunks before its window only.
    p_state = retrieval_weights(g, W, cfg, p, sc_state, ctx.get("bank_before_window"), ctx.get("bank_age"))
    S_state = g.op("Reshape", g.op("MatMul", p_state, Ff), g.const([0, H, dp, dc]))  # (B, H, d', dc)
    for name, t_ in ((K, k), (V, v)):
        open_rows = g.op("Slice", t_, g.op("Mul", n_done, L1), T, g.const([2]))  # (B, H, n_cur, d)
        rows_kv = g.op("Pad", open_rows, g.cat(g.const([0, 0, 0, 0, 0, 0]), g.op("Sub", L1, n_cur), zero))
        if cfg.lookback:  # the last closed chunk first (zeros before any chunk closed)
            lo = g.op("Mul", g.op("Max", g.op("Sub", n_done, one), zero), L1)
            hi = g.op("Mul", n_done, L1)
            prev = g.op("Slice", t_, lo, hi, g.const([2]))  # (B, H, L or 0, d)
            prev = g.op("Pad", prev, g.cat(g.const([0, 0, 0, 0, 0, 0]), g.op("Sub", L1, g.op("Sub", hi, lo)), zero))
            rows_kv = g.op("Concat", prev, rows_kv, axis=2)  # (B, H, 2L, d)
        states[name].append(rows_kv)
    states[S].append(S_state)
    states[BANK_H].append(h)  # (B, H, n_done, d)
    states[BANK_F].append(Fs)  # (B, H, n_done, d', dc)
    return o


def _meta_rows(g: Graph, ctx: dict, with_state: bool, dims: tuple, xa) -> dict:
    """The index and shape tensors every layer's ``bsbr_layer`` shares, built once per graph (kept
    in ``ctx``; ``xa``: the first layer's (B, T, E)): ``last`` (the rows of xa the meta projections
    read), ``lead`` ([B, those rows]), ``C_prev`` (C - 1, as (1,)), ``earlier`` ((C, C-1): [i, j] =
    j < i), ``full`` (Cm * L: the tokens of those Cm complete chunks), ``chunked`` (B, H, Cm, L, d),
    ``flat`` (B, H, Cm, d'dc) and ``states`` (B, H, C, d', dc)."""
    key = f"meta_rows_{with_state}"
    if key not in ctx:
        H, d, dp, dc, L = dims
        zero, one = g.const([0]), g.const([1])
        C = ctx["C"]
        Cp = g.op("Sub", C, one)
        Cm = ctx["n_done"] if with_state else Cp
        ctx[key] = {"last": g.op("Slice", ctx["last"], zero, Cm, zero), "C_prev": Cp,
                    "lead": g.cat(g.op("Shape", xa, end=1), Cm),  # the batch is every layer's
                    "earlier": g.op("Slice", ctx["earlier"], zero, Cp, one),
                    "full": g.op("Mul", Cm, g.const([L])),
                    "chunked": g.cat(g.const([0, H]), Cm, g.const([L, d])),
                    "flat": g.cat(g.const([0, H]), Cm, g.const([dp * dc])),
                    "states": g.cat(g.const([0, H]), C, g.const([dp, dc]))}
        if "age" in ctx:  # (C, C-1): i - 1 - lookback - j, for the decaying retrieval weights
            ctx[key]["age"] = g.op("Slice", ctx["age"], zero, Cp, one)
    return ctx[key]


def step_attention(g: Graph, W, cfg, p, q, k, v, K_state, V_state, visible, S_state):
    """One token's attention: q, k, v (B, H, 1, d) over the earlier rows of its window K_state,
    V_state (B, H, rows, d) where ``visible`` (B, 1, 1, rows), over itself, and the retrieved
    state S_state (B, H, d', dc) -> (B, H, 1, d).

    The state is read, never copied or rewritten: the token's own key is a score column of its
    own (its row is written into the window by the caller after the step), and S is read by one
    product whose small result is split into the S and Z terms. Look-back: the scale on q as a
    vector (a scalar fuses into the product's alpha, off ORT's one-row GEMV path: 3x slower). The
    chunk window keeps the scalar of its extend graph, so that int8 decode and extend round alike."""
    d, s = cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim)
    qk = g.op("Mul", q, g.fconst([s] * d)) if cfg.lookback else q
    sc = g.op("MatMul", qk, g.op("Transpose", K_state, perm=[0, 1, 3, 2]))  # (B, H, 1, rows)
    own = g.op("ReduceSum", g.op("Mul", qk, k), g.const([-1]), keepdims=1)  # (B, H, 1, 1)
    sc, own = (sc, own) if cfg.lookback else (g.op("Mul", sc, g.fconst(s)), g.op("Mul", own, g.fconst(s)))
    scores = g.op("Concat", g.op("Where", visible, sc, g.fconst(NEG)), own, axis=-1)  # (B, H, 1, rows + 1)
    qs = phi(g, W, cfg, p, q)
    if cfg.compression is not None:
        qs = g.op("MatMul", qs, g.op("Unsqueeze", W(p + "attn.U"), g.const([0])))  # (B, H, 1, d')
    gH = g.op("Reshape", W(p + "attn.g"), g.const([1, cfg.n_head, 1, 1]))
    return attend(g, scores, V_state, qs, S_state, None, gH, v_self=v, normalised=cfg.retrieval == "normalised")


def close_chunk(g: Graph, W, cfg, i: int, kk, vv, xa, bank_h, bank_F, position):
    """Layer ``i`` of the chunk close, for rows whose token at ``position`` (B,) filled its
    chunk's last slot (the caller runs it for those rows only): bank F_j and h_j of chunk
    j = position // L and retrieve S for chunk j + 1.

    kk, vv (B, H, window, d): the K/V rows, the full chunk in the last L; xa (B, 1, E): the
    closing token's ln_1 output; bank_h (B, H, cap, d), bank_F (B, H, cap, d', dc): the row's
    bank, chunks 0 .. j - 1 in its first slots (any capacity >= 1; later slots are not read).
    Returns the next S (B, H, d', dc) and the closed chunk's h (B, H, 1, d), F (B, H, 1, d', dc)
    for the caller to bank. The bank is read, never copied: the retrieval weighs the bank's
    slots and the new chunk as two terms. With the look-back window the next chunk retrieves
    from chunks j' < j + 1 - lookback (the caller slides K/V).
    """
    H, d, dp, L, n = cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size, cfg.lookback
    dc = StateSpec.from_config(cfg).state_cols
    p = f"h.{i}."
    zero = g.const([0])
    if n:  # the open (closing) chunk is the window's last L rows
        kk, vv = (g.op("Slice", t_, g.const([n * L]), g.const([(n + 1) * L]), g.const([2])) for t_ in (kk, vv))
    U4 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), zero)  # (1, H, d, d')
    Fj = g.op("Unsqueeze", chunk_states(g, phi(g, W, cfg, p, kk), vv, U4, cfg.retrieval == "normalised", rank=4),
              g.const([2]))  # (B, H, 1, d', dc)
    hj = _meta(g, W, p, xa, "meta_k", H, d)  # (B, H, 1, d)
    r = _meta(g, W, p, xa, "meta_q", H, d)  # (B, H, 1, d)
    scale = g.fconst(1.0 / math.sqrt(d))
    sc = g.op("Mul", g.op("MatMul", r, g.op("Transpose", bank_h, perm=[0, 1, 3, 2])), scale)  # (B, H, 1, cap)
    # Chunk j + 1 retrieves from chunks j' < j + 1 - n: the bank's j' < j (n <= 1), and chunk j itself when n = 0.
    cap = g.dim(bank_h, 2)
    jj = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", cap, zero), g.const(1)), zero)  # (1, cap)
    chunk = g.op("Unsqueeze", g.op("Div", position, g.const(L)), g.const([1]))  # (B, 1)
    limit = g.op("Add", chunk, g.const(1 - max(n, 1)))
    allowed = g.op("Unsqueeze", g.op("Less", jj, limit), g.const([1, 2]))  # (B, 1, 1, cap)
    flat = g.const([0, H, -1, dp * dc])
    # Chunk j' is j - n - j' chunks older than the newest chunk that j + 1 retrieves (decay only).
    age = g.op("Sub", g.op("Sub", chunk, g.const(n)), jj) if cfg.retrieval_weights == "decay" else None  # (B, cap)
    U = cfg.retrieving_chunks  # chunk j + 1 >= U retrieves nothing
    next_ok = None if U is None else g.op("Unsqueeze", g.op("Less", chunk, g.const(U - 1)), g.const([1, 2]))
    if n == 0:
        own = g.op("Mul", g.op("ReduceSum", g.op("Mul", r, hj), g.const([-1]), keepdims=1), scale)  # (B, H, 1, 1)
        sc = g.op("Concat", sc, own, axis=-1)
        allowed = g.op("Concat", allowed, g.op("Expand", g.const(True, np.bool_), g.cat(g.dim(allowed, 0),
                                                                                        g.const([1, 1, 1]))), axis=-1)
        if age is not None:  # the closed chunk itself is the newest: age 0
            age = g.op("Concat", age, g.op("Sub", chunk, chunk), axis=1)
        age = None if age is None else g.op("Unsqueeze", age, g.const([1, 2]))
        allowed = allowed if next_ok is None else g.op("And", allowed, next_ok)
        w = retrieval_weights(g, W, cfg, p, sc, allowed, age)  # (B, H, 1, cap + 1)
        S_next = _values(g, w, g.op("Reshape", bank_F, flat), g.op("Reshape", Fj, flat))  # (B, H, 1, d'dc)
    else:
        age = None if age is None else g.op("Unsqueeze", age, g.const([1, 2]))
        allowed = allowed if next_ok is None else g.op("And", allowed, next_ok)
        S_next = g.op("MatMul", retrieval_weights(g, W, cfg, p, sc, allowed, age), g.op("Reshape", bank_F, flat))
    return g.op("Reshape", S_next, g.const([0, H, dp, dc])), hj, Fj
