"""The prefill baseline users run: HF ``GPT2LMHeadModel`` exported by ``torch.onnx.export(..., dynamo=True)``.

No graph of this project's builder is involved: the HF model (``use_cache=False``) is wrapped so
that the graph maps ``input_ids`` [batch, seq] (both dynamic) to ``logits`` [batch, seq, vocab],
the same interface as ``model.onnx``, and exported by torch's own exporter (it needs the
``onnxscript`` package) with its graph optimisation on (the default). The weights go to one
external-data file beside the graph. Attention is HF's eager implementation: the export of the
default (SDPA) model gives the same logits and measured no faster in ORT on CPU (T=1..512).
"""

from __future__ import annotations

from pathlib import Path

HF_ONNX = "model.onnx"
OPSET = 18


def _logits_only(hf):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False, return_dict=True).logits

    return LogitsOnly(hf).eval()


def export_hf_onnx(hf_dir, out_dir, example_seq: int = 8) -> Path:
    """Export the HF GPT-2 in ``hf_dir`` (eager attention, fp32) to ``out_dir/model.onnx``; returns its path."""
    import onnx
    import torch
    from transformers import GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    hf.config.use_cache = False
    model = _logits_only(hf)
    ids = torch.zeros((2, example_seq), dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1,
                                                                              max=hf.config.n_positions)
    path = out / HF_ONNX
    with torch.no_grad():
        prog = torch.onnx.export(model, (ids,), dynamo=True, opset_version=OPSET, input_names=["input_ids"],
                                 output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                                 optimize=True, verbose=False, external_data=True)
    prog.save(str(path), external_data=True)
    onnx.checker.check_model(str(path))
    return path
