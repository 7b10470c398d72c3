"""The ``prepare`` child: build every model and graph, then the parity gate (no benchmark on a red gate).

Before anything is timed the models are built, the graphs exported and each backend's logits
checked against its PyTorch reference at a short length; a backend that fails is never timed.
Beyond the checkpoint's ``n_positions`` the standard baselines use an extended position table
(rows tiled from the learned table).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .jobs import set_torch_threads
from .spec import RANDOM_MODELS, BenchSpec


def _make_random_hf(name: str, out: Path, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    kw = dict(RANDOM_MODELS[name])
    if name == "tiny-random":
        kw.update(bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**kw)).eval()
    model.save_pretrained(out, safe_serialization=True)


def _extend_positions(src: Path, out: Path, n_positions: int) -> int:
    """Save ``src`` with a position table of ``n_positions`` rows (row t = learned row t mod N)."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(src).eval()
    n_old = hf.config.n_positions
    if n_positions <= n_old:
        hf.save_pretrained(out, safe_serialization=True)
        return n_old
    sd = hf.state_dict()
    wpe = sd["transformer.wpe.weight"]  # (N, E)
    idx = torch.arange(n_positions) % n_old
    sd["transformer.wpe.weight"] = wpe[idx].clone()  # (N_ext, E)
    cfg = hf.config.__class__.from_dict({**hf.config.to_dict(), "n_positions": n_positions})
    ext = GPT2LMHeadModel(cfg).eval()
    ext.load_state_dict(sd)
    ext.save_pretrained(out, safe_serialization=True)
    return n_positions


def _parity(ref, out, atol: float, min_top1: float, reference: str, seq: int) -> dict:
    from ..check import compare_logits

    m = compare_logits(ref, out)
    ok = m["max_abs"] <= atol and m["top1"] >= min_top1
    return {"status": "pass" if ok else "FAILED", "reference": reference, "seq": seq, "atol": atol,
            "max_abs": m["max_abs"], "top1": m["top1"], "kl_max": m["kl_max"]}


def _int8_gate(paths: dict, feeds: dict, threads: int, seq: int, trained: bool) -> dict:
    """The int8 graph against the fp32 BSBR graph (both ORT) on the gate's input: mean KL <= MAX_KL,
    and top-1 >= MIN_TOP1 for a trained model (one that ships held-out text, like the bundled one).
    A random-weights model's next-token logits are near ties, which int8's small shifts reorder
    without moving the distribution: there top-1 is reported, not gated."""
    from ..check import compare_logits
    from ..quantize import MAX_KL, MIN_TOP1
    from ..runtime import ORTRunner

    outs = []
    for key in ("bsbr-ort", "int8-ort"):
        with ORTRunner(paths[key], threads=threads, providers=["CPUExecutionProvider"]) as r:
            outs.append(r.infer(feeds)["logits"])
    m = compare_logits(*outs)
    ok = m["kl_mean"] <= MAX_KL and (m["top1"] >= MIN_TOP1 or not trained)
    gate = f"mean KL <= {MAX_KL:g} nats" + (f", top-1 >= {MIN_TOP1:.0%}" if trained
                                            else "; top-1 not gated: random weights")
    return {"status": "pass" if ok else "FAILED", "reference": "BSBR ORT fp32 graph", "seq": seq, "top1": m["top1"],
            "max_abs": m["max_abs"], "atol": None, "gate": gate, "kl_mean": m["kl_mean"], "kl_max": m["kl_max"],
            "min_top1": MIN_TOP1 if trained else None, "max_kl": MAX_KL,
            "reason": f"int8 gate against the BSBR fp32 graph at T={seq}: top-1 {m['top1']:.1%}, "
                      f"mean KL {m['kl_mean']:.1e} nats ({gate})"}


def _tensorrt_reason() -> str | None:
    """Why TensorRT cannot be benchmarked here (None when it can)."""
    from ..trt import TensorRTNotInstalled, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTNotInstalled as e:
        return str(e).splitlines()[0]
    import torch

    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is visible"
    return None


