"""The child-process protocol: the parent writes a job (JSON, ``jobs.make_job``) and runs it with
``jobs.run_child``; ``python -m bsbr_export.bench JOB RESULT`` runs it here in a fresh process and writes
the result (JSON). Each job kind has one handler: this dispatcher is the one module that imports the cases."""

from __future__ import annotations

import json
from pathlib import Path

from ..util import atomic_write_text
from . import decode, prefill, prepare, profile, runtime_memory

HANDLERS = {"prepare": prepare.prepare, "prefill": prefill.prefill_cases, "decode": decode.decode_cases,
            "profile": profile.profile_case, "paired": profile.paired_case,
            "runtime_memory": runtime_memory.runtime_memory_case}


def child_main(job_path: str, result_path: str) -> None:
    """The child: run the job's handler, write its result atomically."""
    job = json.loads(Path(job_path).read_text())
    result = HANDLERS[job["kind"]](job)
    atomic_write_text(result_path, json.dumps(result))
