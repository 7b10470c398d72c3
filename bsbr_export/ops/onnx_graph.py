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
    step_attention one token's attention over the open chunk and its retrieved state
    close_chunk    bank the finished chunk and retrieve the next chunk's state, all layers

State tensors are batch first and named by ``ops.state``.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph import NEG, Graph
from .state import BANK_F, BANK_H, CARRIED as CARRIED_NAMES, K, NEW_F, NEW_H, S, V, StateSpec

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
    if name == "relu":
        return g.op("Relu", x)
    if name != "identity":
        raise ValueError(f"feature map {name!r} has no ONNX form")
    return x


def phi(g: Graph, W, cfg, p, x):
    """The layer's feature map on x (B, H, N, d): ``feature``, or the learned map
    elu(x W_h + b_h) + 1 with the layer's W (H, d, d) and b (H, d) (``ops.chunk.LearnedFeature``)."""
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


def combine(g: Graph, scores, v, qf, S_full, Z_col, gg):
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


def attend(g: Graph, scores, v, qs, S_full, Z_col, gg):
    """Masked local scores (..., n_q, n_k) and the retrieved state -> o (..., n_q, d).
    Plain (``Z_col`` None): softmax(scores) v + g qs S. Normalised: ``combine``."""
    if Z_col is not None:
        return combine(g, scores, v, qs, S_full, Z_col, gg)
    return g.op("Add", g.op("MatMul", g.softmax(scores), v), g.op("Mul", gg, g.op("MatMul", qs, S_full)))


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
    if lookback:
        # Each chunk's keys preceded by the previous chunk's (zeros before chunk 0, masked).
        prev_pads = c([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])

        def with_previous(x):  # (B, H, C, L, d) -> (B, H, C, 2L, d)
            return g.op("Concat", g.op("Slice", g.op("Pad", x, prev_pads), zero, C, c([2])), x, axis=3)

        kc, vc = with_previous(kc), with_previous(vc)
        scores = g.op("Mul", g.op("MatMul", qc, g.op("Transpose", kc, perm=[0, 1, 2, 4, 3])), scale)  # (B,H,C,L,2L)
        CLL = g.cat(C, LL)
        has_prev = g.op("Unsqueeze", g.op("Greater", g.op("Range", c(0), g.op("Squeeze", C, zero), c(1)), c(0)),
                        c([1, 2]))  # (C, 1, 1): chunk > 0
        causal = g.op("Concat", g.op("Expand", has_prev, CLL), g.op("Expand", causal, CLL), axis=-1)  # (C, L, 2L)
    scores = g.op("Where", causal, scores, g.fconst(NEG))
    gg = g.op("Reshape", "g", c([1, -1, 1, 1, 1]))
    if normalised:
        o = attend(g, scores, vc, chunks("qf"), "S", g.op("Unsqueeze", "Z", c([-1])), gg)
        inputs = ["q", "k", "v", "qf", "S", "Z", "g"]
    else:
        o = attend(g, scores, vc, qc, "S", None, gg)
        inputs = ["q", "k", "v", "S", "g"]
    name = function_name(normalised, lookback)
    o = g.op("Reshape", o, g.cat(B_H, c([-1]), d))  # (B, H, C*L, d)
    g.op("Slice", o, zero, T, c([2]), outputs=["o"])
    return helper.make_function(DOMAIN, name, inputs, ["o"], consts + g.nodes,
                                [helper.make_opsetid("", opset)], attributes=["chunk_size"],
                                doc_string="BSBR fused chunk attention (see bsbr_export.ops.chunk)")


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
    T, C, L1 = ctx["T"], ctx["C"], ctx["L1"]
    rows = _meta_rows(g, ctx, states is not None, (H, d, dp, dc, L), xa)
    # Meta keys and queries only where something reads them: the first C-1 chunks' (chunk C-1 is
    # retrieved by no chunk of the prompt) or, with the state, the n_done closed chunks' (the bank).
    # A prompt within one chunk then runs no meta projection at all (zero rows).
    xl = g.op("Gather", xa, rows["last"], axis=1)  # (B, Cm, E)
    h = _meta(g, W, p, xl, "meta_k", H, d, rows["lead"])  # (B, H, Cm, d)
    rp = _meta(g, W, p, xl, "meta_q", H, d, rows["lead"])
    Cp = rows["C_prev"]  # C - 1
    if states is not None:  # Cm = n_done >= C - 1 rows: the retrieval reads the first C - 1
        h_r, rp_r = (g.op("Slice", t_, zero, Cp, g.const([2])) for t_ in (h, rp))
    else:
        h_r, rp_r = h, rp
    # r_i comes from the end of chunk i-1: shift by one chunk, r_0 unused (zeros).
    r0 = g.op("Mul", g.op("Slice", q, zero, one, g.const([2])), g.fconst(0.0))  # (B, H, 1, d)
    r = g.op("Concat", r0, rp_r, axis=2)  # (B, H, C, d)
    # Chunk states of the same Cm chunks, all complete (Cm <= n_done): the first Cm * L tokens, no padding.
    full = lambda t: g.op("Reshape", g.op("Slice", t, zero, rows["full"], g.const([2])), rows["chunked"])  # noqa: E731
    kc, vc = full(phi(g, W, cfg, p, k)), full(v)  # (B, H, Cm, L, d)
    U5 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), g.const([0, 2]))  # (1,H,1,d,d')
    Fs = chunk_states(g, kc, vc, U5, norm, rank=5)  # (B, H, Cm, d', dc)
    Ff = g.op("Reshape", Fs, rows["flat"])  # (B, H, Cm, d'dc)
    Ff_r = g.op("Slice", Ff, zero, Cp, g.const([2])) if states is not None else Ff  # the first C - 1
    scale = g.fconst(1.0 / math.sqrt(d))
    sc = g.op("Mul", g.op("MatMul", r, g.op("Transpose", h_r, perm=[0, 1, 3, 2])), scale)  # (B, H, C, C-1)
    SZ = g.op("Reshape", g.op("MatMul", retrieval_softmax(g, sc, rows["earlier"]), Ff_r),
              rows["states"])  # (B, H, C, d', dc)
    o = fused_chunk_attention(g, W, cfg, p, q, k, v, SZ, U5)
    if states is None:
        return o
    # Decode state after the prompt: the open chunk's k/v, its S, the bank of closed chunks.
    n_done, n_cur = ctx["n_done"], ctx["n_cur"]
    # The meta query of the last closed chunk (a sum over its one row, or zeros before any chunk closed).
    r_state = g.op("ReduceSum", g.op("Slice", rp, ctx["r_idx"], n_done, g.const([2])), g.const([2]),
                   keepdims=1)  # (B, H, 1, d)
    sc_state = g.op("Mul", g.op("MatMul", r_state, g.op("Transpose", h, perm=[0, 1, 3, 2])), scale)  # (B,H,1,n_done)
    # Look-back: the open chunk retrieves from the closed chunks before its window only.
    p_state = retrieval_softmax(g, sc_state, ctx["bank_before_window"]) if cfg.lookback else g.softmax(sc_state)
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
    return ctx[key]


