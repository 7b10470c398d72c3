"""The BSBR op, every backend side by side (docs/bsbr-math.md is the definition).

    naive.py       loop references, written plainly and apart: the oracle of every test
    chunk.py       torch, whole sequence (prefill): feature map, chunk states, retrieval,
                   the normalised combine, the fused chunk attention
    recurrent.py   torch, one token: the step's attention, the chunk close, the retrieval of
                   the next chunk's state, and ``DecodeState``
    kernel.py      Triton: the fused chunk attention (plain and normalised, one kernel)
    onnx_graph.py  ONNX: the same pieces as graph nodes, the fused op as a local function
    onnx_extend.py ONNX: the extend graph's pieces (a prefill that continues a state)
    state.py       the decode state: names, dims, layout, bytes, format version
    baselines.py   what BSBR is compared with: sliding-window and sinks + window attention
                   over the original weights (torch only; no retrieval, no export)

A new variant of the op is one switch in each backend kind, next to the existing ones:
torch in ``chunk.py`` (and, if its step differs, ``recurrent.py``), ONNX in ``onnx_graph.py``,
Triton in ``kernel.py`` (and its plugin in ``bsbr_export.trt``), its loop reference in
``naive.py``; if it carries more state, ``state.py`` names it and bumps ``FORMAT``.
Nothing outside this package computes attention.
"""
