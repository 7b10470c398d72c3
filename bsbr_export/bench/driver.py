"""``run_bench``: prepare (parity gate), then prefill, decode, ORT optimisation levels and profiles, each
in child processes; then the analysis and the outputs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..util import machine_info
from .analysis import analyse
from .jobs import run_child
from .decode import run_decode
from .prefill import run_opt_levels, run_prefill
from .profile import run_paired, run_profiles
from .runtime_memory import run_runtime_memory
from .report import write_json, write_outputs
from .spec import BACKENDS, KINDS, LABELS, SCHEMA, BenchSpec


def bench_versions() -> dict:
    from ..pipeline import versions

    v = versions()
    for mod in ("transformers", "numpy", "matplotlib"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


def _prepare(spec: BenchSpec, work: Path, threads: int, log) -> dict:
    """The ``prepare`` child: models, exports and the parity gate, logged per backend."""
    log(f"preparing {spec.model} (models, ONNX exports, parity gate) in {work}")
    prep = run_child({"kind": "prepare", "work": str(work), "threads": threads, "spec": asdict(spec)},
                     work, spec.case_timeout_s)
    if prep.get("status") != "ok":
        from ..errors import BSBRExportError

        raise BSBRExportError(f"benchmark preparation failed: {prep['reason']}")
    for b in BACKENDS:
        p = prep["parity"][b]
        extra = (f"max|diff| {p['max_abs']:.2e} vs {p['reference']} (T={p['seq']})" if "max_abs" in p
                 else p.get("reason", ""))
        log(f"  parity {b:10s} {p['status']:7s} {extra}")
    return prep


def run_bench(spec: BenchSpec, out_dir, fragment=None, command: str = "bsbr-export bench", work_dir=None,
              log=print) -> dict:
    """The whole benchmark; writes bench.json, bench.md and plots into ``out_dir`` (+ the fragment)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = spec.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bsbr-bench-")) if own_work else Path(work_dir)
    try:
        prep = _prepare(spec, work, threads, log)
        result = {"schema": SCHEMA, "command": command, "quick": spec.quick,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
                  "versions": bench_versions(), "spec": asdict(spec), "threads": threads,
                  "model": prep["model"], "prepare_s": prep["prepare_s"],
                  "backends": {b: {"label": LABELS[b], "kind": KINDS[b], "parity": prep["parity"][b]}
                               for b in BACKENDS}}
        log("prefill")
        result["prefill"] = run_prefill(spec, work, prep, threads, log)
        write_json(result | {"complete": False}, out / "bench.json")
        log("decode")
        result["decode"] = run_decode(spec, work, prep, threads, log) if spec.decode_contexts else []
        log("runtime memory (engine with shared weights vs one prefill session)")
        result["runtime_memory"] = run_runtime_memory(spec, work, prep, threads, log)
        log("ORT optimisation levels")
        result["opt_levels"] = run_opt_levels(spec, work, prep, threads, log)
        log("ORT profiles")
        result["profiles"] = run_profiles(spec, work, prep, threads, log)
        log("short prompts in pairs (BSBR ORT and the HF export alternating in one process)")
        result["paired"] = run_paired(spec, work, prep, threads, log)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    analyse(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["complete"] = True
    write_outputs(result, out, fragment)
    return result