def _tensorrt_engine(paths: dict, work: Path, spec: BenchSpec, feeds, ref, atol, top1, seq) -> dict:
    """Build the BSBR engine and check it against BSBR torch; a parity verdict, or why it is skipped."""
    reason = _tensorrt_reason()
    if reason is None:
        try:
            from ..trt import TensorRTRunner, engine_from_onnx

            engine = work / "bsbr.engine"
            engine_from_onnx(paths["bsbr-trt"], engine, min_seq=1, opt_seq=min(1024, spec.max_len),
                             max_seq=spec.ext_positions, max_batch=max(1, spec.throughput[0] if spec.throughput
                                                                       else 1))
            paths["tensorrt"] = str(engine)
            with TensorRTRunner(engine) as r:
                out = r.infer(feeds)["logits"]
            return _parity(ref, out, atol, top1, "BSBR torch (vectorised)", seq)
        except Exception as e:  # an engine that cannot be built is reported, not fatal
            reason = f"TensorRT engine not built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {"status": "skipped", "reference": None, "seq": None, "reason": reason}


def prepare(job: dict) -> dict:
    """Build every model and graph under ``work`` and run the parity gate; returns paths and verdicts."""
    import torch
    from transformers import GPT2LMHeadModel

    from ..check import MIN_TOP1, TOLERANCES, make_inputs
    from ..convert import convert, load_hf_checkpoint, save_bsbr
    from ..export import ExportSpec, export_onnx
    from ..runtime import ORTRunner

    spec = BenchSpec.from_dict(job["spec"])
    work = Path(job["work"])
    set_torch_threads(job["threads"])
    t0 = time.perf_counter()
    if spec.model in RANDOM_MODELS:
        hf_dir = work / "hf"
        _make_random_hf(spec.model, hf_dir, spec.seed)
    else:
        hf_dir = Path(spec.model)
    _, hf_cfg, _ = load_hf_checkpoint(hf_dir)
    ext_dir = work / "hf-ext"
    n_ext = _extend_positions(hf_dir, ext_dir, spec.ext_positions)
    bsbr = convert(hf_dir, chunk_size=spec.chunk_size, retrieval_scale=spec.retrieval_scale)
    save_bsbr(bsbr, work / "bsbr", force=True)
    E = ExportSpec
    exports = {"bsbr-ort": (bsbr, E(max_seq_len=spec.ext_positions, attention="bsbr", state_outputs=False)),
               "floor-ort": (bsbr, E(max_seq_len=spec.ext_positions, attention="none", state_outputs=False))}
    if _tensorrt_reason() is None:  # TensorRT parses the graph without the short-prompt If
        exports["bsbr-trt"] = (bsbr, E(max_seq_len=spec.ext_positions, state_outputs=False, short_prompts=False))
    paths = {"hf": str(hf_dir), "hf_ext": str(ext_dir), "bsbr": str(work / "bsbr")}
    for name, (m, es) in exports.items():
        export_onnx(m, work / name, es, decode=False)
        paths[name] = str(work / name / "model.onnx")
    # int8 dense weights beside the fp32 BSBR graph (its fp32 tensors read from that export's weights file).
    export_onnx(bsbr, work / "bsbr-ort", E(max_seq_len=spec.ext_positions, attention="bsbr", state_outputs=False,
                                          int8=True), decode=False)
    paths["int8-ort"] = str(work / "bsbr-ort" / "model_int8.onnx")
    from .hf_export import export_hf_onnx  # the HF model by torch.onnx (dynamo), extended positions

    paths["hf-ort"] = str(export_hf_onnx(ext_dir, work / "hf-ort"))
    if spec.decode_contexts:
        export_onnx(bsbr, work / "bsbr-step", E(max_seq_len=spec.ext_positions, attention="bsbr"), decode=True)
        paths["bsbr-step"] = str(work / "bsbr-step")
        from ..kvcache import export_kvcache  # GPT-2 with a KV cache (Optimum's layout), extended positions

        paths["kv-ort"] = str(export_kvcache(ext_dir, work / "kv-ort"))
    export_s = time.perf_counter() - t0

    # The parity gate, at a short length that crosses two chunk boundaries.
    c = bsbr.cfg
    seq = min(2 * c.chunk_size + 3, spec.max_len)
    text = np.load(hf_dir / "heldout_ids.npy").astype(np.int64) if (hf_dir / "heldout_ids.npy").is_file() else None
    ids = make_inputs("heldout" if text is not None else "random", 1, seq, c.vocab_size, text, spec.seed)
    atol, top1 = TOLERANCES["fp32"], MIN_TOP1["fp32"]
    tid = torch.from_numpy(ids)
    parity = {}
    with torch.no_grad():
        bsbr_vec = bsbr(tid).numpy()
        parity["bsbr-torch"] = _parity(bsbr(tid, impl="reference").numpy(), bsbr_vec, atol, top1,
                                       "BSBR reference (loop) implementation, torch fp32", seq)
        hf_sdpa = GPT2LMHeadModel.from_pretrained(ext_dir, attn_implementation="sdpa").eval()
        hf_eager = GPT2LMHeadModel.from_pretrained(ext_dir, attn_implementation="eager").eval()
        hf_logits = hf_sdpa(tid, use_cache=False).logits.numpy()
        parity["hf-torch"] = _parity(hf_eager(tid, use_cache=False).logits.numpy(), hf_logits, atol, top1,
                                     "HF GPT-2 eager attention, torch fp32", seq)
    feeds = {"input_ids": ids}
    with ORTRunner(paths["bsbr-ort"], threads=job["threads"], providers=["CPUExecutionProvider"]) as r:
        parity["bsbr-ort"] = _parity(bsbr_vec, r.infer(feeds)["logits"], atol, top1, "BSBR torch (vectorised)", seq)
    with ORTRunner(paths["hf-ort"], threads=job["threads"], providers=["CPUExecutionProvider"]) as r:
        parity["hf-ort"] = _parity(hf_logits, r.infer(feeds)["logits"], atol, top1, "HF GPT-2 torch SDPA", seq)
    if "kv-ort" in paths:  # decode as a caller does: a prompt on an empty cache, then one token per step
        from ..kvcache import KVCacheDecoder, kv_logits

        kv = kv_logits(KVCacheDecoder(paths["kv-ort"], threads=job["threads"]), ids, prompt=seq // 2)
        parity["kv-ort"] = _parity(hf_logits, kv, atol, top1, f"HF GPT-2 torch SDPA (prompt of {seq // 2} "
                                   f"tokens, then one token per step)", seq)
    parity["int8-ort"] = _int8_gate(paths, feeds, job["threads"], seq, trained=text is not None)
    parity["floor-ort"] = {"status": "none", "reference": None, "seq": None,
                           "reason": "no parity: not a model (attention removed), a cost floor only"}
    parity["tensorrt"] = _tensorrt_engine(paths, work, spec, feeds, bsbr_vec, atol, top1, seq)
    n_params = sum(p.numel() for n, p in hf_sdpa.named_parameters())
    model_info = {"name": spec.model, "hf_dir": str(hf_dir), "n_layer": c.n_layer, "n_head": c.n_head,
                  "n_embd": c.n_embd, "vocab_size": c.vocab_size, "chunk_size": c.chunk_size,
                  "n_positions": hf_cfg.get("n_positions", 1024), "n_positions_extended": n_ext,
                  "position_policy": c.position_policy, "params_hf": int(n_params),
                  "retrieval": getattr(c, "retrieval", "plain"), "retrieval_scale": c.retrieval_scale,
                  "params_hf_without_extended_positions": int(n_params - (n_ext - hf_cfg.get("n_positions", 1024))
                                                            * c.n_embd)}
    return {"status": "ok", "paths": paths, "parity": parity, "model": model_info,
            "prepare_s": round(time.perf_counter() - t0, 1), "export_s": round(export_s, 1)}
