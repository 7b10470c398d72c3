"""Decode: per-token latency of a state that already holds ``context`` tokens, and the state's bytes.

The state's layout and sizes come from ``ops.state`` (the same arrays feed torch and ONNX
Runtime); the KV cache it is compared with is sized by ``ops.state.kv_cache_bytes``. Each
backend's state is allocated at the context's shape and filled with random values (the cost of a step does not depend on the values), which reaches long
contexts without a long prefill; one full chunk of steps is timed, so the amortised mean
includes one chunk-closing step.

Baselines: HF GPT-2 with its KV cache in torch (``hf-torch``), and GPT-2 with a KV cache in ONNX
Runtime (``kv-ort``: Optimum's decoder-with-past graph, ``bsbr_export.kvcache``) run as a
production caller runs it: IOBinding, each step's present outputs kept as ORT values and bound
as the next step's past, the logits the only host copy.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import numpy as np

from ..ops import state
from ..ops.state import StateSpec, kv_cache_bytes
from ..util import summarize
from .jobs import make_job, run_child, set_torch_threads
from .spec import BACKENDS, DECODE_BACKENDS, DECODE_WARMUP, KINDS, MIB, BenchSpec


def random_state(cfg, context: int, capacity: int, rng) -> dict:
    """The carried decode state (``ops.state``: names, batch-first shapes, batch 1) of a state
    holding ``context`` tokens: random values in the slots it uses, banks at ``capacity`` chunks."""
    spec = StateSpec.from_config(cfg)
    closed, cur = context // spec.chunk, context % spec.chunk
    st = spec.zeros(1, capacity)
    rnd = lambda a: rng.standard_normal(a.shape, dtype=np.float32)  # noqa: E731
    for n, used in ((state.K, cur), (state.V, cur), (state.BANK_H, closed), (state.BANK_F, closed)):
        st[n][:, :, :, :used] = rnd(st[n][:, :, :, :used])  # (1, layer, H, L or cap, ...)
    st[state.S][:] = rnd(st[state.S])  # (1, layer, H, d', dc)
    st[state.BANK_F] *= math.sqrt(spec.chunk)
    if spec.normalised:  # normalisers (the last column) are positive sums
        for n in (state.S, state.BANK_F):
            st[n][..., -1] = np.abs(st[n][..., -1])
    return st


def state_parts(cfg, context: int) -> dict:
    """Bytes of each carried BSBR state tensor (``ops.state``) holding ``context`` tokens (batch 1;
    the bank at the chunks it keeps, ``StateSpec.banked``)."""
    spec = StateSpec.from_config(cfg)
    return {n: int(np.prod(spec.shape(n, 1, spec.banked(context)))) * 4 for n in state.CARRIED}


def _decode_steps(step, first_token: int, warmup: int, steps: int) -> dict:
    """Per-step wall times (ms) of ``step(token) -> logits``, feeding back the argmax."""
    tok, times = first_token, []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = step(tok)
        dt = (time.perf_counter() - t0) * 1e3
        tok = int(np.asarray(logits).reshape(-1, logits.shape[-1])[0].argmax())
        if i >= warmup:
            times.append(dt)
    s = summarize(times)
    return {"per_token_median_ms": s["median_ms"], "per_token_mean_ms": s["mean_ms"],
            "per_token_max_ms": max(times), "steps": steps, "warmup_steps": warmup}


def _load_decoder_model(backend: str, paths: dict, threads: int):
    if backend == "kv-ort":
        from ..kvcache import KVCacheDecoder

        return KVCacheDecoder(paths["kv-ort"], threads=threads, providers=["CPUExecutionProvider"])
    if backend == "hf-torch":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(paths["hf_ext"], attn_implementation="sdpa").eval()
    from ..config import BSBRConfig
    from ..convert import load_bsbr

    if backend == "bsbr-torch":
        return load_bsbr(paths["bsbr"])
    return BSBRConfig.from_dict(json.loads((Path(paths["bsbr"]) / "config.json").read_text()))


def _decoder(backend: str, model, paths: dict, context: int, max_len: int, threads: int, rng):
    """(step(token) -> logits, state bytes) for a state that already holds ``context`` tokens."""
    if backend == "hf-torch":
        import torch
        from transformers import DynamicCache

        c = model.config
        d = c.n_embd // c.n_head
        cache = DynamicCache(config=c)
        for i in range(c.n_layer):
            k, v = (torch.from_numpy(rng.standard_normal((1, c.n_head, context, d), dtype=np.float32))
                    for _ in range(2))  # (B, H, context, d)
            cache.update(k, v, i)

        def step(tok):
            with torch.inference_mode():
                return model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits[:, -1]

        return step, kv_cache_bytes(c.n_layer, c.n_embd, context)
    if backend == "kv-ort":
        m = model
        m.fill([tuple(rng.standard_normal((1, m.n_head, context, m.head_dim), dtype=np.float32) for _ in range(2))
                for _ in range(m.n_layer)])  # (B, H, context, d) per layer
        return (lambda tok: m.step([[tok]])[:, -1]), kv_cache_bytes(m.n_layer, m.n_head * m.head_dim, context)
    if backend == "bsbr-torch":
        import torch

        st = model.new_state(1, max_len)
        arrays = random_state(model.cfg, context, st.capacity, rng)
        for t, n in zip(st.tensors(), state.CARRIED):
            t.copy_(torch.from_numpy(arrays[n]))
        st.pos = context
        return (lambda tok: model.decode_step(torch.tensor([tok]), st)), StateSpec.from_config(model.cfg).bytes_at(context)
    from ..runtime.engine import Engine

    eng = Engine(paths["bsbr-step"], threads=threads, max_len=max_len)
    st = eng.new_state(1)
    st.set_rows(slice(None), random_state(model, context, eng.capacity, rng), context)
    return (lambda tok: eng.decode(st, np.array([tok], dtype=np.int64))), StateSpec.from_config(model).bytes_at(context)


def decode_cases(job: dict) -> dict:
    """Child: per-token decode latency of one backend at every context of the job."""
    backend = job["backend"]
    if KINDS.get(backend) == "torch":
        set_torch_threads(job["threads"])
    model = _load_decoder_model(backend, job["paths"], job["threads"])
    rng = np.random.default_rng(job["seed"])
    out = []
    for context in job["contexts"]:
        t0 = time.perf_counter()
        max_len = context + job["warmup"] + job["steps"]
        step, nbytes = _decoder(backend, model, job["paths"], context, max_len, job["threads"], rng)
        setup_s = time.perf_counter() - t0
        r = _decode_steps(step, first_token=1, warmup=job["warmup"], steps=job["steps"])
        parts = {"state_parts": state_parts(getattr(model, "cfg", model), context)} if backend.startswith("bsbr") else {}
        out.append({"backend": backend, "context": context, "status": "ok", "state_bytes": nbytes,
                    "setup_s": round(setup_s, 2)} | parts | r)
        del step
        gc.collect()
    if backend == "kv-ort":  # the per-token dense work: one token on an empty cache, every step
        step = lambda tok: (model.start(1), model.step([[tok]])[:, -1])[1]  # noqa: E731
        dense = _decode_steps(step, first_token=1, warmup=job["warmup"], steps=job["steps"])
        out = [c | {"dense_per_token_ms": dense["per_token_mean_ms"]} for c in out]
    return {"status": "ok", "cases": out}


def run_decode(spec: BenchSpec, work, prep: dict, threads: int, log) -> list[dict]:
    """Parent: one child per decode backend, every context of the spec. A decode-only backend
    (not in the prefill table) logs its parity gate here and carries it in each of its rows."""
    out = []
    for b in DECODE_BACKENDS:
        p = prep["parity"].get(b, {"status": "FAILED", "reference": None, "reason": "no parity check ran"})
        gate = {} if b in BACKENDS else {"parity": p}
        if gate:
            log(f"  parity {b:10s} {p['status']:7s} " + (f"max|diff| {p['max_abs']:.2e} vs {p['reference']} "
                                                         f"(T={p['seq']})" if "max_abs" in p else p["reason"]))
        if p["status"] != "pass":
            out += [{"backend": b, "context": c, "status": "parity_failed", "reason": "parity FAILED"} | gate
                    for c in spec.decode_contexts]
            continue
        job = make_job("decode", spec, work, prep, threads, backend=b, contexts=list(spec.decode_contexts),
                       steps=spec.decode_steps, warmup=DECODE_WARMUP)
        res = run_child(job, work, spec.case_timeout_s)
        if res.get("status") != "ok":
            out += [{"backend": b, "context": c, "status": "failed", "reason": res["reason"]} | gate
                    for c in spec.decode_contexts]
        else:
            out += [c | gate for c in res["cases"]]
        for c in out[-len(spec.decode_contexts):]:
            msg = (f"per token {c['per_token_mean_ms']:7.2f} ms (median {c['per_token_median_ms']:.2f})  "
                   f"state {c['state_bytes'] / MIB:7.1f} MiB" if c["status"] == "ok" else c["reason"])
            log(f"  decode {b:10s} context {c['context']:5d}  {msg}")
    return out