def step_attention(g: Graph, W, cfg, p, q, kk, vv, visible, S_state):
    """One token's attention: q (B, H, 1, d) over the open chunk kk, vv (B, H, L, d) where
    ``visible`` (1, L) and the retrieved state S_state (B, H, d', dc) -> (B, H, 1, d)."""
    H, d = cfg.n_head, cfg.head_dim
    zero = g.const([0])
    sc = g.op("Mul", g.op("MatMul", q, g.op("Transpose", kk, perm=[0, 1, 3, 2])),
              g.fconst(1.0 / math.sqrt(d)))  # (B, H, 1, L)
    qs = phi(g, W, cfg, p, q)
    if cfg.compression is not None:
        qs = g.op("MatMul", qs, g.op("Unsqueeze", W(p + "attn.U"), zero))  # (B, H, 1, d')
    gH = g.op("Reshape", W(p + "attn.g"), g.const([1, H, 1, 1]))
    S_, Zc = _split_state(g, S_state, d, cfg.retrieval == "normalised")  # (B, H, d', d), (B, H, d', 1)
    return attend(g, g.op("Where", visible, sc, g.fconst(NEG)), vv, qs, S_, Zc, gH)


def close_chunk(g: Graph, W, cfg, layer, state_in, position):
    """Bank F_j and h_j at j = position // L and retrieve S for chunk j+1, in every row whose
    token at ``position`` (B,) filled its chunk's last slot; other rows keep their state.

    ``layer``: per-layer lists of the K/V rows (B, H, window, d), the full chunk in the last L,
    and the closing token's ln_1 output xa (B, 1, E); ``state_in``: S and the banks
    (B, layer, H, ...). Returns the stacked outputs (S, the closed chunk's h (B, layer, H, 1, d)
    and F (B, layer, H, 1, d', dc)): the caller writes the chunk into its bank slot. With the
    look-back window also K and V slid in the closing rows (the closed chunk becomes the previous
    one), and the next S retrieves from the chunks before the next chunk's window: j < chunk.
    """
    H, d, dp, L = cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size
    dc = StateSpec.from_config(cfg).state_cols
    norm = cfg.retrieval == "normalised"
    zero, one = g.const([0]), g.const([1])
    chunk = g.op("Unsqueeze", g.op("Div", position, g.const(L)), one)  # (B, 1)
    closing = g.op("Equal", g.op("Mod", position, g.const(L)), g.const(L - 1))  # (B,)
    cap = g.dim(state_in[BANK_H], 3)
    jj = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", cap, zero), g.const(1)), zero)  # (1, cap)
    at_j = g.op("And", g.op("Equal", jj, chunk), g.op("Unsqueeze", closing, one))  # (B, cap)
    upto_j = g.op("Unsqueeze", g.op("LessOrEqual", jj, chunk), g.const([1, 2]))  # (B, 1, 1, cap)
    at_j_h = g.op("Unsqueeze", at_j, g.const([1, 3]))  # (B, 1, cap, 1)
    at_j_F = g.op("Unsqueeze", at_j, g.const([1, 3, 4]))  # (B, 1, cap, 1, 1)
    closing_S = g.op("Unsqueeze", closing, g.const([1, 2, 3]))  # (B, 1, 1, 1)
    n = cfg.lookback
    if n:  # the next chunk j + 1 retrieves from chunks before j + 1 - n
        upto_j = g.op("Unsqueeze", g.op("LessOrEqual", g.op("Add", jj, g.const(n)), chunk), g.const([1, 2]))
    out = {name: [] for name in (S, NEW_H, NEW_F) + ((K, V) if n else ())}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        own = {n: g.layer_slice(state_in[n], i) for n in (S, BANK_H, BANK_F)}
        kk, vv, xa = layer["k"][i], layer["v"][i], layer["xa"][i]  # (B, H, window, d) x 2, (B, 1, E)
        if n:  # slide: the closed chunk's rows become the previous chunk's (the open rows are rewritten)
            window = {K: kk, V: vv}
            kk, vv = (g.op("Slice", t_, g.const([n * L]), g.const([(n + 1) * L]), g.const([2])) for t_ in (kk, vv))
            for name, rows in ((K, kk), (V, vv)):
                out[name].append(g.op("Where", closing_S, g.op("Concat", *[rows] * (n + 1), axis=2), window[name]))
        U4 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), zero)  # (1, H, d, d')
        Fj = g.op("Unsqueeze", chunk_states(g, phi(g, W, cfg, p, kk), vv, U4, norm, rank=4),
                  g.const([2]))  # (B, H, 1, d', dc)
        hj = _meta(g, W, p, xa, "meta_k", H, d)  # (B, H, 1, d)
        # The bank as it is with chunk j in it, for this retrieval only.
        bank_h = g.op("Where", at_j_h, hj, own[BANK_H])  # (B, H, cap, d)
        bank_F = g.op("Where", at_j_F, Fj, own[BANK_F])
        r = _meta(g, W, p, xa, "meta_q", H, d)  # (B, H, 1, d)
        sc = g.op("Mul", g.op("MatMul", r, g.op("Transpose", bank_h, perm=[0, 1, 3, 2])),
                  g.fconst(1.0 / math.sqrt(d)))  # (B, H, 1, cap)
        Fflat = g.op("Reshape", bank_F, g.const([0, H, -1, dp * dc]))
        S_next = g.op("Reshape", g.op("MatMul", retrieval_softmax(g, sc, upto_j), Fflat),
                      g.const([0, H, dp, dc]))  # (B, H, d', dc)
        out[S].append(g.op("Where", closing_S, S_next, own[S]))
        out[NEW_H].append(hj)
        out[NEW_F].append(Fj)
    return [g.stack_layers(parts) for parts in out.values()]


