"""GPT-2 with a KV cache in ONNX Runtime: the decode baseline a user would run instead of BSBR.

``export_kvcache`` writes GPT-2's decoder-with-past graph in the layout Optimum exports, built
node by node with this project's graph builder from the HF checkpoint's own weights:

    inputs   input_ids int64 [batch, seq], attention_mask int64 [batch, past + seq] (1 = a real
             token, 0 = padding), position_ids int64 [batch, seq],
             past_key_values.{i}.key / .value float32 [batch, head, past, head_dim] per layer
    outputs  logits float32 [batch, seq, vocab],
             present.{i}.key / .value float32 [batch, head, past + seq, head_dim]

``past`` may be 0, so the same graph runs the prompt and every decode step. The weights go to
one external-data file (``weights.onnx.data``) as in the project's other exports.

``KVCacheDecoder`` runs it the way a production caller does (Optimum's ``use_io_binding``):
the present outputs stay ORT values that are bound as the next step's past, never copied to
the host; the logits are the only host copy per step. Torch-free: numpy and onnxruntime only
(exporting reads the checkpoint through ``convert``, which needs torch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

GRAPH_FILE = "decoder_with_past_model.onnx"
META_KEY = "bsbr_export_kvcache"


def past_name(i: int, kind: str) -> str:
    return f"past_key_values.{i}.{kind}"


def present_name(i: int, kind: str) -> str:
    return f"present.{i}.{kind}"


def _weights(g, sd):
    """Names the HF checkpoint's tensors once in the graph, as HF stores them: GPT-2's projections
    (Conv1D) are (in, out), the layout ``Graph.linear`` multiplies by."""
    from .convert import _hf_key

    def name(key):
        if key not in g.inits:
            g.weight(key, _hf_key(sd, key).detach().to("cpu").float().numpy())
        return key

    return name


def kvcache_graph(sd, cfg: dict, sink=None):
    """(graph, inputs, outputs) of GPT-2's decoder with past; ``sd`` is the HF state dict,
    ``cfg`` its HF config (a dict)."""
    from onnx import TensorProto, helper

    from .graph import NEG, Graph

    cfg = SimpleNamespace(**{**cfg, "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5),
                             "activation_function": cfg.get("activation_function", "gelu_new")})
    E, H, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
    d = E // H
    g = Graph(np.float32, sink=sink)
    W = _weights(g, sd)
    zero, one = g.const([0]), g.const([1])
    P = g.dim(past_name(0, "key"), 2)  # (1,) tokens already in the cache
    total = g.op("Add", P, g.dim("input_ids", 1))
    kpos = g.op("Range", g.const(0), g.op("Squeeze", total, zero), g.const(1))  # (P+T,)
    qpos = g.op("Range", g.op("Squeeze", P, zero), g.op("Squeeze", total, zero), g.const(1))  # (T,)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", kpos, zero), g.op("Unsqueeze", qpos, one))  # (T, P+T)
    real = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2])), to=TensorProto.BOOL)  # (B,1,1,P+T)
    allowed = g.op("And", causal, real)  # (B, 1, T, P+T)
    x = g.op("Add", g.op("Gather", W("wte.weight"), "input_ids"), g.op("Gather", W("wpe.weight"), "position_ids"))
    scale = g.fconst(1.0 / math.sqrt(d))
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        xa = g.layer_norm(x, W(p + "ln_1.weight"), W(p + "ln_1.bias"), eps)
        qkv = g.linear(xa, W(p + "attn.c_attn.weight"), W(p + "attn.c_attn.bias"))
        q, k, v = (g.split_heads(t, H, d) for t in g.op("Split", qkv, g.const([E, E, E]), axis=-1, outputs=3))
        kk = g.op("Concat", past_name(i, "key"), k, axis=2)  # (B, H, P+T, d)
        vv = g.op("Concat", past_name(i, "value"), v, axis=2)
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", kk, perm=[0, 1, 3, 2])), scale)  # (B, H, T, P+T)
        o = g.op("MatMul", g.softmax(g.op("Where", allowed, scores, g.fconst(NEG))), vv)  # (B, H, T, d)
        g.output(kk, present_name(i, "key"))
        g.output(vv, present_name(i, "value"))
        x = g.op("Add", x, g.linear(g.merge_heads(o, E), W(p + "attn.c_proj.weight"), W(p + "attn.c_proj.bias")))
        m = g.linear(g.layer_norm(x, W(p + "ln_2.weight"), W(p + "ln_2.bias"), eps),
                     W(p + "mlp.c_fc.weight"), W(p + "mlp.c_fc.bias"))
        m = g.linear(g.activation(m, cfg.activation_function), W(p + "mlp.c_proj.weight"), W(p + "mlp.c_proj.bias"))
        x = g.op("Add", x, m)
    x = g.layer_norm(x, W("ln_f.weight"), W("ln_f.bias"), eps)
    g.output(g.op("MatMul", x, g.op("Transpose", W("wte.weight"), perm=[1, 0])), "logits")  # tied head: (B, T, V)
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", I64, ["batch", "past_seq + seq"]),
              helper.make_tensor_value_info("position_ids", I64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", F, ["batch", "seq", cfg.vocab_size])]
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(past_name(i, kind), F, ["batch", H, "past_seq", d]))
            outputs.append(helper.make_tensor_value_info(present_name(i, kind), F, ["batch", H, "past_seq + seq", d]))
    return g, inputs, outputs


def export_kvcache(source, out_dir, opset: int = 18) -> Path:
    """Write ``decoder_with_past_model.onnx`` and its ``weights.onnx.data`` into ``out_dir`` from
    the HF GPT-2 checkpoint ``source`` (a local directory); returns the graph's path. Written and
    checked in a temporary directory inside ``out_dir``, then moved in."""
    import onnx
    from onnx import helper, numpy_helper

    from . import __version__
    from .convert import load_hf_checkpoint
    from .export import External, WeightsFile, weights_name, ExportSpec
    from .util import fix_modes

    sd, hf_cfg, _ = load_hf_checkpoint(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        g, inputs, outputs = kvcache_graph(sd, hf_cfg, WeightsFile(tmp / weights_name(ExportSpec())))
        inits = [a.proto() if isinstance(a, External) else numpy_helper.from_array(a, n) for n, a in g.inits.items()]
        m = helper.make_model(helper.make_graph(g.nodes, "gpt2_decoder_with_past", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="bsbr-export",
                              ir_version=10)
        meta = {"bsbr_export_version": __version__, "graph": "gpt2 decoder with past (KV cache)"}
        meta |= {k: hf_cfg.get(k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
        helper.set_model_props(m, {META_KEY: json.dumps(meta)})
        onnx.save_model(m, str(tmp / GRAPH_FILE))
        onnx.checker.check_model(str(tmp / GRAPH_FILE), full_check=True)
        fix_modes(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / GRAPH_FILE


class KVCacheDecoder:
    """GPT-2's decoder with past in an ORT session, run through IOBinding (see the module docstring).

    ``path``: the graph file or the directory holding it. ``start(batch)`` empties the cache;
    ``fill(arrays)`` sets it (one (key, value) pair of [batch, head, past, head_dim] arrays per
    layer); ``step(ids, attention_mask=None, position_ids=None)`` runs ``ids`` [batch, seq] on top
    of the cache and returns their logits [batch, seq, vocab] (a host array); by default every
    cached token is real and positions continue from the cache length. ``session_options``: ORT
    session configuration entries (``Engine``'s).
    """

    def __init__(self, path, threads: int | None = None, providers=None, optimization: str = "all",
                 session_options: dict | None = None):
        from .runtime.runners import session_from_onnx

        p = Path(path)
        p = p / GRAPH_FILE if p.is_dir() else p
        self.session = session_from_onnx(p, threads, providers or ["CPUExecutionProvider"], optimization,
                                         config=session_options)
        ins = {i.name: i for i in self.session.get_inputs()}
        self.n_layer = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        _, self.n_head, _, self.head_dim = ins[past_name(0, "key")].shape
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.cache, self.batch, self.length = [], 0, 0

    def _value(self, a: np.ndarray):
        import onnxruntime as ort

        a = np.ascontiguousarray(a, dtype=np.float32)  # on CPU the value keeps this array as its memory
        return ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)

    def fill(self, pairs) -> None:
        """The cache holds the given (key, value) arrays, one pair per layer."""
        pairs = list(pairs)
        if len(pairs) != self.n_layer:
            raise ValueError(f"expected {self.n_layer} (key, value) pairs, got {len(pairs)}")
        self.cache = [(self._value(k), self._value(v)) for k, v in pairs]
        self.batch, self.length = pairs[0][0].shape[0], pairs[0][0].shape[2]

    def start(self, batch: int) -> None:
        """An empty cache for ``batch`` sequences."""
        z = np.zeros((batch, self.n_head, 0, self.head_dim), dtype=np.float32)
        self.fill([(z, z)] * self.n_layer)

    def cache_bytes(self) -> int:
        return 2 * self.n_layer * self.batch * self.n_head * self.length * self.head_dim * 4

    def step(self, ids, attention_mask=None, position_ids=None) -> np.ndarray:
        import onnxruntime as ort

        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(self.batch, -1))
        T = ids.shape[1]
        if attention_mask is None:
            attention_mask = np.ones((self.batch, self.length + T), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(self.length, self.length + T, dtype=np.int64), ids.shape)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        logits = np.empty((self.batch, T, self.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        names = []
        for i, (k, v) in enumerate(self.cache):
            io.bind_ortvalue_input(past_name(i, "key"), k)
            io.bind_ortvalue_input(past_name(i, "value"), v)
            for kind in ("key", "value"):
                io.bind_output(present_name(i, kind), self.device)  # ORT allocates; the value stays there
                names.append(present_name(i, kind))
        self.session.run_with_iobinding(io)
        outs = dict(zip(["logits"] + names, io.get_outputs()))
        self.cache = [(outs[present_name(i, "key")], outs[present_name(i, "value")]) for i in range(self.n_layer)]
        self.length += T
        return logits

    def cache_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copies of the cache (for tests; decoding never copies it)."""
        return [(k.numpy(), v.numpy()) for k, v in self.cache]


def kv_logits(decoder: KVCacheDecoder, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits [batch, seq, vocab] of ``ids`` run as a prompt of ``prompt`` tokens on an empty
    cache, then one token per step: how a generating caller uses the graph."""
    ids = np.asarray(ids, dtype=np.int64)
    decoder.start(ids.shape[0])
    parts = [decoder.step(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        parts.append(decoder.step(ids[:, t:t + 1]))
    return np.concatenate(parts, axis=1)
