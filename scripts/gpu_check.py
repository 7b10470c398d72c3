"""Self-contained GPU check: every step runs (none stops the others), one JSON + Markdown report.

    python3 scripts/gpu_check.py [--out DIR] [--budget SECONDS]     (or: bash scripts/gpu_check.sh)

For a fresh machine with only this repository and its own Python (torch, triton, numpy,
pytest, onnx, onnxruntime; no TensorRT, no network): the package runs from the source tree
through PYTHONPATH, nothing is installed. Steps, each with its own time limit inside one
overall budget (default 480 s, under 9 minutes with start-up):

  environment     card (nvidia-smi, torch), versions of Python, torch, CUDA, triton, numpy,
                  onnx, onnxruntime (+ its execution providers), tensorrt
  kernel_tests    tests/test_kernel.py's CUDA tests: both ops, fp32/fp16, fp16 q with fp32 S,
                  d = 128 with a non-power-of-two chunk
  plugin_path     tests/test_trt.py's side-stream test: the plugins' JIT implementation on
                  buffers seen through __cuda_array_interface__ on a non-default stream
  bench_plain     scripts/bench_kernel.py (fused vs vectorised torch vs SDPA flash, 1k-32k,
  bench_normalised  fp16; parity-gated), plain and normalised op; target: fused >= 3x full
                  causal SDPA at 32k (fp16)
  ort_cuda        the bsbr::ChunkAttention ONNX function under onnxruntime's CUDA execution
                  provider vs the reference (skipped when onnxruntime has no CUDA provider)
  tune            the kernel's candidate launch configurations timed on this card (16k, fp16)
  model           the converted model at GPT-2 small and xl shapes (random weights, 8192 tokens,
                  fp16): fused (Triton) vs vectorised torch vs HF GPT-2 (SDPA) forward time and
                  peak memory; fused logits vs the fp32 torch path at lengths that are not
                  multiples of L; torch decode (fp32) vs forward, and its ms per token at 8000
                  tokens of context against HF GPT-2 with its KV cache

Without a CUDA device every GPU step is reported as skipped, "no CUDA device", within
seconds. Output: DIR/gpu_check.json, DIR/gpu_check.md and each step's log; DIR is --out,
else $OUT when set, else out/gpu-report/. Exit status 1 when a step failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable or shutil.which("python3") or "python3"
NO_CUDA = "no CUDA device"
TARGET_T, TARGET_SPEEDUP = 32768, 3.0


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run ``cmd`` from the repository root with its output in ``log_path``; never raises."""
    t0 = time.monotonic()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    except OSError as exc:
        rc = f"could not start: {exc}"
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": log_path.name,
            "tail": _tail(log_path)}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------ steps