def gather_rows(g: Graph, x, idx, heads: bool = False, rank: int = 4):
    """Row ``b`` of the result takes positions ``idx[b]`` (B, M) of row ``b`` of ``x``.

    x: (B, N, ...) -> (B, M, ...); with ``heads`` x is (B, H, N, ...) of rank ``rank`` and the
    gather runs along axis 2 -> (B, H, M, ...)."""
    if not heads:
        return g.op("GatherND", x, g.op("Unsqueeze", idx, g.const([-1])), batch_dims=1)
    perm = [0, 2, 1] + list(range(3, rank))
    xt = g.op("Transpose", x, perm=perm)  # (B, N, H, ...)
    return g.op("Transpose", gather_rows(g, xt, idx), perm=perm)


def extend_layer(g: Graph, W, cfg, p, xa, q, k, v, ctx, state_in, states):
    """One layer of a prefill that continues each row's state (``extend.onnx``).

    Row b's tokens stand in a combined, chunk-aligned sequence (B, Tc): its first ctx["c"][b]
    slots are the open chunk held in the state (their k, v come from ``state_in``; their
    queries and outputs are ignored), then the row's new tokens, then padding. Chunk i of the
    combined sequence is the row's chunk m_b + i. Retrieval runs over the row's bank (m_b
    closed chunks) and the chunks that close inside the piece; chunk 0 keeps the state's S.
    Returns o (B, H, Tc, d) and appends the row's state after the piece to ``states``: the open
    chunk, S, and the combined chunks' h and F, of which the first m_new - m are closed (the
    caller writes them into bank slots m .. m_new - 1).

    With the look-back window (``lookback`` = n) a row that has closed chunks starts one chunk
    earlier: its first s_b = min(m_b, n) chunks are the state's previous chunk(s), there only
    for the local window of the open chunk (combined chunk s_b, which keeps the state's S); the
    state after the piece holds the previous chunk's rows too, and the returned h and F start at
    the open chunk.
    """
    H, d, dp, L = cfg.n_head, cfg.head_dim, cfg.state_dim, cfg.chunk_size
    dc = StateSpec.from_config(cfg).state_cols
    norm = cfg.retrieval == "normalised"
    own = {n: g.layer_slice(state_in[n], ctx["layer"]) for n in CARRIED_NAMES}
    # The open chunk's keys and values (look-back: and the previous chunk's) come from the state.
    if cfg.lookback:
        k, v = (g.op("Where", ctx["from_state"], gather_rows(g, own[n], ctx["state_rows"], heads=True), t_)
                for n, t_ in ((K, k), (V, v)))  # (B, H, Tc, d)
    else:
        pad_to_tc = g.cat(g.const([0, 0, 0, 0, 0, 0]), g.op("Sub", ctx["Tc"], g.const([L])), g.const([0]))
        k = g.op("Where", ctx["from_state"], g.op("Pad", own[K], pad_to_tc), k)  # (B, H, Tc, d)
        v = g.op("Where", ctx["from_state"], g.op("Pad", own[V], pad_to_tc), v)
    chunked = g.cat(g.const([0, H]), ctx["Cc"], g.const([L, d]))
    fk = g.op("Where", ctx["valid"], phi(g, W, cfg, p, k), g.fconst(0.0))  # padding counts zero
    vm = g.op("Where", ctx["valid"], v, g.fconst(0.0))
    U5 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), g.const([0, 2]))  # (1,H,1,d,d')
    F_new = chunk_states(g, g.op("Reshape", fk, chunked), g.op("Reshape", vm, chunked), U5, norm, rank=5)
    xl = g.op("Gather", xa, ctx["last"], axis=1)  # (B, Cc, E): chunks are aligned in every row
    h_new = _meta(g, W, p, xl, "meta_k", H, d)  # (B, H, Cc, d)
    rp = _meta(g, W, p, xl, "meta_q", H, d)
    zero, one = g.const([0]), g.const([1])
    r = g.op("Concat", g.op("Mul", g.op("Slice", rp, zero, one, g.const([2])), g.fconst(0.0)),
             g.op("Slice", rp, zero, g.op("Sub", ctx["Cc"], one), g.const([2])), axis=2)  # r_i from chunk i-1
    scale = g.fconst(1.0 / math.sqrt(d))
    scores = g.op("Concat", g.op("MatMul", r, g.op("Transpose", own[BANK_H], perm=[0, 1, 3, 2])),
                  g.op("MatMul", r, g.op("Transpose", h_new, perm=[0, 1, 3, 2])), axis=-1)  # (B, H, Cc, cap+Cc)
    flat = g.const([0, H, -1, dp * dc])
    F_all = g.op("Concat", g.op("Reshape", own[BANK_F], flat), g.op("Reshape", F_new, flat), axis=2)
    SZ = g.op("MatMul", retrieval_softmax(g, g.op("Mul", scores, scale), ctx["retrievable"]), F_all)
    SZ = g.op("Reshape", SZ, g.const([0, H, -1, dp, dc]))  # (B, H, Cc, d', dc)
    SZ = g.op("Where", ctx["first_chunk"], g.op("Unsqueeze", own[S], g.const([2])), SZ)
    o = fused_chunk_attention(g, W, cfg, p, q, k, v, SZ, U5)
    # The state after the piece: the new open chunk, and S of the new open chunk (retrieved from
    # the bank with the closed chunks written in, built here for this retrieval only).
    for n, t_ in ((K, k), (V, v)):
        rows = gather_rows(g, t_, ctx["open_rows"], heads=True)  # (B, H, L, d)
        states[n].append(g.op("Where", ctx["open_valid"], rows, g.fconst(0.0)))
    bank_h = g.op("Where", ctx["new_slot_h"], gather_rows(g, h_new, ctx["slot_chunk"], heads=True), own[BANK_H])
    bank_F = g.op("Where", ctx["new_slot_F"], gather_rows(g, F_new, ctx["slot_chunk"], heads=True, rank=5),
                  own[BANK_F])
    r_last = gather_rows(g, rp, ctx["closing_chunk"], heads=True)  # (B, H, 1, d)
    sc = g.op("Mul", g.op("MatMul", r_last, g.op("Transpose", bank_h, perm=[0, 1, 3, 2])), scale)  # (B,H,1,cap)
    S_next = g.op("Reshape", g.op("MatMul", retrieval_softmax(g, sc, ctx["banked"]), g.op("Reshape", bank_F, flat)),
                  g.const([0, H, dp, dc]))
    states[S].append(g.op("Where", ctx["chunk_closed"], S_next, own[S]))
    if cfg.lookback:  # from the open chunk on: (B, H, Cc - n, ...)
        h_new = gather_rows(g, h_new, ctx["new_out"], heads=True)
        F_new = gather_rows(g, F_new, ctx["new_out"], heads=True, rank=5)
    states[NEW_H].append(h_new)  # (B, H, Cc, d): chunks m .. m_new - 1 are the closed ones
    states[NEW_F].append(F_new)
    return o


