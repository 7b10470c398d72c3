"""scripts/gpu_check.sh: without a GPU it still writes its report, every GPU step "no CUDA device",
in under a minute; the parts of the GPU steps that can run on CPU are checked here too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_STEPS = ["kernel_tests", "model", "bench_plain", "bench_normalised", "plugin_path", "ort_cuda", "tune"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_without_cuda_reports_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "report"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took < 60, f"gpu_check.sh took {took:.1f} s without a GPU"
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["environment"] + GPU_STEPS
    env_numbers = report["steps"]["environment"]["numbers"]
    assert report["steps"]["environment"]["status"] == "passed" and env_numbers["torch"] == torch.__version__
    if not torch.cuda.is_available():
        for name in GPU_STEPS:
            assert report["steps"][name] == {"status": "skipped", "reason": "no CUDA device"}, name
        assert report["failed"] == []
    md = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "| kernel_tests | skipped | 0 | no CUDA device |" in md or torch.cuda.is_available()


def test_gpu_check_script_uses_python3_and_never_stops_early():
    text = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    assert "set -e" not in text and "command -v python3" in text and "pip install" not in text.replace(
        "`pip install -e .` would", "")


def test_pytest_step_counts_results(tmp_path):
    gc = _gpu_check()
    step = gc._pytest(tmp_path, "sample", ["tests/test_trt.py", "-k", "shared_atomic_writer or side_stream"], 120)
    assert step["status"] == "passed", step
    assert step["numbers"]["passed"] == 1 and step["numbers"]["failed"] == 0
    assert step["numbers"]["skipped"] == (0 if torch.cuda.is_available() else 2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_bench_numbers_from_the_benchmark_json(tmp_path):
    """bench_kernel.py --json (quick, interpreter) parsed as the bench steps do."""
    gc = _gpu_check()
    js = tmp_path / "b.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_kernel.py"), "--device", "cpu",
                           "--quick", "--json", str(js)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = gc.bench_numbers(js)
    assert numbers["64"]["fused_parity_ok"] is True and numbers["64"]["sdpa_over_fused"] is not None
    assert numbers["target"].endswith("not measured")


def test_ort_step_model_on_the_cpu_provider(tmp_path):
    """The ORT step's model and comparison, on the CPU provider (the GPU image's onnxruntime
    has no CUDA provider, so there the step is skipped with that reason)."""
    pytest.importorskip("onnxruntime")
    result = _gpu_check().worker_ort(tmp_path, provider="CPUExecutionProvider")
    assert result["ok"], result


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_cuda_time_is_do_bench_median_with_budgets_from_one_call(monkeypatch):
    """On GPU, bench_kernel.time_ms is triton.testing.do_bench's median; its time budgets are the
    run counts times one timed call, at least do_bench's own defaults."""
    import triton.testing

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import bench_kernel

    seen = {}

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean", **kw):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        fn()
        return 1.25

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    assert bench_kernel.time_ms(lambda: (calls.append(1), time.sleep(0.02)), "cuda", 3, 10) == 1.25
    assert seen["return_mode"] == "median" and len(calls) == 3  # two before do_bench, its own after
    assert seen["warmup"] >= 3 * 20 and seen["rep"] >= 10 * 20  # 20 ms a call: the counts set the budgets
    bench_kernel.time_ms(lambda: None, "cuda", 3, 10)
    assert (seen["warmup"], seen["rep"]) == (25.0, 100.0)  # a short call: do_bench's defaults
    calls.clear()
    assert bench_kernel.time_ms(lambda: calls.append(1), "cpu", 2, 5) >= 0 and len(calls) == 7
