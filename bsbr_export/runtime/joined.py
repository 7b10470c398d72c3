"""How the sessions of an export share its weights: one mapped copy for every session
(``shared_weights``), and the prompt graph and the per-token graph as one session
(``joined_model``), so that both read one packed copy.

``extend.onnx`` (prompt pieces) and ``decode.onnx`` (one token per row) run the same dense
weights. ORT packs a constant weight for its GEMM kernels when a session loads (prepacking),
and the packed copy belongs to that session: two sessions over shared weights hold one packed
copy each (the dense weights once more), or leave one graph
unpacked, which then repacks every weight on every call (a fresh 128-token prompt at GPT-2
small: 217 against 201 ms packed, docs/results/ttft.md). Within one session, nodes of the same
op type that read one weight share its packed copy, If branches included (onnxruntime 1.32:
the resident memory of such an If over one weight grows by one packed copy, not two).

``joined_model`` therefore writes, in memory, one model whose graph is a single If on the bool
input ``extend``: the then branch is ``extend.onnx``'s graph, the else branch
``decode.onnx``'s, both as exported (the files stay as they are; TensorRT and the parity checks
read them). The model's inputs are the prompt graph's (the per-token graph's are a subset of
them) and its outputs both graphs'; a branch fills the other graph's outputs with empty
tensors, and a run feeds empty tensors for the inputs its branch does not read
(``idle_inputs``). Optimum's merged decoders take the same If over shared initializers. The If
costs a decode step about 1 ms (GPT-2 small, 256 tokens of context: 20.3 against 19.5 ms at one
row, 44.5 against 43.9 at 16 rows; docs/results/decode-joined.md), where the prompt graph in a
session of its own, unpacked, runs a fresh prompt of 32 or 128 tokens 15-40% slower (docs/results/ttft.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

FLAG = "extend"


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


def _empty(name: str, rank: int):
    """A Constant node: a float tensor with no elements, of ``rank`` dimensions, named ``name``."""
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], name=f"{name}_idle",
                            value=helper.make_tensor(f"{name}_idle", TensorProto.FLOAT, [0] * rank, []))


def _branch(graph, outputs, name: str):
    """``graph``'s nodes as an If branch that yields every one of ``outputs`` (value infos), those
    the graph does not compute as empty tensors."""
    from onnx import helper

    own = {o.name for o in graph.output}
    nodes = list(graph.node) + [_empty(o.name, len(o.type.tensor_type.shape.dim)) for o in outputs
                                if o.name not in own]
    infos = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in outputs]
    return helper.make_graph(nodes, name, [], infos, value_info=list(graph.value_info))


def joined_model(extend_path, decode_path):
    """One ModelProto running ``extend_path``'s graph where the input ``extend`` is true and
    ``decode_path``'s where it is false. Weights stay external references (the caller supplies
    them as shared initializers)."""
    import onnx
    from onnx import TensorProto, helper

    ext, dec = (onnx.load(str(p), load_external_data=False) for p in (extend_path, decode_path))
    inputs = {i.name: i for i in ext.graph.input}
    for i in dec.graph.input:
        if i.name not in inputs or inputs[i.name].type.tensor_type.elem_type != i.type.tensor_type.elem_type:
            raise ModelLoadError(f"{decode_path}: input {i.name} is not one of {extend_path.name}'s")
    outputs = list(ext.graph.output) + [o for o in dec.graph.output if o.name not in {e.name for e in ext.graph.output}]
    inits = {t.name: t for t in ext.graph.initializer}
    for t in dec.graph.initializer:
        if t.name in inits and (list(t.dims), t.data_type) != (list(inits[t.name].dims), inits[t.name].data_type):
            raise ModelLoadError(f"{decode_path}: initializer {t.name} differs from {extend_path.name}'s")
        inits.setdefault(t.name, t)
    flag = helper.make_tensor_value_info(FLAG, TensorProto.BOOL, [])
    node = helper.make_node("If", [FLAG], [o.name for o in outputs], name="extend_or_decode",
                            then_branch=_branch(ext.graph, outputs, "extend"),
                            else_branch=_branch(dec.graph, outputs, "decode"))
    graph = helper.make_graph([node], "bsbr_step", [flag] + list(ext.graph.input), outputs,
                              list(inits.values()))
    functions = {(f.domain, f.name): f for f in [*ext.functions, *dec.functions]}
    model = helper.make_model(graph, opset_imports=list(ext.opset_import), functions=list(functions.values()),
                              ir_version=ext.ir_version)
    model.metadata_props.extend(ext.metadata_props)
    return model


def idle_inputs(session, used) -> dict:
    """{name: empty array} for every input of the joined ``session`` not in ``used``: symbolic
    dimensions 0, fixed ones as declared (the branch that runs does not read them)."""
    dtypes = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(bool)": np.bool_}
    return {i.name: np.zeros([d if isinstance(d, int) else 0 for d in i.shape], dtypes[i.type])
            for i in session.get_inputs() if i.name not in used and i.name != FLAG}