def step_environment(out: Path, budget: float) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "executable": PY}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=min(20, budget))
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (subprocess.TimeoutExpired, OSError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    else:
        info["nvidia_smi"] = "not found"
    for mod in ("torch", "triton", "numpy", "onnx", "onnxruntime", "tensorrt", "pytest"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # any import failure is a finding, not a crash
            info[mod] = f"not importable ({type(exc).__name__})"
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        info["onnxruntime_providers"] = []
    try:
        import torch

        info["cuda_runtime"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            info["card"] = torch.cuda.get_device_name()
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as exc:
        info["cuda_available"] = False
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return {"status": "passed", "numbers": info}


def _pytest(out: Path, name: str, args: list[str], budget: float) -> dict:
    xml = out / f"{name}.xml"
    res = run_logged([PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *args],
                     out / f"{name}.log", budget)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        counts.update(failed=int(suite.get("failures", 0)), skipped=int(suite.get("skipped", 0)),
                      errors=int(suite.get("errors", 0)))
        counts["passed"] = total - counts["failed"] - counts["skipped"] - counts["errors"]
        counts["failures"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    except (OSError, ET.ParseError, AttributeError):
        pass
    ok = res["rc"] == 0 and counts["passed"] > 0
    return {"status": "passed" if ok else "failed", "numbers": counts, **res}


def step_kernel_tests(out: Path, budget: float) -> dict:
    return _pytest(out, "kernel_tests", ["tests/test_kernel.py", "-k", "cuda"], budget)


def step_plugin_path(out: Path, budget: float) -> dict:
    return _pytest(out, "plugin_path", ["tests/test_trt.py", "-k", "side_stream"], budget)


def _bench(out: Path, op: str, budget: float) -> dict:
    js = out / f"kernel_bench_{op}.json"
    res = run_logged([PY, "scripts/bench_kernel.py", "--device", "cuda", "--op", op, "--runs", "10", "--warmup", "3",
                      "--output", str(out / f"kernel_bench_{op}.md"), "--json", str(js)],
                     out / f"bench_{op}.log", budget)
    numbers = bench_numbers(js)
    return {"status": "passed" if res["rc"] == 0 else "failed", "numbers": numbers, **res}


def bench_numbers(path: Path) -> dict:
    """Per length: fused, chunked and SDPA times (ms), SDPA / fused, fused parity; and the target."""
    numbers = {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return numbers
    for row in data.get("rows", []):
        fused, full, chunked = row.get("fused"), row.get("full"), row.get("chunked")
        numbers[str(row["T"])] = {
            "fused_ms": fused, "chunked_ms": chunked, "sdpa_ms": full,
            "sdpa_over_fused": round(full / fused, 3) if fused and full else None,
            "fused_parity_ok": (row.get("fused_parity") or {}).get("ok"),
        }
    at = numbers.get(str(TARGET_T), {}).get("sdpa_over_fused")
    numbers["target"] = (f">= {TARGET_SPEEDUP}x SDPA at T={TARGET_T}: "
                         + ("not measured" if at is None else f"{at}x, {'met' if at >= TARGET_SPEEDUP else 'NOT met'}"))
    return numbers


def step_bench_plain(out: Path, budget: float) -> dict:
    return _bench(out, "plain", budget)


def step_bench_normalised(out: Path, budget: float) -> dict:
    return _bench(out, "normalised", budget)


def step_ort_cuda(out: Path, budget: float) -> dict:
    try:
        import onnxruntime
    except Exception as exc:
        return {"status": "skipped", "reason": f"onnxruntime not importable ({type(exc).__name__})"}
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"status": "skipped",
                "reason": f"the installed onnxruntime has no CUDAExecutionProvider (providers: {', '.join(providers)})"}
    res = run_logged([PY, str(Path(__file__).resolve()), "--worker", "ort", "--out", str(out)], out / "ort_cuda.log",
                     budget)
    return _worker_result(out / "ort_cuda.json", res)


def step_tune(out: Path, budget: float) -> dict:
    res = run_logged([PY, str(Path(__file__).resolve()), "--worker", "tune", "--out", str(out),
                      "--budget", str(max(budget - 10, 5))], out / "tune.log", budget)
    return _worker_result(out / "tune.json", res)


def step_model(out: Path, budget: float) -> dict:
    res = run_logged([PY, str(Path(__file__).resolve()), "--worker", "model", "--out", str(out),
                      "--budget", str(max(budget - 10, 5))], out / "model.log", budget)
    return _worker_result(out / "model.json", res)


def _worker_result(path: Path, res: dict) -> dict:
    try:
        numbers = json.loads(path.read_text())
    except (OSError, ValueError):
        numbers = {}
    ok = res["rc"] == 0 and numbers.get("ok", False)
    return {"status": "passed" if ok else "failed", "numbers": numbers, **res}


# (name, time cap in seconds, needs CUDA): run in this order, each inside what is left of the budget.
STEPS = [
    ("environment", step_environment, 30, False),
    ("kernel_tests", step_kernel_tests, 120, True),
    ("model", step_model, 120, True),
    ("bench_plain", step_bench_plain, 80, True),
    ("bench_normalised", step_bench_normalised, 70, True),
    ("plugin_path", step_plugin_path, 40, True),
    ("ort_cuda", step_ort_cuda, 30, True),
    ("tune", step_tune, 40, True),
]


# ------------------------------------------------------------------ workers (subprocesses)


def worker_ort(out: Path, provider: str = "CUDAExecutionProvider") -> dict:
    """The bsbr::ChunkAttention local function on onnxruntime's ``provider`` vs the reference."""
    import math

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from bsbr_export.ops.naive import chunk_attention_ref
    from bsbr_export.ops.onnx_graph import chunk_attention_function

    B, H, T, d, L = 1, 4, 300, 64, 128
    fn = chunk_attention_function(18)
    f32 = TensorProto.FLOAT
    C = math.ceil(T / L)
    shapes = {"q": [B, H, T, d], "k": [B, H, T, d], "v": [B, H, T, d], "S": [B, H, C, d, d], "g": [H]}
    node = helper.make_node(fn.name, list(fn.input), ["o"], domain=fn.domain, chunk_size=L,
                            plugin_namespace=fn.domain)
    graph = helper.make_graph([node], "ca", [helper.make_tensor_value_info(n, f32, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info("o", f32, None)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                    helper.make_opsetid(fn.domain, 1)])
    path = out / "chunk_attention.onnx"
    onnx.save(model, str(path))
    gen = torch.Generator().manual_seed(0)
    feeds = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
    feeds["S"] /= math.sqrt(d)
    ref = chunk_attention_ref(*(feeds[n] for n in shapes), L).numpy()
    sess = ort.InferenceSession(str(path), providers=[provider])
    got = sess.run(None, {n: x.numpy() for n, x in feeds.items()})[0]
    err = float(np.abs(got - ref).max())
    return {"providers": sess.get_providers(), "max_abs_err": err,
            "ok": err <= 1e-3 and sess.get_providers()[0] == provider}


def worker_tune(out: Path, budget: float) -> dict:
    """Time each candidate launch configuration at one shape; report the fastest."""
    import torch

    from bench_kernel import time_ms  # scripts/ is on the path of a script run from it

    from bsbr_export.ops import kernel as kt
    from bsbr_export.ops.naive import chunk_attention_ref, compare_to_baseline

    t_end = time.monotonic() + budget
    B, H, T, d, L = 1, 12, 16384, 64, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    S = torch.randn(B, H, T // L, d, d, generator=gen) / d**0.5
    g = torch.rand(H, generator=gen) + 0.5
    ref32 = chunk_attention_ref(*(x.cuda() for x in (q, k, v, S, g)), L)
    low = [x.half().cuda() for x in (q, k, v, S)]
    ref_low = chunk_attention_ref(*low, g.cuda(), L)
    default = kt.kernel_config(L, d, torch.float16, torch.cuda.get_device_capability())
    results = []
    for cfg in [default] + [c for c in kt.TUNING_CANDIDATES if c != default]:
        if time.monotonic() > t_end:
            results.append({**cfg, "error": "budget spent"})
            continue
        try:
            out_t = kt.chunk_attention_triton(*low, g.cuda(), L, config=cfg)
            parity = compare_to_baseline(out_t, ref32, ref_low)["ok"]
            ms = time_ms(lambda: kt.chunk_attention_triton(*low, g.cuda(), L, config=cfg), "cuda", 3, 10)
            results.append({**cfg, "ms": round(ms, 4), "parity_ok": parity})
        except Exception as exc:  # a configuration that does not compile or fit is a result
            results.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    timed = [r for r in results if "ms" in r and r["parity_ok"]]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    return {"shape": {"B": B, "H": H, "T": T, "d": d, "L": L, "dtype": "float16"}, "default": default,
            "default_ms": results[0].get("ms"), "best": best, "candidates": results, "ok": bool(timed)}


def _cuda_ms(fn, runs: int) -> tuple[float, float]:
    """Median ms of ``fn()`` over about ``runs`` runs (``bench_kernel.time_ms``: triton's
    ``do_bench``) and the peak memory of the timed calls in GiB."""
    import torch

    from bench_kernel import time_ms  # scripts/ is on the path of a script run from it

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(fn, "cuda", 0, runs)
    return round(ms, 2), round(torch.cuda.max_memory_allocated() / 2**30, 2)


def worker_model(out: Path, budget: float) -> dict:
    """The converted model on CUDA at GPT-2 small and xl shapes: parity, time and peak memory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bsbr_export.check import compare_logits
    from bsbr_export.convert import build_model, convert_state_dict

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t_end, T = time.monotonic() + budget, 8192
    res = {"T": T, "dtype": "float16", "shapes": {}}
    for name, (E, n_layer, H) in {"gpt2": (768, 12, 12), "gpt2-xl": (1600, 48, 25)}.items():
        if time.monotonic() > t_end:
            res["shapes"][name] = {"error": "budget spent"}
            continue
        row = res["shapes"][name] = {}
        try:
            torch.manual_seed(0)
            with torch.device("cuda"):
                hf = GPT2LMHeadModel(GPT2Config(n_positions=T, n_embd=E, n_layer=n_layer, n_head=H,
                                                attn_implementation="sdpa")).eval()
            sd, cfg = convert_state_dict(hf.state_dict(), hf.config.to_dict(), chunk_size=128)
            model = build_model(sd, cfg).cuda()
            ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
            with torch.no_grad():
                lengths = (1000, 1537)  # not multiples of L
                refs = {n: model(ids[:, :n], impl="vectorised").float().cpu() for n in lengths}  # fp32 torch
                if name == "gpt2":  # torch decode (fp32) against the forward, then ms per token
                    n0, steps = 8000, 16
                    full = model(ids[:, :n0 + steps], impl="vectorised")[0, n0 - 1:]
                    logits, st = model.prefill(ids[:, :n0], max_len=T)
                    dec = [logits[0, -1]] + [model.decode_step(ids[:, n0 + i], st)[0] for i in range(steps)]
                    m = compare_logits(full.cpu().numpy(), torch.stack(dec).cpu().numpy())
                    row["decode_vs_forward"] = {"max_abs": round(m["max_abs"], 5), "top1": round(m["top1"], 4)}
                    tok = ids[:, n0]
                    row["decode_ms_per_token"], _ = _cuda_ms(lambda: model.decode_step(tok, st), 16)
                    past = hf(ids[:, :n0], use_cache=True).past_key_values
                    row["hf_kv_decode_ms_per_token"], _ = _cuda_ms(
                        lambda: hf(ids[:, n0:n0 + 1], past_key_values=past, use_cache=True), 16)
                    del st, past, full
                model.half()
                hf.half()
                for n in lengths:  # the fused kernel in fp16 against the fp32 torch path
                    m = compare_logits(refs[n].numpy(), model(ids[:, :n], impl="triton").float().cpu().numpy())
                    row[f"parity_{n}"] = {"max_abs": round(m["max_abs"], 4), "top1": round(m["top1"], 4)}
                row["fused_ms"], row["fused_peak_gib"] = _cuda_ms(lambda: model(ids, impl="triton"), 5)
                row["torch_ms"], row["torch_peak_gib"] = _cuda_ms(lambda: model(ids, impl="vectorised"), 3)
                row["hf_sdpa_ms"], row["hf_sdpa_peak_gib"] = _cuda_ms(lambda: hf(ids, use_cache=False), 5)
        except Exception as exc:  # a shape that fails is a result; the next one still runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            hf = model = sd = None
            torch.cuda.empty_cache()
    ok = all("error" not in r and r.get("parity_1537", {}).get("top1", 0) >= 0.99 for r in res["shapes"].values())
    return {**res, "ok": ok}


# ------------------------------------------------------------------ report


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except Exception as exc:
        return False, f"{NO_CUDA} (torch not importable: {type(exc).__name__})"
    if not torch.cuda.is_available():
        return False, NO_CUDA
    return True, ""


def markdown(report: dict) -> str:
    env = report["steps"].get("environment", {}).get("numbers", {})
    lines = [
        "# GPU check",
        "",
        f"- card: {env.get('card', 'none')} (nvidia-smi: {env.get('nvidia_smi', '-')})",
        f"- Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), "
        f"triton {env.get('triton')}, numpy {env.get('numpy')}, onnx {env.get('onnx')}, "
        f"onnxruntime {env.get('onnxruntime')} ({', '.join(env.get('onnxruntime_providers', []))}), "
        f"tensorrt {env.get('tensorrt')}",
        f"- started {report['started']}, {report['seconds']} s in all, commit {report.get('commit', '?')}",
        "",
        "| step | result | seconds | details |",
        "|---|---|---:|---|",
    ]
    for name, step in report["steps"].items():
        if name == "environment":
            details = "see above"
        elif step["status"] == "skipped":
            details = step.get("reason", "")
        else:
            nums = step.get("numbers", {})
            details = "; ".join(f"{k}: {v}" for k, v in nums.items() if k not in ("candidates",))[:600]
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', 0)} | {details.replace('|', '/')} |")
    for name in ("bench_plain", "bench_normalised"):
        md = Path(report["out"]) / f"kernel_bench_{name.split('_', 1)[1]}.md"
        if md.is_file():
            lines += ["", f"## {name}", "", md.read_text().replace("# Fused", "### Fused")]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else out/gpu-report/)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    p.add_argument("--worker", choices=["ort", "tune", "model"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu-report")
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        fn = {"ort": lambda: worker_ort(out), "tune": lambda: worker_tune(out, args.budget),
              "model": lambda: worker_model(out, args.budget)}[args.worker]
        result = fn()
        (out / f"{'ort_cuda' if args.worker == 'ort' else args.worker}.json").write_text(json.dumps(result, indent=1))
        return 0 if result.get("ok") else 1

    t0 = time.monotonic()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "out": str(out), "commit": _commit(), "steps": {}}
    has_cuda, why = cuda_available()
    for name, fn, cap, needs_cuda in STEPS:
        left = args.budget - (time.monotonic() - t0)
        if needs_cuda and not has_cuda:
            step = {"status": "skipped", "reason": why}
        elif left < 5:
            step = {"status": "skipped", "reason": f"time budget of {args.budget:.0f} s spent"}
        else:
            s0 = time.monotonic()
            try:
                step = fn(out, min(cap, left - 2))
            except Exception as exc:  # a broken step is reported; the others still run
                step = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            step.setdefault("seconds", round(time.monotonic() - s0, 1))
        report["steps"][name] = step
        print(f"[gpu_check] {name}: {step['status']} {step.get('reason', '')}", flush=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["failed"] = [n for n, s in report["steps"].items() if s["status"] == "failed"]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] report: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
