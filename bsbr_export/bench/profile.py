"""ORT profiles: node time per op type of the ORT backends, one profiled run at one length; and
the short prompts timed in pairs (BSBR ORT and the HF export alternating in one process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .jobs import make_job, run_child
from .results import fmt_ms
from .spec import BenchSpec

# The prefill targets against the HF export are judged on these lengths, timed in pairs.
PAIRED_LENGTHS = (1, 32, 128)


def op_totals(events: list, last_run_only: bool = True) -> dict:
    """Node time per op type (ms) from an ORT profile, over the last ``model_run``."""
    runs = [e for e in events if e.get("name") == "model_run"]
    lo, hi = (runs[-1]["ts"], runs[-1]["ts"] + runs[-1]["dur"]) if (runs and last_run_only) else (0, float("inf"))
    per_op, fn_ms, total = {}, 0.0, 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not lo <= e["ts"] <= hi:
            continue
        op = e.get("args", {}).get("op_name", "?")
        ms = e["dur"] / 1e3
        per_op[op] = per_op.get(op, 0.0) + ms
        total += ms
        if "ChunkAttention" in e["name"]:
            fn_ms += ms
    run_ms = runs[-1]["dur"] / 1e3 if runs else None
    ops = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    return {"run_ms": run_ms, "node_total_ms": total, "chunk_attention_fn_ms": fn_ms, "op_types_ms": ops}


def per_run_op_totals(events: list) -> list[dict]:
    """``op_totals`` of every ``model_run`` in a profile, in run order."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    out = []
    for r in runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        per_op, count = {}, {}
        for e in nodes:
            if lo <= e["ts"] <= hi:
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
                count[op] = count.get(op, 0) + 1
        out.append({"run_ms": r["dur"] / 1e3, "node_total_ms": sum(per_op.values()), "op_types_ms": per_op,
                    "op_counts": count})
    return out


# Sessions stepped in turn in one process: with ORT's thread spinning on (its default), the idle
# sessions' threads spin through the running one's calls and take its cores (on 2 cores a T = 1
# prompt then costs ~2x: 33 against 14 ms), so no session of an alternation spins.
QUIET = {"session.intra_op.allow_spinning": "0"}


def alternating_wall(paths: dict, feeds: dict, threads: int, runs: int, warmup: int,
                     outputs=("logits",), reverse: bool = False) -> dict:
    """Wall times of several ORT graphs on the same feeds, the graphs alternating call by call:
    {name: [ms of each timed round]} (round i of every graph ran back to back, starting at the
    i-th graph, so that each takes every place in a round alike). ``reverse``: the sessions are
    made in the opposite order (a session made first in a process can run ~10% slower: a caller
    that compares pools a run in each order, as ``run_paired`` does). No session spins (``QUIET``)."""
    import time

    from ..runtime import session_from_onnx

    names = list(paths)[::-1] if reverse else list(paths)
    sessions = {n: session_from_onnx(paths[n], threads, ["CPUExecutionProvider"], config=QUIET) for n in names}
    wall = {n: [] for n in paths}
    for i in range(warmup + runs):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sess = sessions[n]
            t0 = time.perf_counter()
            sess.run(list(outputs), feeds)
            if i >= warmup:
                wall[n].append((time.perf_counter() - t0) * 1e3)
    return wall


def paired_case(job: dict) -> dict:
    """Child: BSBR ORT and the HF export alternating call by call at each short length; per
    length the median of each and the median of the rounds' ratios (BSBR / HF export), which
    cancels what drifts between calls (separate processes differ by up to 2x here at T = 32)."""
    paths = {b: job["paths"][b] for b in ("bsbr-ort", "hf-ort")}
    out = {}
    for T in job["lengths"]:
        ids = np.random.default_rng(job["seed"] + T).integers(0, job["vocab_size"], size=(1, T), dtype=np.int64)
        wall = alternating_wall(paths, {"input_ids": ids}, job["threads"], job["runs"], job["warmup"],
                                reverse=job.get("reverse", False))
        out[str(T)] = paired_stats(wall)
    return {"status": "ok", "lengths": out}