def extend_context(g: Graph, cfg, ids, lengths, position, bank_h):
    """Index tensors of ``extend_layer`` shared by every layer: ids (B, T), lengths (B,),
    position (B,) (tokens each row holds), a bank state input (for its capacity)."""
    L, n = cfg.chunk_size, cfg.lookback
    zero, one = g.const([0]), g.const([1])
    col = lambda t: g.op("Unsqueeze", t, one)  # noqa: E731  (B,) -> (B, 1)
    T = g.dim(ids, 1)
    Cc = g.op("Div", g.op("Add", T, g.const([2 * L - 2 + n * L])), g.const([L]))  # ceil((T + L - 1) / L) + n
    Tc = g.op("Mul", Cc, g.const([L]))
    tc = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", Tc, zero), g.const(1)), zero)  # (1, Tc)
    c, m = g.op("Mod", position, g.const(L)), g.op("Div", position, g.const(L))  # (B,)
    # Look-back: s = min(m, n) chunks of the state before the open one; the combined sequence
    # starts at the row's chunk base = m - s, and its first ``pre`` slots come from the state.
    s_b = g.op("Min", m, g.const(n)) if n else None
    pre = g.op("Add", c, g.op("Mul", s_b, g.const(L))) if n else c  # (B,)
    base = g.op("Sub", m, s_b) if n else m
    end = g.op("Add", position, lengths)
    c_new, m_new = g.op("Mod", end, g.const(L)), g.op("Div", end, g.const(L))
    heads4 = lambda t: g.op("Unsqueeze", t, g.const([1, 3]))  # noqa: E731  (B, N) -> (B, 1, N, 1)
    jc = g.op("Range", g.const(0), g.op("Squeeze", Cc, zero), g.const(1))  # (Cc,)
    cap = g.dim(bank_h, 3)
    jcap = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", cap, zero), g.const(1)), zero)  # (1, cap)
    Tm1 = g.op("Sub", T, one)
    ctx = dict(T=T, Cc=Cc, Tc=Tc, c=c, m=m)
    ctx["src"] = g.op("Min", g.op("Max", g.op("Sub", tc, col(pre)), g.const(0)), Tm1)  # (B, Tc): token of each slot
    ctx["positions"] = g.op("Add", g.op("Mul", col(base), g.const(L)), tc)  # (B, Tc)
    ctx["from_state"] = heads4(g.op("Less", tc, col(pre)))
    ctx["valid"] = heads4(g.op("Less", tc, col(g.op("Add", pre, lengths))))
    ctx["last"] = g.op("Sub", g.op("Mul", g.op("Add", jc, g.const(1)), g.const(L)), g.const(1))  # (Cc,)
    if n:
        rows = (n + 1) * L  # state K/V rows; slot t of the combined sequence is row t + (n - s) L
        ctx["state_rows"] = g.op("Min", g.op("Add", tc, col(g.op("Mul", g.op("Sub", g.const(n), s_b), g.const(L)))),
                                 g.const(rows - 1))  # (B, Tc)
        # Combined chunk i (the row's chunk base + i) retrieves from chunks j < base + i - n: the
        # bank's before min(m, base + i - n), and the piece's new chunks (j >= s) before i - n.
        lim = g.op("Min", col(m), g.op("Add", col(base), g.op("Unsqueeze", g.op("Sub", jc, g.const(n)), zero)))
        banked_old = g.op("Less", g.op("Unsqueeze", jcap, zero), g.op("Unsqueeze", lim, g.const([1, 3])))
        earlier = g.op("Less", g.op("Unsqueeze", g.op("Add", jc, g.const(n)), zero), g.op("Unsqueeze", jc, one))
        new = g.op("Unsqueeze", g.op("GreaterOrEqual", g.op("Unsqueeze", jc, zero), col(s_b)), g.const([1, 2]))
        ctx["retrievable"] = g.op("Concat", banked_old, g.op("And", new, g.op("Unsqueeze", earlier, g.const([0, 1]))),
                                  axis=-1)  # (B, 1, Cc, cap+Cc)
        ctx["first_chunk"] = g.op("Unsqueeze", g.op("Equal", g.op("Unsqueeze", jc, zero), col(s_b)),
                                  g.const([1, 3, 4]))  # (B, 1, Cc, 1, 1): the open chunk keeps the state's S
        out = g.op("Range", g.const(0), g.op("Squeeze", g.op("Sub", Cc, g.const([n])), zero), g.const(1))
        ctx["new_out"] = g.op("Min", g.op("Add", g.op("Unsqueeze", out, zero), col(s_b)),
                              g.op("Sub", Cc, one))  # (B, Cc - n): the returned chunks, from the open one
    else:
        B1 = g.cat(g.dim(ids, 0), g.const([1, 1, 1]))
        earlier = g.op("Less", g.op("Unsqueeze", jc, zero), g.op("Unsqueeze", jc, one))  # (Cc, Cc): [i, j] = j < i
        banked_old = g.op("Unsqueeze", g.op("Less", jcap, col(m)), g.const([1, 2]))  # (B, 1, 1, cap)
        ctx["retrievable"] = g.op("Concat", g.op("Expand", banked_old, g.cat(g.const([1, 1]), Cc, one)),
                                  g.op("Expand", g.op("Unsqueeze", earlier, zero), B1), axis=-1)  # (B, 1, Cc, cap+Cc)
        ctx["first_chunk"] = g.op("Unsqueeze", g.op("Equal", jc, g.const(0)), g.const([0, 1, 3, 4]))  # (1,1,Cc,1,1)
    o_new = g.op("Sub", m_new, m)  # (B,): chunks that close inside the piece
    r = g.op("Unsqueeze", g.op("Range", g.const(0), g.const((n + 1) * L), g.const(1)), zero)  # (1, (n + 1) L)
    if n:  # the state's rows after the piece: chunks m_new - n .. m_new, as far as they exist
        first = g.op("Mul", g.op("Sub", g.op("Sub", m_new, base), g.const(n)), g.const(L))  # (B,)
        ctx["open_rows"] = g.op("Min", g.op("Max", g.op("Add", col(first), r), g.const(0)), g.op("Sub", Tc, one))
        ctx["open_valid"] = heads4(g.op("And", g.op("Less", g.op("Sub", r, g.const(n * L)), col(c_new)),
                                        g.op("GreaterOrEqual", r, col(g.op("Mul", g.op("Sub", g.const(n), m_new),
                                                                           g.const(L))))))
    else:
        ctx["open_rows"] = g.op("Min", g.op("Add", g.op("Mul", col(o_new), g.const(L)), r), g.op("Sub", Tc, one))
        ctx["open_valid"] = heads4(g.op("Less", r, col(c_new)))  # (B, 1, L, 1)
    ctx["slot_chunk"] = g.op("Min", g.op("Max", g.op("Sub", jcap, col(base)), g.const(0)),
                             g.op("Sub", Cc, one))  # (B, cap): bank slot j <- combined chunk j - base
    new_slot = g.op("And", g.op("GreaterOrEqual", jcap, col(m)), g.op("Less", jcap, col(m_new)))  # (B, cap)
    ctx["new_slot_h"] = heads4(new_slot)
    ctx["new_slot_F"] = g.op("Unsqueeze", new_slot, g.const([1, 3, 4]))
    closing = g.op("Sub", o_new, one) if not n else g.op("Add", g.op("Sub", o_new, one), s_b)
    ctx["closing_chunk"] = col(g.op("Max", closing, g.const(0)))  # (B, 1): the last closed chunk
    # The next chunk retrieves from the bank's chunks before its window: j < m_new - n.
    ctx["banked"] = g.op("Unsqueeze", g.op("Less", jcap, col(g.op("Sub", m_new, g.const(n)) if n else m_new)),
                         g.const([1, 2]))  # (B, 1, 1, cap)
    ctx["chunk_closed"] = g.op("Unsqueeze", g.op("Greater", m_new, m), g.const([1, 2, 3]))  # (B, 1, 1, 1)
    ctx["logit_row"] = col(g.op("Sub", g.op("Add", pre, lengths), g.const(1)))  # (B, 1): last new token
    return ctx
