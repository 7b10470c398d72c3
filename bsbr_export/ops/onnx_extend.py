"""The extend graph's BSBR pieces: a prefill that continues each row's decode state.

``extend_context`` builds the index tensors every layer shares (the combined, chunk-aligned
sequence of each row: the open chunk from the state, then the row's new tokens); ``extend_layer``
is one layer's attention over it and the state after the piece: S, the chunks it closed, and the
piece's own k/v rows, which the caller writes into the row's K/V window (``runtime.slots``; the
graph never returns the window). State inputs are one layer's tensors (``ops.state``, format 5).
"""

from __future__ import annotations

import math

from ..graph import Graph
from .onnx_graph import _meta, chunk_states, fused_chunk_attention, phi, retrieval_weights
from .onnx_short import causal_attention, causal_bias
from .state import BANK_F, BANK_H, CARRIED as CARRIED_NAMES, K, NEW_F, NEW_H, ROW_K, ROW_V, S, V, StateSpec


def gather_rows(g: Graph, x, idx, heads: bool = False, rank: int = 4):
    """Row ``b`` of the result takes positions ``idx[b]`` (B, M) of row ``b`` of ``x``.

    x: (B, N, ...) -> (B, M, ...); with ``heads`` x is (B, H, N, ...) of rank ``rank`` and the
    gather runs along axis 2 -> (B, H, M, ...)."""
    if not heads:
        return g.op("GatherND", x, g.op("Unsqueeze", idx, g.const([-1])), batch_dims=1)
    perm = [0, 2, 1] + list(range(3, rank))
    xt = g.op("Transpose", x, perm=perm)  # (B, N, H, ...)
    return g.op("Transpose", gather_rows(g, xt, idx), perm=perm)


def _two_terms(g: Graph, w, bank, new, cap):
    """w (..., cap + Cc) over the bank's chunks then the piece's: w[..., :cap] bank + w[..., cap:] new."""
    return g.op("Add", g.op("MatMul", g.op("Slice", w, g.const([0]), cap, g.const([-1])), bank),
                g.op("MatMul", g.op("Slice", w, cap, g.const([2 ** 62]), g.const([-1])), new))