def paired_stats(wall: dict) -> dict:
    """Per backend its median and its calls; the median of the rounds' ratios (BSBR / HF export)."""
    return {b: float(np.median(v)) for b, v in wall.items()} | {f"{b}_ms": list(v) for b, v in wall.items()} | {
        "ratio": float(np.median(np.array(wall["bsbr-ort"]) / np.array(wall["hf-ort"]))), "runs": len(wall["hf-ort"])}


def run_paired(spec: BenchSpec, work, prep: dict, threads: int, log) -> dict:
    """Parent: ``paired_case`` over the short lengths the run has (``PAIRED_LENGTHS``), in two children."""
    # The smoke test (--quick) pairs its shortest length.
    lengths = sorted(spec.lengths)[:1] if spec.quick else [T for T in PAIRED_LENGTHS if T in spec.lengths]
    if not lengths or any(prep["parity"][b]["status"] != "pass" for b in ("bsbr-ort", "hf-ort")):
        return {"status": "skipped", "reason": "no short length in the run, or a graph failed its parity gate"}
    # Two children, one making the sessions in each order, their rounds pooled (see ``alternating_wall``).
    runs = [run_child(make_job("paired", spec, work, prep, threads, lengths=lengths, runs=5 if spec.quick else 21,
                               warmup=2, reverse=reverse), work, spec.case_timeout_s) for reverse in (False, True)]
    if any(r.get("status") != "ok" for r in runs):
        return next(r for r in runs if r.get("status") != "ok")
    pooled = lambda T, b: runs[0]["lengths"][T][f"{b}_ms"] + runs[1]["lengths"][T][f"{b}_ms"]  # noqa: E731
    res = {"status": "ok", "lengths": {T: paired_stats({b: pooled(T, b) for b in ("bsbr-ort", "hf-ort")})
                                       for T in runs[0]["lengths"]}}
    for T, r in res.get("lengths", {}).items():
        log(f"  paired T {T:>5}: BSBR ORT {fmt_ms(r['bsbr-ort'])} ms, HF export {fmt_ms(r['hf-ort'])} ms, "
            f"median ratio {r['ratio']:.2f}")
    return res


def profile_alternating(paths: dict, feeds: dict, threads: int, runs: int, warmup: int, prefix: str,
                        outputs=("logits",)) -> dict:
    """Per-call medians of several ORT graphs on the same feeds, the graphs alternating call by call
    (a noisy machine then slows each alike): {name: {"wall_ms", "run_ms", "node_total_ms",
    "op_types_ms", "op_counts"}}. ``wall_ms``: unprofiled sessions timed with perf_counter; the rest
    from profiled sessions (ORT's profiler), ``warmup`` calls dropped."""
    from ..runtime import session_from_onnx

    out = {}
    wall = alternating_wall(paths, feeds, threads, runs, warmup, outputs)
    prof = {n: session_from_onnx(p, threads, ["CPUExecutionProvider"], profile_prefix=f"{prefix}-{n}", config=QUIET)
            for n, p in paths.items()}
    for _ in range(warmup + runs):
        for sess in prof.values():
            sess.run(list(outputs), feeds)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    for n, sess in prof.items():
        f = Path(sess.end_profiling())
        per_run = per_run_op_totals(json.loads(f.read_text()))[warmup:]
        f.unlink(missing_ok=True)
        ops = {o for r in per_run for o in r["op_types_ms"]}
        op_ms = {o: med([r["op_types_ms"].get(o, 0.0) for r in per_run]) for o in ops}
        out[n] = {"wall_ms": med(wall[n]), "runs": len(per_run), "run_ms": med([r["run_ms"] for r in per_run]),
                  "node_total_ms": med([r["node_total_ms"] for r in per_run]),
                  "op_types_ms": dict(sorted(op_ms.items(), key=lambda kv: -kv[1])),
                  "op_counts": {o: max(r["op_counts"].get(o, 0) for r in per_run) for o in ops}}
    return out


