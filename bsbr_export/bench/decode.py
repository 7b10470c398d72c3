"""Decode: per-token latency of a state that already holds ``context`` tokens, and the state's bytes.

Every piece of decode-state handling lives here: the state sizes (``kv_cache_bytes``,
``bsbr_state_bytes``), the random state (``random_state``) and its conversion into the torch
and ONNX Runtime states. Each backend's state is allocated at the context's shape and filled
with random values (the cost of a step does not depend on the values), which reaches long
contexts without a long prefill; one full chunk of steps is timed, so the amortised mean
includes one chunk-closing step.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import numpy as np

from ..util import summarize
from .child import make_job, run_child, set_torch_threads
from .spec import DECODE_BACKENDS, DECODE_WARMUP, KINDS, MIB, BenchSpec


def kv_cache_bytes(n_layer: int, batch: int, n_head: int, context: int, head_dim: int, itemsize: int = 4) -> int:
    """HF GPT-2 KV cache holding ``context`` tokens: K and V, (n_layer, B, H, context, d)."""
    return 2 * n_layer * batch * n_head * context * head_dim * itemsize


def bsbr_state_bytes(cfg, batch: int, context: int, itemsize: int = 4) -> int:
    """BSBR decode state holding ``context`` tokens (``ops.state``): open chunk k, v (L rows), S,
    and the bank (h, F) of the ``context // L`` closed chunks."""
    from ..ops.state import StateSpec

    return StateSpec.from_config(cfg).bytes_at(context, batch, itemsize)


def random_state(cfg, context: int, capacity: int, rng) -> dict:
    """The five decode-state arrays (``export.STATE_NAMES`` order, the ORT graphs' layer-first shapes,
    batch 1) of a state holding ``context`` tokens: random values in the slots it uses, banks at
    ``capacity`` chunks."""
    from ..ops.state import StateSpec

    L, d, dp, H, nl = cfg.chunk_size, cfg.head_dim, cfg.state_dim, cfg.n_head, cfg.n_layer
    dc = StateSpec.from_config(cfg).state_cols  # d, plus the normaliser column of the normalised retrieval
    closed, cur = context // L, context % L
    z = lambda *s: np.zeros((nl, 1, H, *s), np.float32)  # noqa: E731
    st = {"state_k": z(L, d), "state_v": z(L, d), "state_S": z(dp, dc), "state_bank_h": z(capacity, d),
          "state_bank_F": z(capacity, dp, dc)}
    rnd = lambda a: rng.standard_normal(a.shape, dtype=np.float32)  # noqa: E731
    st["state_k"][:, :, :, :cur] = rnd(st["state_k"][:, :, :, :cur])  # (nl, 1, H, L, d)
    st["state_v"][:, :, :, :cur] = rnd(st["state_v"][:, :, :, :cur])
    st["state_S"][:] = rnd(st["state_S"])  # (nl, 1, H, d', d)
    st["state_bank_h"][:, :, :, :closed] = rnd(st["state_bank_h"][:, :, :, :closed])  # (nl, 1, H, cap, d)
    st["state_bank_F"][:, :, :, :closed] = rnd(st["state_bank_F"][:, :, :, :closed]) * math.sqrt(L)
    for n in ("state_S", "state_bank_F"):  # normalisers (the extra column) are positive sums
        st[n][..., d:] = np.abs(st[n][..., d:])
    return st


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


def _load_decoder_model(backend: str, paths: dict):
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

        return step, kv_cache_bytes(c.n_layer, 1, c.n_head, context, d)
    if backend == "bsbr-torch":
        import torch

        from ..ops.state import CARRIED

        st = model.new_state(1, max_len)
        arrays = random_state(model.cfg, context, st.capacity, rng)  # layer first, as the ORT graphs take it
        for t, n in zip(st.tensors(), CARRIED):  # torch keeps the state batch first (ops.state)
            t.copy_(torch.from_numpy(arrays[n]).transpose(0, 1))
        st.pos = context
        return (lambda tok: model.decode_step(torch.tensor([tok]), st)), bsbr_state_bytes(model.cfg, 1, context)
    from ..runtime import ORTStepper

    stepper = ORTStepper(paths["bsbr-step"], max_len=max_len, threads=threads)
    stepper.state, stepper.pos = random_state(model, context, stepper.capacity, rng), context
    return (lambda tok: stepper.decode(np.array([tok], dtype=np.int64))), bsbr_state_bytes(model, 1, context)


def decode_cases(job: dict) -> dict:
    """Child: per-token decode latency of one backend at every context of the job."""
    backend = job["backend"]
    if KINDS[backend] == "torch":
        set_torch_threads(job["threads"])
    model = _load_decoder_model(backend, job["paths"])
    rng = np.random.default_rng(job["seed"])
    out = []
    for context in job["contexts"]:
        t0 = time.perf_counter()
        max_len = context + job["warmup"] + job["steps"]
        step, nbytes = _decoder(backend, model, job["paths"], context, max_len, job["threads"], rng)
        setup_s = time.perf_counter() - t0
        r = _decode_steps(step, first_token=1, warmup=job["warmup"], steps=job["steps"])
        out.append({"backend": backend, "context": context, "status": "ok", "state_bytes": nbytes,
                    "setup_s": round(setup_s, 2)} | r)
        del step
        gc.collect()
    return {"status": "ok", "cases": out}


def run_decode(spec: BenchSpec, work, prep: dict, threads: int, log) -> list[dict]:
    """Parent: one child per decode backend, every context of the spec."""
    out = []
    for b in DECODE_BACKENDS:
        p = prep["parity"][b]
        if p["status"] != "pass":
            out += [{"backend": b, "context": c, "status": "parity_failed", "reason": "prefill parity FAILED"}
                    for c in spec.decode_contexts]
            continue
        job = make_job("decode", spec, work, prep, threads, backend=b, contexts=list(spec.decode_contexts),
                       steps=spec.decode_steps, warmup=DECODE_WARMUP)
        res = run_child(job, work, spec.case_timeout_s)
        if res.get("status") != "ok":
            out += [{"backend": b, "context": c, "status": "failed", "reason": res["reason"]}
                    for c in spec.decode_contexts]
        else:
            out += res["cases"]
        for c in out[-len(spec.decode_contexts):]:
            msg = (f"per token {c['per_token_mean_ms']:7.2f} ms (median {c['per_token_median_ms']:.2f})  "
                   f"state {c['state_bytes'] / MIB:7.1f} MiB" if c["status"] == "ok" else c["reason"])
            log(f"  decode {b:10s} context {c['context']:5d}  {msg}")
    return out