def extend_layer(g: Graph, W, cfg, p, xa, q, k, v, ctx, state_in, states):
    """One layer of a prefill that continues each row's state (``extend.onnx``).

    xa, q, k, v: the new tokens' ln_1 output (B, T, E) and projections (B, H, T, d): the dense
    layers run over the piece's tokens only. For the attention, row b's tokens stand in a
    combined, chunk-aligned sequence (B, Tc): its first ctx["c"][b] slots are the open chunk
    held in the state (their k, v come from ``state_in``; their queries and outputs are
    ignored), then the row's new tokens, then padding. Chunk i of the
    combined sequence is the row's chunk m_b + i. Retrieval runs over the row's bank (m_b
    closed chunks) and the chunks that close inside the piece; chunk 0 keeps the state's S.
    Returns the new tokens' o (B, H, T, d) and appends the row's state after the piece to ``states``: the open
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
    own = {n: state_in[n][ctx["layer"]] for n in CARRIED_NAMES}  # this layer's inputs
    U5 = None if cfg.compression is None else g.op("Unsqueeze", W(p + "attn.U"), g.const([0, 2]))  # (1,H,1,d,d')

    # The piece's own k/v rows from ``rows_from`` on (those a window can still hold), for the caller
    # to write into the row's window (``runtime.slots``): taken inside each branch, so that the
    # layer's k and v are not kept alive past it (ORT may run a node that only feeds an output late).
    piece_rows = lambda: [g.op("Slice", t_, ctx["rows_from"], g.const([2 ** 62]), g.const([2]))  # noqa: E731
                          for t_ in (k, v)]

    def general(q=q, k=k, v=v):
        rows = piece_rows()
        q, k, v = (gather_rows(g, t_, ctx["src"], heads=True) for t_ in (q, k, v))  # (B, H, Tc, d): combined
        # The open chunk's keys and values (look-back: and the previous chunk's) come from the state.
        if cfg.lookback:
            k, v = (g.op("Where", ctx["from_state"], gather_rows(g, own[n], ctx["state_rows"], heads=True), t_)
                    for n, t_ in ((K, k), (V, v)))  # (B, H, Tc, d)
        else:
            # The state's L rows padded to Tc (or its first Tc when the combined chunk is shorter).
            grow = g.op("Max", g.op("Sub", ctx["Tc"], g.const([L])), g.const([0]))
            pad_to_tc = g.cat(g.const([0, 0, 0, 0, 0, 0]), grow, g.const([0]))
            to_tc = lambda t_: g.op("Slice", g.op("Pad", t_, pad_to_tc), g.const([0]), ctx["Tc"], g.const([2]))  # noqa: E731
            k = g.op("Where", ctx["from_state"], to_tc(own[K]), k)  # (B, H, Tc, d)
            v = g.op("Where", ctx["from_state"], to_tc(own[V]), v)
        chunked = g.cat(g.const([0, H]), ctx["Cc"], ctx["Lc"], g.const([d]))
        fk = g.op("Where", ctx["valid"], phi(g, W, cfg, p, k), g.fconst(0.0))  # padding counts zero
        vm = g.op("Where", ctx["valid"], v, g.fconst(0.0))
        F_new = chunk_states(g, g.op("Reshape", fk, chunked), g.op("Reshape", vm, chunked), U5, norm, rank=5)
        xl = gather_rows(g, xa, ctx["src_last"])  # (B, Cc, E): each combined chunk's last token
        h_new = _meta(g, W, p, xl, "meta_k", H, d)  # (B, H, Cc, d)
        rp = _meta(g, W, p, xl, "meta_q", H, d)
        zero, one = g.const([0]), g.const([1])
        r = g.op("Concat", g.op("Mul", g.op("Slice", rp, zero, one, g.const([2])), g.fconst(0.0)),
                 g.op("Slice", rp, zero, g.op("Sub", ctx["Cc"], one), g.const([2])), axis=2)  # r_i from chunk i-1
        scale = g.fconst(1.0 / math.sqrt(d))
        scores = g.op("Concat", g.op("MatMul", r, g.op("Transpose", own[BANK_H], perm=[0, 1, 3, 2])),
                      g.op("MatMul", r, g.op("Transpose", h_new, perm=[0, 1, 3, 2])), axis=-1)  # (B, H, Cc, cap+Cc)
        flat = g.const([0, H, -1, dp * dc])
        bank_flat, new_flat = g.op("Reshape", own[BANK_F], flat), g.op("Reshape", F_new, flat)
        # The bank and the piece's chunks as two terms of one softmax: the bank is read in place,
        # never concatenated with the new chunks (its size grows with the context, not the piece).
        w = retrieval_weights(g, W, cfg, p, g.op("Mul", scores, scale), ctx["retrievable"], ctx.get("age"))
        SZ = _two_terms(g, w, bank_flat, new_flat, g.dim(own[BANK_H], 2))
        SZ = g.op("Reshape", SZ, g.const([0, H, -1, dp, dc]))  # (B, H, Cc, d', dc)
        SZ = g.op("Where", ctx["first_chunk"], g.op("Unsqueeze", own[S], g.const([2])), SZ)
        o = fused_chunk_attention(g, W, cfg, p, q, k, v, SZ, U5)
        # S of the new open chunk, retrieved from the bank with the closed chunks written in (built
        # here for this retrieval only): from the bank's chunks before its window and the chunks
        # the piece closed before it, again as two terms (the bank read in place).
        r_last = gather_rows(g, rp, ctx["closing_chunk"], heads=True)  # (B, H, 1, d)
        sc = g.op("Mul", g.op("Concat", g.op("MatMul", r_last, g.op("Transpose", own[BANK_H], perm=[0, 1, 3, 2])),
                              g.op("MatMul", r_last, g.op("Transpose", h_new, perm=[0, 1, 3, 2])), axis=-1),
                  scale)  # (B, H, 1, cap + Cc)
        w = retrieval_weights(g, W, cfg, p, sc, ctx["next_from"], ctx.get("next_age"))
        S_next = g.op("Reshape", _two_terms(g, w, bank_flat, new_flat, g.dim(own[BANK_H], 2)), g.const([0, H, dp, dc]))
        S_out = g.op("Where", ctx["chunk_closed"], S_next, own[S])
        if cfg.lookback:  # from the open chunk on: (B, H, Cc - n e, ...)
            h_new = gather_rows(g, h_new, ctx["new_out"], heads=True)
            F_new = gather_rows(g, F_new, ctx["new_out"], heads=True, rank=5)
        # h, F: (B, H, Cc, ...): chunks m .. m_new - 1 are the closed ones; o: the new tokens' rows (B, H, T, d)
        return [gather_rows(g, o, ctx["dst"], heads=True), *rows, S_out, h_new, F_new]

    def fresh():
        o, *rest = _fresh_prompt(g, W, cfg, p, xa, q, k, v, ctx, own, U5)
        return [o, *piece_rows(), *rest]

    outs = g.if_else(ctx["fresh"], fresh, general) if "fresh" in ctx else general()
    for n, val in zip((ROW_K, ROW_V, S, NEW_H, NEW_F), outs[1:]):
        states[n].append(val)
    return outs[0]


def _fresh_prompt(g: Graph, W, cfg, p, xa, q, k, v, ctx, own, U5):
    """``extend_layer``'s outputs when every row is fresh (position 0) and the piece fits the exact
    span with nothing to retrieve after it (``ctx["fresh"]``): plain causal attention over the
    piece; S as it was (zeros); h and F of the piece's first chunk, the one it can close."""
    H, d, L = cfg.n_head, cfg.head_dim, cfg.chunk_size
    o = causal_attention(g, q, k, v, ctx["causal_bias"], g.fconst(1.0 / math.sqrt(d)))
    first = lambda t_: g.op("Slice", t_, g.const([0]), g.const([L]), g.const([2]))  # noqa: E731  (B, H, <= L, d)
    U4 = None if U5 is None else g.op("Squeeze", U5, g.const([2]))  # (1, H, d, d')
    F0 = chunk_states(g, phi(g, W, cfg, p, first(k)), first(v), U4, cfg.retrieval == "normalised", rank=4)
    h0 = _meta(g, W, p, g.op("Gather", xa, ctx["fresh_last"], axis=1), "meta_k", H, d)  # (B, H, 1, d)
    return [o, g.op("Identity", own[S]), h0, g.op("Unsqueeze", F0, g.const([2]))]