def profile_case(job: dict) -> dict:
    """Child: full-length warm-up, then one profiled run of an ORT backend; node time per op type."""
    from ..runtime import session_from_onnx

    prefix = str(Path(job["work"]) / f"profile-{job['backend']}-{job['seq']}")
    sess = session_from_onnx(job["paths"][job["backend"]], job["threads"], ["CPUExecutionProvider"],
                             profile_prefix=prefix)
    ids = np.random.default_rng(job["seed"]).integers(0, job["vocab_size"], size=(1, job["seq"]), dtype=np.int64)
    # A full-length warm-up: one profiled run has no median to absorb first-run allocations.
    for _ in range(job["warmup"]):
        sess.run(["logits"], {"input_ids": ids})
    sess.run(["logits"], {"input_ids": ids})  # the profiled run: op_totals reads the last one
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    Path(prof).unlink(missing_ok=True)
    return {"status": "ok", "backend": job["backend"], "seq": job["seq"], "warmup_seq": job["seq"]} | op_totals(events)


def run_profiles(spec: BenchSpec, work, prep: dict, threads: int, log) -> dict:
    """Parent: one profile child per ORT backend that passed the gate, at ``profile_len`` (or the longest T)."""
    T = spec.profile_len or spec.max_len
    out = {}
    for b in ("bsbr-ort", "floor-ort", "hf-ort"):
        if prep["parity"][b]["status"] not in ("pass", "none"):
            continue
        res = run_child(make_job("profile", spec, work, prep, threads, backend=b, seq=T,
                                 warmup=0 if spec.quick else 1), work, spec.case_timeout_s)
        out[b] = res
        if res.get("status") == "ok":
            top = [f"{k} {fmt_ms(v)}" for k, v in list(res["op_types_ms"].items())[:4]]
            top = ", ".join(t for t in top if not t.endswith(" 0.00")) or "none over 0.005"  # no zero rows
            log(f"  profile {b:10s} T {T}: run {fmt_ms(res['run_ms'])} ms; top ops (ms): {top}")
        else:
            log(f"  profile {b:10s} T {T}: {res['reason']}")
    return out


def profile_lengths(paths: dict, lengths: list, threads: int, runs: int, warmup: int, work: Path, seed: int,
                    vocab: int = 50257) -> dict:
    """``profile_alternating`` of the graphs at every prompt length, on seeded random ids
    (batch 1): {T: results}, each length's wall times printed as it ends."""
    results = {}
    for T in lengths:
        ids = np.random.default_rng(seed + T).integers(0, vocab, size=(1, T), dtype=np.int64)
        results[T] = profile_alternating({n: str(p) for n, p in paths.items()}, {"input_ids": ids}, threads, runs,
                                         warmup, str(Path(work) / f"prof-{T}"))
        print(f"T={T}: " + ", ".join(f"{n} {results[T][n]['wall_ms']:.1f} ms" for n in paths), flush=True)
    return results


def script_header(root: Path, script: str, argv, title: str, threads: int, seed: int) -> list[str]:
    """The first lines of a profiling script's fragment: title, the command as run from the
    repository root, machine, date, checkout and the setting every such script shares."""
    import subprocess
    import sys
    import time

    from ..util import machine_line

    cmd = f"python scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return [f"## {title}", "", f"    flock /tmp/bsbr-cpu.lock {cmd.strip()}", "", f"- machine: {machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; checkout {rev}; {threads} ORT threads, batch 1, "
            f"fp32; GPT-2 small shape, random weights (seed {seed})"]


_EXPORT_PREFILL = """
import json, sys
from pathlib import Path
from bsbr_export.convert import convert
from bsbr_export.export import ExportSpec, export_onnx
hf, out, n, attention, opts = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
export_onnx(convert(hf, **opts), out, ExportSpec(max_seq_len=n, attention=attention, state_outputs=False), decode=False)
"""


def export_prefill(hf, out, max_len: int, attention: str = "bsbr", **options) -> Path:
    """``out/model.onnx``: the prefill graph of ``hf`` converted with ``options`` (fp32, no state
    outputs, as the benchmark times prefill; ``attention="none"``: the dense floor), exported in a
    child process so that its memory is returned before anything is timed."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _EXPORT_PREFILL, str(hf), str(out), str(max_len), attention,
                    json.dumps(options)], check=True, env=dict(os.environ, PYTHONPATH=str(root)), cwd=str(root))
    return Path(out) / "model.onnx"
