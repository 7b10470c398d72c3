"""BSBR model -> ONNX: writing the prefill, per-token decode and chunk-closing graphs.

``export_onnx`` writes an export directory's graphs (built by ``export_graphs``, which
describes each graph's inputs and outputs) over one external-data weights file per precision,
each tensor stored once; ``ExportSpec`` (defined beside the graphs it shapes) says what an
export writes and how it is validated.

int8 graphs (``ExportSpec(int8=True)``: ``model_int8.onnx`` ...) are the fp32 graphs with the
dense weights (attention c_attn and c_proj, MLP c_fc and c_proj, and the LM head unless
``int8_head=False``) stored int8, symmetric per output column, and multiplied by ONNX Runtime's
``com.microsoft.MatMulIntegerToFloat`` with the activations quantized per token (``graph.Graph.qlinear``: a
token's output does not depend on the other tokens of the call); embeddings, LayerNorm,
the BSBR chunk attention (its meta projections included), softmax and every state stay fp32.
The int8 tensors and their scales go to ``weights_int8.onnx.data``; an fp32 tensor whose
bytes already lie in the directory's ``weights.onnx.data`` (the fp32 export, checked by
digest) is referenced there rather than copied, so the fp32 and int8 graphs of one export
hold each tensor once on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import BSBRConfig
from .export_graphs import ExportSpec, close_graph, decode_graph, extend_graph, prefill_graph
from .graph import Graph
from .ops import onnx_graph as ops_onnx
from .ops import state
from .util import fix_modes


def _model_proto(g: Graph, inputs, outputs, name, spec: ExportSpec, cfg: BSBRConfig):
    import json

    import onnx
    from onnx import helper, numpy_helper

    from . import __version__

    inits = [a.proto() if isinstance(a, External) else numpy_helper.from_array(a, n) for n, a in g.inits.items()]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, inits)
    opsets = [helper.make_opsetid("", spec.opset), helper.make_opsetid(ops_onnx.DOMAIN, 1)]
    if spec.int8:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    fn = ops_onnx.chunk_attention_function(spec.opset, g.fdt, normalised=cfg.retrieval == "normalised",
                                           lookback=cfg.lookback)
    m = helper.make_model(graph, opset_imports=opsets, functions=[fn], producer_name="bsbr-export",
                          ir_version=10)
    meta = {"bsbr_export_version": __version__, "max_seq_len": spec.max_seq_len, "config": cfg.to_dict(),
            "precision": spec.precision, "inlined": spec.inline,
            "state": state.StateSpec.from_config(cfg).to_dict()}
    if spec.int8:
        meta["quantization"] = {"weights": "int8 symmetric per output column",
                                "activations": "int8 symmetric per token (MatMulIntegerToFloat)",
                                "layers": "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
                                          + (", lm_head" if spec.int8_head else ""),
                                "fp32_weights": "weights.onnx.data" if g.sink is not None and g.sink.base else None}
    helper.set_model_props(m, {"bsbr_export": json.dumps(meta)})
    if spec.inline:
        import onnx.inliner

        m = onnx.inliner.inline_local_functions(m)
        del m.opset_import[:]
        m.opset_import.extend([helper.make_opsetid("", spec.opset)]
                              + ([helper.make_opsetid("com.microsoft", 1)] if spec.int8 else []))
    return m


EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the graph file
ALIGN = 64  # offsets of tensors in the weights file


def _suffix(spec: ExportSpec) -> str:
    return "" if spec.precision == "fp32" else f"_{spec.precision}"


def weights_name(spec: ExportSpec) -> str:
    """The one external-data file that every graph of an export (of one precision) writes."""
    return f"weights{_suffix(spec)}.onnx.data"


class WeightsFile:
    """External data shared by the graphs of one export: each initializer is written once, when a
    graph first names it, and every graph that holds it points at the same bytes."""

    min_bytes = EXTERNAL_MIN_BYTES

    def __init__(self, path: Path, base: dict | None = None):
        self.path, self.index, self.size = Path(path), {}, 0
        self.base = base or {}  # name -> External in another file of the export, used when the bytes agree

    def add(self, name: str, a: np.ndarray) -> "External":
        raw = memoryview(a).cast("B")
        digest = hashlib.sha256(raw).hexdigest()
        known = self.base.get(name)
        if known is not None and known.digest == digest and known.dtype == a.dtype and tuple(known.shape) == a.shape:
            return known
        if name in self.index:
            if self.index[name].digest != digest:
                raise ValueError(f"initializer {name!r} differs between the graphs of one export")
            return self.index[name]
        offset = -(-self.size // ALIGN) * ALIGN
        with open(self.path, "ab") as f:
            f.write(b"\0" * (offset - self.size))
            f.write(raw)
        self.size = offset + len(raw)
        self.index[name] = External(name, a.dtype, a.shape, self.path.name, offset, len(raw), digest)
        return self.index[name]


@dataclass(frozen=True)
class External:
    """An initializer stored in the weights file: what a graph records of it."""

    name: str
    dtype: np.dtype
    shape: tuple
    location: str
    offset: int
    length: int
    digest: str

    def proto(self):
        from onnx import TensorProto, helper

        t = TensorProto(name=self.name, dims=list(self.shape),
                        data_type=helper.np_dtype_to_tensor_dtype(self.dtype), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", self.offset), ("length", self.length)):
            t.external_data.add(key=key, value=str(value))
        return t


def _save(m, path: Path, check: bool = True):
    import onnx

    onnx.save_model(m, str(path))
    if check:
        onnx.checker.check_model(str(path), full_check=True)


def onnx_name(graph: str, spec: ExportSpec) -> str:
    """model.onnx / decode.onnx, with an _fp16 or _int8 suffix for the other precisions."""
    return f"{graph}{_suffix(spec)}.onnx"


FP32_GRAPHS = ("model", "extend", "decode", "close")


def existing_weights(out_dir) -> dict:
    """{name: External} of the tensors that the fp32 graphs in ``out_dir`` keep in
    ``weights.onnx.data``, with the digest of their bytes in that file ({} without it)."""
    import onnx
    from onnx import TensorProto, helper

    out = Path(out_dir)
    data = out / weights_name(ExportSpec())
    if not data.is_file():
        return {}
    index = {}
    with open(data, "rb") as f:
        for g in FP32_GRAPHS:
            path = out / f"{g}.onnx"
            if not path.is_file():
                continue
            m = onnx.load(str(path), load_external_data=False)
            for t in m.graph.initializer:
                if t.data_location != TensorProto.EXTERNAL or t.name in index:
                    continue
                info = {e.key: e.value for e in t.external_data}
                if info.get("location") != data.name:
                    continue
                offset, length = int(info.get("offset", 0)), int(info["length"])
                f.seek(offset)
                raw = f.read(length)
                if len(raw) != length:
                    continue
                index[t.name] = External(t.name, helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims),
                                         data.name, offset, length, hashlib.sha256(raw).hexdigest())
    return index


def export_onnx(model, out_dir, spec: ExportSpec = ExportSpec(), decode: bool = True, progress=None) -> dict:
    """Write ``model.onnx`` (+ ``extend.onnx``, ``decode.onnx``, ``close.onnx``) and their one
    weights file (``weights.onnx.data``; ``_fp16`` / ``_int8`` names for those specs) into
    ``out_dir``. An int8 export references the fp32 tensors of ``out_dir``'s fp32 export
    (``existing_weights``) instead of writing them again.

    Files are written and checked in a temporary directory next to ``out_dir``;
    only complete, checked files are moved in. Returns {file name: path} of the graphs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    written = {}
    base = existing_weights(out) if spec.int8 else {}
    weights = WeightsFile(tmp / weights_name(spec), base=base)
    try:
        jobs = [(onnx_name("model", spec), prefill_graph, "bsbr_prefill")]
        if decode:
            jobs.append((onnx_name("extend", spec), extend_graph, "bsbr_extend"))
            jobs.append((onnx_name("decode", spec), decode_graph, "bsbr_decode"))
            jobs.append((onnx_name("close", spec), close_graph, "bsbr_close_chunk"))
        for fname, build, gname in jobs:
            if progress:
                progress(f"building {fname}")
            g, inputs, outputs = build(model, spec, weights)
            m = _model_proto(g, inputs, outputs, gname, spec, model.cfg)
            if progress:
                progress(f"writing and checking {fname}")
            # A graph that reads the directory's fp32 weights file is checked once beside it (the
            # checker resolves external data next to the graph and refuses a link to the file).
            _save(m, tmp / fname, check=not base)
        fix_modes(tmp)  # onnx writes external data 0600; every output file gets one mode
        moved = []
        try:
            for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # weights first
                os.replace(f, out / f.name)
                moved.append(out / f.name)
                if f.suffix == ".onnx":
                    written[f.name] = out / f.name
                    if base:
                        import onnx

                        onnx.checker.check_model(str(out / f.name), full_check=True)
        except BaseException:
            for f in moved:
                f.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
