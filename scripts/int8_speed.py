"""Prefill speed of the int8 graph against the fp32 BSBR graph and ORT's own quantize_dynamic.

    python scripts/int8_speed.py --model models/gpt2-pystdlib --seq 1024
    python scripts/int8_speed.py --model gpt2-small-random --seq 1024     # GPT-2 small shape, random weights

Exports model.onnx (fp32, no state outputs) and model_int8.onnx into --work, quantizes model.onnx
with onnxruntime.quantization.quantize_dynamic (int8 weights per channel), then times the three
prefill graphs at batch 1 x --seq random tokens in one process, one run of each per round
(--rounds rounds, after one warm-up each), 2 intra-op threads by default. Prints the medians
and the speedups over fp32. Run it alone on the machine (flock /tmp/bsbr-cpu.lock ...).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/gpt2-pystdlib", help="HF GPT-2 directory or gpt2-small-random")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bsbr_export.convert import convert
    from bsbr_export.export import ExportSpec, export_onnx
    from bsbr_export.util import machine_line

    work = a.work or Path(tempfile.mkdtemp(prefix="int8-speed."))
    src = a.model
    kw = {}
    if a.model == "gpt2-small-random":
        from bsbr_export.bench.prepare import _make_random_hf

        src = work / "hf"
        _make_random_hf("gpt2-small-random", src, 0)
        kw = {"retrieval_scale": 1.0}  # the benchmark's setting: the retrieval term is live
    m = convert(src, **kw)
    d = work / "graphs"
    export_onnx(m, d, ExportSpec(max_seq_len=a.seq, state_outputs=False), decode=False)
    export_onnx(m, d, ExportSpec(max_seq_len=a.seq, state_outputs=False, int8=True), decode=False)
    quantize_dynamic(str(d / "model.onnx"), str(d / "model_qdyn.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, use_external_data_format=True)
    graphs = {"fp32 BSBR": "model.onnx", "int8 (this project)": "model_int8.onnx",
              "quantize_dynamic": "model_qdyn.onnx"}
    sessions = {}
    for name, f in graphs.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        sessions[name] = ort.InferenceSession(str(d / f), so, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, m.cfg.vocab_size, size=(1, a.seq), dtype=np.int64)
    for s in sessions.values():
        s.run(["logits"], {"input_ids": ids})
    times = {n: [] for n in sessions}
    for _ in range(a.rounds):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(["logits"], {"input_ids": ids})
            times[n].append((time.perf_counter() - t) * 1e3)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]  # int8 dot products without saturation
    print(f"{machine_line()}; int8 dot products: {', '.join(vnni) or 'no VNNI (u8s8 on AVX2 may saturate)'}; "
          f"{a.model}, batch 1 x {a.seq} tokens, {a.threads} threads, {a.rounds} rounds")
    base = float(np.median(times["fp32 BSBR"]))
    for n, ts in times.items():
        med = float(np.median(ts))
        print(f"  {n:20s} median {med:8.1f} ms  min {min(ts):8.1f} ms  speedup over fp32 {base / med:.2f}x")


if __name__ == "__main__":
    main()