def extend_context(g: Graph, cfg, ids, lengths, position, bank_h, short_prompts: bool = False):
    """Index tensors of ``extend_layer`` shared by every layer: ids (B, T), lengths (B,),
    position (B,) (tokens each row holds), one layer's bank_h input (B, H, cap, d), for its capacity.
    ``short_prompts``: ``ctx["fresh"]`` tells when every row is fresh and the piece has nothing to
    retrieve (``_fresh_prompt``)."""
    L, n = cfg.chunk_size, cfg.lookback
    zero, one = g.const([0]), g.const([1])
    col = lambda t: g.op("Unsqueeze", t, one)  # noqa: E731  (B,) -> (B, 1)
    T = g.dim(ids, 1)
    c, m = g.op("Mod", position, g.const(L)), g.op("Div", position, g.const(L))  # (B,)
    # Look-back: s = min(m, n) chunks of the state before the open one; the combined sequence
    # starts at the row's chunk base = m - s, and its first ``pre`` slots come from the state.
    s_b = g.op("Min", m, g.const(n)) if n else None
    pre = g.op("Add", c, g.op("Mul", s_b, g.const(L))) if n else c  # (B,)
    span = g.op("ReduceMax", g.op("Add", pre, lengths), keepdims=1)  # (1,)
    e = g.op("Min", g.op("ReduceMax", m, keepdims=1), g.const([1])) if n else g.const([0])  # (1,)
    ne = g.op("Mul", e, g.const([n]))
    ceil_div = lambda t: g.op("Div", g.op("Add", t, g.const([L - 1])), g.const([L]))  # noqa: E731
    # Chunks of the combined sequence: as many as its longest row fills (a fresh prompt of L
    # tokens is one chunk), and with look-back, once a row holds a closed chunk (e = 1), at least
    # n more than the longest run from a row's open chunk on, so that Cc - n e chunks from each
    # row's open chunk on hold every chunk the piece closes (a held row whose piece stays in its
    # open chunk: its previous chunk and the open one).
    run = g.op("ReduceMax", g.op("Add", c, lengths), keepdims=1)  # (1,): the longest from an open chunk's start
    Cc = g.op("Max", ceil_div(span), g.op("Add", ceil_div(run), ne))
    # The combined chunk length: L, or, when the piece and the open chunks fit in one chunk (no row
    # closes one, none holds a previous chunk), just the span, so a short prompt attends over its
    # own tokens and not L (look-back: 2 L) slots.
    Lc = g.op("Max", g.op("Min", span, g.const([L])), g.op("Mul", e, g.const([L])))  # (1,)
    Tc = g.op("Mul", Cc, Lc)
    tc = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", Tc, zero), g.const(1)), zero)  # (1, Tc)
    base = g.op("Sub", m, s_b) if n else m
    end = g.op("Add", position, lengths)
    m_new = g.op("Div", end, g.const(L))
    heads4 = lambda t: g.op("Unsqueeze", t, g.const([1, 3]))  # noqa: E731  (B, N) -> (B, 1, N, 1)
    jc = g.op("Range", g.const(0), g.op("Squeeze", Cc, zero), g.const(1))  # (Cc,)
    cap = g.dim(bank_h, 2)
    jcap = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", cap, zero), g.const(1)), zero)  # (1, cap)
    Tm1 = g.op("Sub", T, one)
    ctx = dict(T=T, Cc=Cc, Tc=Tc, Lc=Lc, c=c, m=m)
    # The first of the piece's rows that a row's window can hold after it: its last (n + 1) L
    # rows lie at or after the shortest row's length - (n + 1) L (``runtime.slots.piece_rows_from``).
    ctx["rows_from"] = g.op("Max", g.op("Sub", g.op("ReduceMin", lengths, keepdims=1), g.const([(n + 1) * L])),
                            g.const([0]))  # (1,)
    ctx["src"] = g.op("Min", g.op("Max", g.op("Sub", tc, col(pre)), g.const(0)), Tm1)  # (B, Tc): token of each slot
    t = g.op("Unsqueeze", g.op("Range", g.const(0), g.op("Squeeze", T, zero), g.const(1)), zero)  # (1, T)
    ctx["positions"] = g.op("Add", col(position), t)  # (B, T): the new tokens'
    ctx["dst"] = g.op("Min", g.op("Add", col(pre), t), g.op("Sub", Tc, one))  # (B, T): their combined slots
    ctx["from_state"] = heads4(g.op("Less", tc, col(pre)))
    ctx["valid"] = heads4(g.op("Less", tc, col(g.op("Add", pre, lengths))))
    ctx["last"] = g.op("Sub", g.op("Mul", g.op("Add", jc, g.const(1)), Lc), g.const(1))  # (Cc,)
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
        out = g.op("Range", g.const(0), g.op("Squeeze", g.op("Sub", Cc, ne), zero), g.const(1))
        ctx["new_out"] = g.op("Min", g.op("Add", g.op("Unsqueeze", out, zero), col(s_b)),
                              g.op("Sub", Cc, one))  # (B, Cc - n e): the returned chunks, from the open one
    else:
        B1 = g.cat(g.dim(ids, 0), g.const([1, 1, 1]))
        earlier = g.op("Less", g.op("Unsqueeze", jc, zero), g.op("Unsqueeze", jc, one))  # (Cc, Cc): [i, j] = j < i
        banked_old = g.op("Unsqueeze", g.op("Less", jcap, col(m)), g.const([1, 2]))  # (B, 1, 1, cap)
        ctx["retrievable"] = g.op("Concat", g.op("Expand", banked_old, g.cat(g.const([1, 1]), Cc, one)),
                                  g.op("Expand", g.op("Unsqueeze", earlier, zero), B1), axis=-1)  # (B, 1, Cc, cap+Cc)
        ctx["first_chunk"] = g.op("Unsqueeze", g.op("Equal", jc, g.const(0)), g.const([0, 1, 3, 4]))  # (1,1,Cc,1,1)
    o_new = g.op("Sub", m_new, m)  # (B,): chunks that close inside the piece
    closing = g.op("Sub", o_new, one) if not n else g.op("Add", g.op("Sub", o_new, one), s_b)
    ctx["closing_chunk"] = col(g.op("Max", closing, g.const(0)))  # (B, 1): the last closed chunk
    # The next chunk retrieves from the bank's chunks before its window: j < m_new - n.
    # The next chunk retrieves from chunks j < m_new - n: the bank's (j < m) and the piece's
    # (combined chunk i is the row's chunk base + i, closed inside the piece when >= m).
    upto = col(g.op("Sub", m_new, g.const(n)) if n else m_new)  # (B, 1)
    old_ok = g.op("And", g.op("Less", jcap, upto), g.op("Less", jcap, col(m)))  # (B, cap)
    j_new = g.op("Add", g.op("Unsqueeze", jc, zero), col(base))  # (B, Cc): the combined chunks' indices
    new_ok = g.op("And", g.op("GreaterOrEqual", j_new, col(m)), g.op("Less", j_new, upto))
    ctx["next_from"] = g.op("Unsqueeze", g.op("Concat", old_ok, new_ok, axis=1), g.const([1, 2]))  # (B,1,1,cap+Cc)
    U = cfg.retrieving_chunks
    if U is not None:  # chunks from U on (absolute indices) retrieve nothing
        ctx["retrievable"] = g.op("And", ctx["retrievable"],
                                  g.op("Unsqueeze", g.op("Less", j_new, g.const(U)), g.const([1, 3])))
        ctx["next_from"] = g.op("And", ctx["next_from"],
                                g.op("Unsqueeze", g.op("Less", m_new, g.const(U)), g.const([1, 2, 3])))
    ctx["chunk_closed"] = g.op("Unsqueeze", g.op("Greater", m_new, m), g.const([1, 2, 3]))  # (B, 1, 1, 1)
    if cfg.retrieval_weights == "decay":  # ages i - 1 - n - j of the retrieval's columns (bank, then piece)
        cols = g.op("Concat", g.op("Expand", jcap, g.cat(g.dim(ids, 0), cap)), j_new, axis=1)  # (B, cap + Cc)
        rows_ = g.op("Sub", j_new, g.const(1 + n))  # (B, Cc): each combined chunk's index - 1 - n
        ctx["age"] = g.op("Sub", g.op("Unsqueeze", rows_, g.const([1, 3])), g.op("Unsqueeze", cols, g.const([1, 2])))
        ctx["next_age"] = g.op("Unsqueeze", g.op("Sub", g.op("Sub", col(m_new), g.const(1 + n)), cols),
                               g.const([1, 2]))  # (B, 1, 1, cap + Cc)
    ctx["src_last"] = g.op("Gather", ctx["src"], ctx["last"], axis=1)  # (B, Cc): each chunk's last token
    if short_prompts:  # fresh rows within n L + L - 1 tokens: no chunk to retrieve, before or after the piece
        fresh = g.op("And", g.op("Equal", g.op("ReduceMax", position, keepdims=0), g.const(0)),
                     g.op("LessOrEqual", g.op("Squeeze", span, zero), g.const(n * L + L - 1)))
        ctx["fresh"] = fresh
        ctx["causal_bias"] = causal_bias(g, T, fresh)
        ctx["fresh_last"] = g.op("Sub", g.op("Min", T, g.const([L])), one)  # (1,): the first chunk's last token
    return ctx
