"""Resident memory of a loaded runtime (``runtime.engine``: extend, decode and close sessions over
one shared copy of the weights) against one prefill session of the same export, each in its own
child process after the same short prompt and a few decode steps."""

from __future__ import annotations

import numpy as np

from ..util import rss_bytes
from .jobs import make_job, run_child
from .spec import BenchSpec

PROMPT, STEPS = 32, 4


def runtime_memory_case(job: dict) -> dict:
    """Child: RSS added by loading and running ``job["what"]`` ("runtime" or "prefill-session")."""
    import onnxruntime  # noqa: F401  (imported before the baseline so only the model is counted)

    from ..runtime.engine import Engine
    from ..runtime.runners import session_from_onnx

    before = rss_bytes()
    export = job["paths"]["bsbr-step"]
    ids = np.arange(PROMPT, dtype=np.int64) % job["vocab_size"]
    if job["what"] == "runtime":
        eng = Engine(export, threads=job["threads"], providers=["CPUExecutionProvider"])
        st = eng.new_state(1)
        logits = eng.prefill(st, [0], [ids])
        for _ in range(STEPS):
            logits = eng.decode(st, logits.argmax(-1))
    else:
        sess = session_from_onnx(f"{export}/model.onnx", job["threads"], ["CPUExecutionProvider"])
        sess.run(["logits"], {"input_ids": ids[None]})
    return {"status": "ok", "what": job["what"], "rss_bytes": rss_bytes() - before}


def run_runtime_memory(spec: BenchSpec, work, prep: dict, threads: int, log) -> dict:
    """Parent: both cases; the ratio runtime / one prefill session."""
    out = {}
    for what in ("runtime", "prefill-session"):
        res = run_child(make_job("runtime_memory", spec, work, prep, threads, what=what), work, spec.case_timeout_s)
        out[what] = res.get("rss_bytes") if res.get("status") == "ok" else None
        log(f"  {what:16s} " + (f"{out[what] / 2**20:8.1f} MiB" if out[what] else res.get("reason", "failed")))
    out["ratio"] = (out["runtime"] / out["prefill-session"]
                    if out["runtime"] and out["prefill-session"] else None)
    return out
