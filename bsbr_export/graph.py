"""A small ONNX graph builder: the exporter writes every graph node by node through it.

Float tensors live in the graph's precision (fp32 or fp16); LayerNorm and softmax always run
in fp32. Initializers are numpy arrays named once; constants are shared by value. An int8
graph is an fp32 graph whose dense weights were registered through ``qweight``: its
``linear`` on such a weight quantizes the activations per token (``qlinear``: int8 symmetric
per row, ORT's MatMulIntegerToFloat: an exact integer product, then the two scales; the weight int8
symmetric per output column).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

NEG = -30000.0  # masked score: far below any real score, finite in fp16


class Graph:
    """A small ONNX graph builder: unique names, numpy initializers, one call per node."""

    def __init__(self, float_dtype=np.float32, prefix="", sink=None):
        from onnx import TensorProto

        self.nodes, self.inits, self.n = [], {}, 0
        self.fdt = float_dtype
        self.fproto = TensorProto.FLOAT16 if float_dtype == np.float16 else TensorProto.FLOAT
        self.prefix, self.sink = prefix, sink
        self.scales = {}  # int8 weight name -> its per-column scale's name

    def qweight(self, name, array):
        """An int8 weight (in, out), symmetric per output column: w ~= q * scale[col], q in
        [-127, 127]; registers ``name`` (int8) and ``name + ".scale"`` (float32, one per column).
        ``linear`` on ``name`` then runs the quantized product."""
        w = np.asarray(array, dtype=np.float32)
        assert w.ndim == 2, (name, w.shape)
        peak = np.abs(w).max(axis=0)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        self.weight(name, q, dtype=np.int8)
        self.scales[name] = self.weight(name + ".scale", scale, dtype=np.float32)
        return name

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

        def rename(nodes):  # the If branches read it from the enclosing scope
            for node in nodes:
                for seq in (node.output, node.input):
                    for i, n in enumerate(seq):
                        if n == value:
                            seq[i] = name
                for a in node.attribute:
                    if a.type == a.GRAPH:
                        rename(a.g.node)
                        rename_outputs(a.g.output)

        def rename_outputs(infos):
            for info in infos:
                if info.name == value:
                    info.name = name

        rename(self.nodes)
        return name

    def weight(self, name, array, dtype=None):
        """An initializer in the graph's float type (or ``dtype``). With a ``sink`` (the export's
        weights file), a large one is written there at once and the graph keeps only a reference,
        so no graph ever holds a copy of the model's weights."""
        a = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.fdt))
        assert name not in self.inits, name
        self.inits[name] = self.sink.add(name, a) if self.sink is not None and a.nbytes >= self.sink.min_bytes else a
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
    def linear(self, x, w_name, b_name=None, lead=None):
        """x @ w + b; an int8 weight (``qweight``) goes through ``qlinear``."""
        if w_name in self.scales:
            return self.qlinear(x, w_name, b_name)
        if b_name and self.fdt == np.float32:
            return self.gemm_rows(x, w_name, b_name, lead)
        y = self.op("MatMul", x, w_name)
        return self.op("Add", y, b_name) if b_name else y

    def qlinear(self, x, w_name, b_name=None):
        """x @ w + b for an int8 weight, the activations quantized per token: each row of ``x``
        symmetric with its own scale (max |x_row| / 127), stored as uint8 with zero point 128 (the
        fast u8 x s8 kernel). The integer product is exact and every other step works on
        one row, so a token's output does not depend on the other tokens of the call: a prompt
        fed in other pieces, or batched with other rows, gives the same bits for the same input."""
        peak = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]), keepdims=1),
                       self.const(1e-30, np.float32))
        scale = self.op("Mul", peak, self.const(1 / 127, np.float32))  # (..., 1)
        q = self.op("QuantizeLinear", self.op("Div", x, scale), self.const(1.0, np.float32),
                    self.const(128, np.uint8))
        # The weight's scale inside ORT's fused integer product, the row's after it: given a scale
        # per row, the fusion of MatMulInteger + Cast + Mul takes it for one per column.
        y = self.op("MatMulIntegerToFloat", q, w_name, self.const(1.0, np.float32), self.scales[w_name],
                    self.const(128, np.uint8), domain="com.microsoft")
        y = self.op("Mul", y, scale)
        return self.op("Add", y, b_name) if b_name else y

    # The leading dims (1-d int64 tensor) of the activations every ``linear`` without its own
    # ``lead`` sees (Shape(input_ids) = [B, T] in the prefill graph), set by a graph that knows
    # them; None: each such layer takes them from its input.
    lead = None

    def gemm_rows(self, x, w_name, b_name, lead=None):
        """x (..., in) @ w (in, out) + b as one Gemm on (rows, in), bias inside the Gemm (ORT fuses no
        3-d MatMul + Add): Reshape -> Gemm -> Reshape, the reshapes free (no copy). ``lead``: the
        leading dims of x (default ``self.lead``, else Shape(x) without its last dim)."""
        n_in, n_out = self.inits[w_name].shape
        lead = lead if lead is not None else self.lead if self.lead is not None else self.op("Shape", x, end=-1)
        key = (lead, n_out)
        shapes = self.__dict__.setdefault("_out_shapes", {})
        if key not in shapes:
            shapes[key] = self.cat(lead, self.const([n_out]))
        y = self.op("Gemm", self.op("Reshape", x, self.const([-1, n_in])), w_name, b_name)
        return self.op("Reshape", y, shapes[key], allowzero=1)  # explicit dims: a 0 (no rows) stays 0

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
        # fp32: written as ORT's FastGelu fusion expects it (x^3 as Pow), one FastGelu kernel per MLP.
        x3 = (self.op("Pow", x, self.fconst(3.0)) if self.fdt == np.float32
              else self.op("Mul", self.op("Mul", x, x), x))
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

    def if_else(self, cond, then_fn, else_fn, outputs=None):
        """One If node: the branches are the nodes ``then_fn()`` and ``else_fn()`` add (each returns
        a list of values, read from the enclosing scope as needed). Builder caches filled inside a
        branch are dropped after it, so no later node reads a value that only a branch defines.
        Returns the If's outputs (one value, or a list)."""
        from onnx import helper

        bodies = []
        for fn in (then_fn, else_fn):
            outer, shapes, self.nodes = self.nodes, dict(self.__dict__.get("_out_shapes", {})), []
            outs = fn()
            body, self.nodes, self._out_shapes = self.nodes, outer, shapes
            bodies.append(helper.make_graph(body, self.name("branch"), [],
                                            [helper.make_tensor_value_info(o, self.fproto, None) for o in outs]))
        return self.op("If", cond, then_branch=bodies[0], else_branch=bodies[1], outputs=outputs or len(outs))

    def dim(self, x, i: int):
        """Dimension i >= 0 of x as a 1-element int64 tensor."""
        return self.op("Shape", x, start=i, end=i + 1)

    def cat(self, *parts):
        return self.op("Concat", *parts, axis=0)

    def split_heads(self, x, H, d):
        """(B, N, E) -> (B, H, N, d)."""
        return self.op("Transpose", self.op("Reshape", x, self.const([0, 0, H, d])), perm=[0, 2, 1, 3])

    def merge_heads(self, x, E):
        """(B, H, N, d) -> (B, N, E)."""
        return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]), self.const([0, 0, E]))
