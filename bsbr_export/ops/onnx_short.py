"""ONNX: the short-prompt path. A prompt with nothing to retrieve (at most chunk x (look-back + 1)
tokens, or fresh rows of an extend piece that close no more than their window holds) is plain
causal softmax attention; the prefill and extend graphs take it through one If per layer
(``ExportSpec.short_prompts``), the general BSBR path being the other branch."""

from __future__ import annotations

from ..graph import NEG, Graph


def causal_bias(g: Graph, T, cond):
    """The (T, T) additive causal mask (0 where key <= query, NEG above) where ``cond`` holds, else
    a (1, 1) zero: one If, so that only the short prompts that read it build it."""
    from onnx import helper

    def mask():  # fp32 ones: Trilu has fp32 kernels
        ones = g.op("ConstantOfShape", g.cat(T, T), value=helper.make_tensor("one", 1, [1], [1.0]))
        return [g.op("Where", g.op("Cast", g.op("Trilu", ones, upper=0), to=9), g.fconst(0.0), g.fconst(NEG))]

    return g.if_else(cond, mask, lambda: [g.op("Identity", g.fconst([[0.0]]))])


def causal_attention(g: Graph, q, k, v, bias, scale):
    """Causal softmax attention over all T keys: q, k, v (B, H, T, d), bias (T, T) -> (B, H, T, d)."""
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale), bias)
    return g.op("MatMul", g.softmax(scores), v)
