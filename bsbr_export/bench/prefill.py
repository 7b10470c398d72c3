"""Prefill: time each backend's runner on (batch, T) cases, with the case's peak memory.

Every (backend, batch, T) case runs in its own child process, so its peak memory is that
process's RSS high-water mark (reset after setup, so it covers inference only) and no case
inherits another's heap; ``--quick`` shares one child per backend (still resetting the mark).
"""

from __future__ import annotations

import gc
import time

import numpy as np

from ..util import peak_rss_bytes, reset_peak_rss, rss_bytes, time_calls
from .jobs import make_job, run_child, set_torch_threads
from .spec import BACKENDS, KINDS, MIB, BenchSpec, prefill_plan, schedule


def runner_for(backend: str, paths: dict, threads: int, optimization: str = "all"):
    """The backend's runner (``infer({"input_ids": ids}) -> {"logits": ...}``), weights loaded, not entered."""
    if KINDS[backend] == "torch":
        set_torch_threads(threads)
        if backend == "hf-torch":
            from ..runtime import HFRunner

            return HFRunner(paths["hf_ext"], attn_implementation="sdpa")
        from ..convert import load_bsbr
        from ..runtime import TorchRunner

        return TorchRunner(load_bsbr(paths["bsbr"]))
    if backend == "tensorrt":  # GPU: infer() copies the logits back, so its time includes the sync
        from ..trt import TensorRTRunner

        return TensorRTRunner(paths["tensorrt"])
    from ..runtime import ORTRunner

    return ORTRunner(paths[backend], threads=threads, providers=["CPUExecutionProvider"], optimization=optimization)


def prefill_cases(job: dict) -> dict:
    """Child: time one backend on the job's cases (one case per process unless ``--quick``)."""
    t0 = time.perf_counter()
    with runner_for(job["backend"], job["paths"], job["threads"], job.get("optimization", "all")) as runner:
        setup_s = time.perf_counter() - t0
        rng = np.random.default_rng(job["seed"])
        results = []
        for case in job["cases"]:
            ids = rng.integers(0, job["vocab_size"], size=(case["batch"], case["seq"]), dtype=np.int64)
            feeds, short = {"input_ids": ids}, {"input_ids": ids[:, :case["warmup_seq"]]}
            gc.collect()
            setup_rss, setup_peak = rss_bytes(), peak_rss_bytes()
            was_reset = reset_peak_rss()
            stats = time_calls(lambda: runner.infer(feeds), case["warmup"], case["runs"],
                               warm_fn=lambda: runner.infer(short))
            peak = peak_rss_bytes()
            tokens = case["batch"] * case["seq"]
            results.append(case | stats | {
                "status": "ok", "tokens": tokens, "tokens_per_s": tokens / (stats["median_ms"] / 1e3),
                "peak_rss_bytes": peak, "setup_rss_bytes": setup_rss, "setup_peak_rss_bytes": setup_peak,
                "peak_covers_inference_only": was_reset})
    return {"status": "ok", "setup_s": round(setup_s, 2), "cases": results}


def case_record(backend: str, batch: int, seq: int, **kw) -> dict:
    return {"backend": backend, "batch": batch, "seq": seq, "tokens": batch * seq, **kw}


def collect(res: dict, todo: list[dict], log) -> list[dict]:
    """The cases of a child's result (or ``todo`` marked failed with its reason), logged."""
    if res.get("status") != "ok":
        out = [c | {"status": "failed", "reason": res["reason"]} for c in todo]
    else:
        out = [c | {"child_wall_s": res["child_wall_s"]} for c in res["cases"]]
    for c in out:
        if c["status"] == "ok":
            log(f"  {c['backend']:10s} batch {c['batch']} T {c['seq']:5d}  median {c['median_ms']:10.1f} ms  "
                f"peak RSS {c['peak_rss_bytes'] / MIB:8.0f} MiB  ({c['runs']} runs)")
        else:
            log(f"  {c['backend']:10s} batch {c['batch']} T {c['seq']:5d}  {c['status']}: {c['reason']}")
    return out


def _untimed(spec: BenchSpec, prep: dict, backend: str) -> list[dict]:
    """The cases of a backend the parity gate stopped (or skipped), with the reason."""
    p = prep["parity"][backend]
    status = "parity_failed" if p["status"] == "FAILED" else "skipped"
    reason = p.get("reason") or (  # a gate of its own (int8) gives its reason
        f"parity FAILED against {p['reference']}: max|diff| {p['max_abs']:.2e} > {p['atol']:.0e} "
        f"or top-1 {p['top1']:.1%}" if status == "parity_failed" else p["reason"])
    return [case_record(backend, bt, T, status=status, reason=reason) for bt, T in prefill_plan(spec)]


def run_prefill(spec: BenchSpec, work, prep: dict, threads: int, log) -> list[dict]:
    """Parent: every prefill case of every backend that passed the parity gate."""
    timed = [b for b in BACKENDS if prep["parity"][b]["status"] in ("pass", "none")]
    cases = [c for b in BACKENDS if b not in timed for c in _untimed(spec, prep, b)]
    if spec.quick:  # one child per backend, the high-water mark reset before each case
        for b in timed:
            todo = [case_record(b, bt, T, **schedule(bt, T, spec)) for bt, T in prefill_plan(spec)]
            res = run_child(make_job("prefill", spec, work, prep, threads, backend=b, cases=todo), work,
                            spec.case_timeout_s)
            cases += collect(res, todo, log)
        return cases
    dead = {}
    for bt, T in prefill_plan(spec):
        for b in timed:
            case = case_record(b, bt, T, **schedule(bt, T, spec))
            if b in dead and bt * T >= dead[b]:
                cases.append(case | {"status": "skipped", "reason": f"failed at {dead[b]} tokens"})
                log(f"  {b:10s} batch {bt} T {T:5d}  skipped ({cases[-1]['reason']})")
                continue
            res = run_child(make_job("prefill", spec, work, prep, threads, backend=b, cases=[case]), work,
                            spec.case_timeout_s)
            got = collect(res, [case], log)
            if got[0]["status"] != "ok":
                dead[b] = bt * T
            cases += got
    return cases


def run_opt_levels(spec: BenchSpec, work, prep: dict, threads: int, log) -> list[dict]:
    """bsbr-ort under ORT's graph optimisation levels at one length (``all`` is the main table's)."""
    T = spec.opt_levels_len
    if T is None or prep["parity"]["bsbr-ort"]["status"] != "pass":
        return []
    T = min(T, spec.max_len)  # a run of short lengths exports no longer graph
    out = []
    for level in ("basic", "extended"):
        case = case_record("bsbr-ort", 1, T, optimization=level, **schedule(1, T, spec))
        res = run_child(make_job("prefill", spec, work, prep, threads, backend="bsbr-ort", cases=[case],
                                 optimization=level), work, spec.case_timeout_s)
        out += collect(res, [case], log)
    return out
