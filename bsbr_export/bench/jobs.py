"""The job plumbing every case shares: a job's fields, running it in a fresh process
(``python -m bsbr_export.bench JOB RESULT``, whose dispatcher is ``child.py``), and torch's threads.
It imports no case, so each case imports it without a loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_job(kind: str, spec, work: Path, prep: dict, threads: int, **kw) -> dict:
    """A timing job: the prepared paths, threads, seed and vocabulary, plus the kind's own fields."""
    return {"kind": kind, "work": str(work), "paths": prep["paths"], "threads": threads, "seed": spec.seed,
            "vocab_size": prep["model"]["vocab_size"], **kw}


def run_child(job: dict, work: Path, timeout_s: int) -> dict:
    """Run ``job`` in a fresh Python process; a crash or timeout becomes {"status": "failed"}."""
    work.mkdir(parents=True, exist_ok=True)
    fd, job_path = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work)
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    res_path = job_path[:-5] + ".result.json"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bsbr_export.bench", job_path, res_path],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"child process timed out after {timeout_s}s"}
    wall = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0 or not Path(res_path).is_file():
        rc = proc.returncode
        if rc in (-9, 137):
            why = "child process killed by SIGKILL (out of memory?)"
        else:
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            why = f"child process exited with code {rc}: {tail[0][:300]}"
        return {"status": "failed", "reason": why, "child_wall_s": wall}
    out = json.loads(Path(res_path).read_text())
    for p in (job_path, res_path):
        Path(p).unlink(missing_ok=True)
    return out | {"child_wall_s": wall}


def in_fresh_process(fn, *args, **kw):
    """``fn(*args, **kw)`` in a fresh Python process (spawned: nothing of this one's sessions or
    memory), its result returned: for measurements where what a process made first matters.
    ``fn`` must be importable by name (a module-level function)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kw).result()


def in_both_orders(fn, *args, **kw) -> list:
    """[``fn(..., reverse=False)``, ``fn(..., reverse=True)``], each in a fresh process
    (``in_fresh_process``): ``fn`` makes the sessions it compares in one order, or with
    ``reverse`` in the other. A session made first in a process can run ~10% slower than one made
    after it (GPT-2 small, one row: the same export made twice and stepped in turn, 0.88x for the
    second), so a comparison pools the two runs."""
    return [in_fresh_process(fn, *args, **kw, reverse=reverse) for reverse in (False, True)]


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
