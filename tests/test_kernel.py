"""Fused chunk attention: reference, vectorised torch path and Triton kernel.

(a) the loop references (bsbr_export.ops.naive) against the vectorised torch op;
(b) the Triton kernel under Triton's CPU interpreter against the reference, in
    fp32 and fp16, for T in {1, L-1, L, L+1, 3L+5}, with and without retrieval
    state. The interpreter must be switched on before triton is imported, so
    these cases run in one subprocess (this file run as a script with
    TRITON_INTERPRET=1); nothing leaks into the rest of the test session;
(c) the kernel compiled to a cubin for sm_80/sm_90 (no GPU needed: catches what
    the interpreter cannot, such as dot shapes and shared memory);
(d) the compiled kernel on CUDA at a realistic shape (skipped without CUDA).

fp16 tolerance comes from a measured baseline: the reference run on the same
fp16 inputs, compared with the fp32 reference; the kernel may be at most 3x
as far (plus a tiny epsilon). `_check` logs every number.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsbr_export.ops.naive import chunk_attention_normalised_ref, chunk_attention_ref, compare_to_baseline

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

# (chunk L, head dim d): one chunk that is not a power of two, one that is.
CHUNK_DIMS = [(24, 16), (16, 32)]


def _lengths(L: int) -> list[int]:
    return [1, L - 1, L, L + 1, 3 * L + 5]


def make_inputs(B, H, T, d, L, state: str, seed: int = 0, device="cpu"):
    """fp32 inputs; `state` is "zero" (no retrieval) or "random" (S[:, :, 0] nonzero too)."""
    gen = torch.Generator().manual_seed(seed)
    C = math.ceil(T / L)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))  # (B, H, T, d)
    S = torch.randn(B, H, C, d, d, generator=gen) / math.sqrt(d)  # (B, H, C, d, d)
    if state == "zero":
        S.zero_()
    g = torch.rand(H, generator=gen) + 0.5  # (H,)
    return [x.to(device) for x in (q, k, v, S, g)]


def make_normalised_inputs(B, H, T, d, L, seed: int = 0, device="cpu"):
    """fp32 inputs of the normalised op: qf = elu(q) + 1 > 0, Z > 0, one head with g = 0."""
    gen = torch.Generator().manual_seed(seed)
    C = math.ceil(T / L)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))  # (B, H, T, d)
    qf = torch.nn.functional.elu(q) + 1.0
    S = torch.randn(B, H, C, d, d, generator=gen)  # (B, H, C, d, d)
    Z = torch.rand(B, H, C, d, generator=gen) * L  # (B, H, C, d): sums of positive features
    g = torch.rand(H, generator=gen) * 0.5
    g[0] = 0.0
    return [x.to(device) for x in (q, k, v, qf, S, Z, g)]


def _check(name: str, out, ref32, ref_lowp, eps: float = 1e-5) -> None:
    """Assert `out` is within 3x the baseline distance of `ref_lowp` from `ref32`; log the numbers."""
    nums = compare_to_baseline(out, ref32, ref_lowp, eps=eps)
    _check_numbers(name, nums)


def _check_numbers(name: str, nums: dict) -> None:
    msg = (
        f"{name}: max err {nums['err_max']:.3e} (limit {nums['limit_max']:.3e}, baseline {nums['base_max']:.3e}); "
        f"mean err {nums['err_mean']:.3e} (limit {nums['limit_mean']:.3e}, baseline {nums['base_mean']:.3e})"
    )
    log.info(msg)
    assert nums["ok"], msg


def _fp32_eps(ref) -> float:
    return 1e-5 * (1.0 + ref.abs().max().item())


# ---------------------------------------------------------------- (a) reference


def test_reference_is_causal_and_keeps_dtype():
    L, T = 8, 29
    q, k, v, S, g = make_inputs(1, 2, T, 16, L, "random")
    out = chunk_attention_ref(q, k, v, S, g, L)
    t = 13
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    for x in (k2, v2, q2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    out2 = chunk_attention_ref(q2, k2, v2, S, g, L)
    assert (out[:, :, : t + 1] - out2[:, :, : t + 1]).abs().max() <= 1e-6
    half = chunk_attention_ref(q.half(), k.half(), v.half(), S.half(), g, L)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("L,d", CHUNK_DIMS)
def test_vectorised_torch_path_matches_reference(L, d):
    """bsbr_export.ops.chunk.chunk_attention (SDPA per chunk) computes the same op."""
    from bsbr_export.ops.chunk import chunk_attention

    for T in _lengths(L):
        q, k, v, S, g = make_inputs(2, 2, T, d, L, "random", seed=T)
        ref = chunk_attention_ref(q, k, v, S, g, L)
        _check(f"torch fp32 L={L} T={T}", chunk_attention(q, k, v, S, g, L), ref, ref, eps=_fp32_eps(ref))


@pytest.mark.parametrize("L,d", CHUNK_DIMS)
def test_normalised_reference_matches_vectorised_torch(L, d):
    """The normalised op's loop reference (fp64) and the vectorised path (the model's) agree;
    with g = 0 both reduce to block-local softmax attention."""
    from bsbr_export.ops.chunk import chunk_attention_normalised

    for T in _lengths(L):
        q, k, v, qf, S, Z, g = make_normalised_inputs(2, 3, T, d, L, seed=T)
        ref = chunk_attention_normalised_ref(q, k, v, qf, S, Z, g, L)
        _check(f"torch normalised L={L} T={T}", chunk_attention_normalised(q, k, v, qf, S, Z, g, L), ref, ref,
               eps=_fp32_eps(ref))
        local = chunk_attention_ref(q, k, v, torch.zeros_like(S), torch.zeros_like(g), L)
        torch.testing.assert_close(ref[:, 0], local[:, 0], rtol=0, atol=1e-5)


def test_reference_rejects_bad_shapes():
    q, k, v, S, g = make_inputs(1, 2, 10, 16, 4, "zero")
    with pytest.raises(ValueError, match="S must be"):
        chunk_attention_ref(q, k, v, S[:, :, :2], g, 4)
    with pytest.raises(ValueError, match="g must be"):
        chunk_attention_ref(q, k, v, S, g[:1], 4)


# ------------------------------------------------------ (b) Triton interpreter


def interpreter_cases() -> list[dict]:
    cases = []
    for L, d in CHUNK_DIMS:
        for T in _lengths(L):
            for state in ("zero", "random"):
                for dtype in ("float32", "float16"):
                    cases.append({"id": f"L{L}-d{d}-T{T}-S{state}-{dtype}", "L": L, "d": d, "T": T,
                                  "state": state, "dtype": dtype, "layout": "contiguous"})
    # q, k, v as strided views of a (B, T, H, d) tensor; and fp32 S with fp16 q.
    cases.append({"id": "strided-fp16", "L": 24, "d": 16, "T": 77, "state": "random",
                  "dtype": "float16", "layout": "bthd"})
    cases.append({"id": "fp32-state-fp16-q", "L": 24, "d": 16, "T": 53, "state": "random",
                  "dtype": "float16", "layout": "fp32_state"})
    # The normalised op (the default conversion's): same lengths, both dtypes.
    for L, d in CHUNK_DIMS:
        for T in _lengths(L):
            for dtype in ("float32", "float16"):
                cases.append({"id": f"normalised-L{L}-d{d}-T{T}-{dtype}", "op": "normalised", "L": L, "d": d,
                              "T": T, "dtype": dtype, "layout": "contiguous"})
    return cases


def run_normalised_case(case: dict) -> dict:
    from bsbr_export.ops.kernel import chunk_attention_normalised_triton

    L, d, T = case["L"], case["d"], case["T"]
    dtype = getattr(torch, case["dtype"])
    q, k, v, qf, S, Z, g = make_normalised_inputs(2, 3, T, d, L, seed=T + d)
    ref32 = chunk_attention_normalised_ref(q, k, v, qf, S, Z, g, L)
    low = [x.to(dtype) for x in (q, k, v, qf, S, Z)]
    ref_lowp = chunk_attention_normalised_ref(*low, g, L)
    out = chunk_attention_normalised_triton(*low, g, L)
    assert out.dtype == dtype and out.shape == q.shape
    eps = _fp32_eps(ref32) if dtype == torch.float32 else 1e-5
    return compare_to_baseline(out, ref32, ref_lowp, eps=eps)


def run_interpreter_case(case: dict) -> dict:
    """Kernel vs reference for one case (runs inside the interpreter subprocess)."""
    from bsbr_export.ops.kernel import chunk_attention_triton

    if case.get("op") == "normalised":
        return run_normalised_case(case)

    L, d, T = case["L"], case["d"], case["T"]
    dtype = getattr(torch, case["dtype"])
    q, k, v, S, g = make_inputs(2, 2, T, d, L, case["state"], seed=T + d)
    ref32 = chunk_attention_ref(q, k, v, S, g, L)
    lq, lk, lv, lS = (x.to(dtype) for x in (q, k, v, S))
    if case["layout"] == "bthd":
        lq, lk, lv = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (lq, lk, lv))
        assert not lq.is_contiguous()
    if case["layout"] == "fp32_state":
        lS = S
    ref_lowp = chunk_attention_ref(lq, lk, lv, lS, g, L)
    out = chunk_attention_triton(lq, lk, lv, lS, g, L)
    assert out.dtype == dtype and out.shape == q.shape
    eps = _fp32_eps(ref32) if dtype == torch.float32 else 1e-5
    return compare_to_baseline(out, ref32, ref_lowp, eps=eps)


def run_worker(mode: str, interpret: bool) -> dict:
    """Run this file as a script (`python test_kernel.py MODE`) and return its JSON result."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"{mode} worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_worker("interpreter", interpret=True)


@needs_triton
@pytest.mark.parametrize("case", interpreter_cases(), ids=lambda c: c["id"])
def test_triton_interpreter_matches_reference(interpreter_results, case):
    result = interpreter_results[case["id"]]
    if "error" in result:
        pytest.fail(f"{case['id']}: {result['error']}")
    _check_numbers(f"triton-interp {case['id']}", result)


def test_plugins_import_without_triton():
    """`import bsbr_export.ops.kernel` works without Triton; the wrapper then says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, bsbr_export.ops.kernel as m\n"
        "x = torch.zeros(1, 1, 4, 16)\n"
        "try:\n"
        "    m.chunk_attention_triton(x, x, x, torch.zeros(1, 1, 1, 16, 16), torch.ones(1), 4)\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_triton
def test_triton_wrapper_validates_inputs():
    from bsbr_export.ops.kernel import chunk_attention_triton

    q, k, v, S, g = make_inputs(1, 2, 10, 24, 4, "zero")
    with pytest.raises(ValueError, match="head dim"):
        chunk_attention_triton(q, k, v, S, g, 4)
    q, k, v, S, g = make_inputs(1, 2, 10, 16, 4, "zero")
    with pytest.raises(ValueError, match="same dtype|share a dtype"):
        chunk_attention_triton(q.half(), k, v, S, g, 4)
    with pytest.raises(ValueError, match="S must be"):
        chunk_attention_triton(q, k, v, S[:, :, :1], g, 4)


@needs_triton
def test_dot_precisions_keep_fp32_state_out_of_tf32():
    """fp16 q with fp32 S: the retrieval product is tf32x3 on a GPU (the interpreter computes
    fp32 whatever the flag, so only the choice itself can be checked on CPU)."""
    from bsbr_export.ops.kernel import dot_precisions, launch_options

    assert dot_precisions(torch.float16, torch.float32) == {"DOT_PRECISION": "tf32", "STATE_PRECISION": "tf32x3"}
    assert dot_precisions(torch.float16, torch.float16)["STATE_PRECISION"] == "tf32"  # fp16 dot: flag unused
    assert dot_precisions(torch.float32, torch.float32) == {"DOT_PRECISION": "ieee", "STATE_PRECISION": "ieee"}
    assert dot_precisions(torch.float32, torch.float32, allow_tf32=True)["DOT_PRECISION"] == "tf32"
    opts = launch_options(64, torch.float16, torch.float32, 128, capability=(9, 0))
    assert opts["STATE_PRECISION"] == "tf32x3" and opts["BLOCK_M"] == 128


@needs_triton
def test_kernel_configs_per_gpu_class():
    from bsbr_export.ops.kernel import AMPERE_CONFIGS, HOPPER_CONFIGS, kernel_config

    for capability, table in (((8, 0), AMPERE_CONFIGS), ((8, 9), AMPERE_CONFIGS), ((9, 0), HOPPER_CONFIGS),
                              (None, AMPERE_CONFIGS)):
        assert kernel_config(128, 64, torch.float16, capability) == table[(torch.float16, "small")]
        assert kernel_config(128, 128, torch.float32, capability) == table[(torch.float32, "large")]
    short = kernel_config(24, 64, torch.float16, (9, 0))  # blocks shrink to the chunk
    assert short["BLOCK_M"] == short["BLOCK_N"] == 32


class _Strided:
    """Stands in for a (B, H, T, d) tensor whose time stride is huge (no memory needed)."""

    def __init__(self, shape, strides):
        self.shape, self._strides = shape, strides

    def stride(self, i=None):
        return self._strides if i is None else self._strides[i]


@needs_triton
def test_launch_bounds_fail_clearly():
    from bsbr_export.ops.kernel import check_launch_bounds

    B, H, T, d, L = 1, 2, 1 << 20, 64, 128
    ok = _Strided((B, H, T, d), (H * T * d, T * d, d, 1))
    check_launch_bounds({"q": ok}, B, H, T, L, 64)  # 2^27 elements per head: 64-bit bases, fine
    huge = _Strided((B, H, T, d), (1 << 40, 1 << 34, 1 << 24, 1))  # chunk rows 2^24 elements apart
    with pytest.raises(ValueError, match=r"one chunk spans \d+ elements \(>= 2\^31\)"):
        check_launch_bounds({"q": huge}, B, H, T, L, 64)
    with pytest.raises(ValueError, match="grid of .* programs exceeds"):
        check_launch_bounds({"q": ok}, 1 << 16, 1 << 10, 1 << 16, 16, 16)


@needs_triton
def test_grid_is_one_axis_for_many_heads(monkeypatch):
    """B*H > 65,535 (the CUDA limit of grid axis y) still launches: the grid has one axis."""
    from bsbr_export.ops import kernel as kt

    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            launched["grid"] = grid
            return lambda *args, **kwargs: launched.update(kwargs)

    monkeypatch.setattr(kt, "_chunk_attention_kernel", Recorder())
    B, H, T, d, L = 300, 250, 40, 16, 16
    x = torch.zeros(1, 1, T, d).expand(B, H, T, d)  # (B, H, T, d) without the memory
    S = torch.zeros(1, 1, 3, d, d).expand(B, H, 3, d, d)
    kt._launch(x, x, x, S, torch.ones(H), L, x, None, None)
    assert launched["grid"] == (B * H * 3 * 1,), launched["grid"]
    assert launched["STATE_PRECISION"] == "ieee" and launched["BLOCK_M"] == 16


# ------------------------------------- (c) compiled for real GPUs, without one

# (q dtype, S dtype, d, chunk L, compute capability[, normalised]): what the interpreter cannot
# check (dot shapes, shared memory, register allocation) is checked by compiling to a cubin,
# with the launch configuration the wrapper picks for that GPU class (kernel_config).
COMPILE_CASES = [
    ("float16", "float16", 64, 128, 90),
    ("float16", "float32", 128, 100, 90),  # fp16 q, fp32 S: the tf32x3 retrieval product
    ("float32", "float32", 128, 128, 80),
    ("float32", "float32", 128, 128, 90),
    ("float32", "float32", 16, 24, 80),
    ("float16", "float16", 64, 128, 80),
    ("float16", "float16", 128, 100, 80),
    ("float16", "float32", 64, 128, 80),
    ("float16", "float16", 64, 128, 90, True),  # the normalised op
    ("float32", "float32", 128, 100, 80, True),
    ("float16", "float16", 128, 128, 90, True),
]
# Largest dynamic shared memory per block: sm_80 163 KB, sm_86/89 99 KB (the Ampere table
# must fit both), sm_90 227 KB.
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


def _has_ptxas() -> bool:
    if os.environ.get("TRITON_PTXAS_PATH"):
        return True
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


def compile_case(q_dtype: str, s_dtype: str, d: int, L: int, cc: int, normalised: bool = False) -> dict:
    """Compile the kernel for one configuration to a cubin for sm_<cc> (no GPU needed)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bsbr_export.ops.kernel import _chunk_attention_kernel, launch_options

    ptr = {"float16": "*fp16", "float32": "*fp32"}
    opts = launch_options(d, getattr(torch, q_dtype), getattr(torch, s_dtype), L, capability=(cc // 10, cc % 10))
    constexprs = {"D": d, "NORMALISED": normalised,
                  **{k: opts[k] for k in ("BLOCK_M", "BLOCK_N", "DOT_PRECISION", "STATE_PRECISION")}}
    signature = {}
    for name in _chunk_attention_kernel.arg_names:
        signature[name] = ("constexpr" if name in constexprs else ptr[q_dtype] if name in ("Q", "K", "V", "O", "QF")
                           else ptr[s_dtype] if name in ("S", "Z") else "*fp32" if name == "G"
                           else "fp32" if name == "qk_scale" else "i32")
    compiled = triton_compile(
        ASTSource(_chunk_attention_kernel, signature, constexprs=constexprs),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": opts["num_warps"], "num_stages": opts["num_stages"]},
    )
    return {"shared_bytes": compiled.metadata.shared, "has_cubin": "cubin" in compiled.asm,
            "config": {k: opts[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "STATE_PRECISION")}}


@needs_triton
@pytest.mark.skipif(not _has_ptxas(), reason="no ptxas for Triton's NVIDIA backend")
def test_kernel_compiles_for_gpus():
    results = run_worker("compile", interpret=False)
    for case in COMPILE_CASES:
        result = results[str(case)]
        assert "error" not in result, f"{case}: {result.get('error')}"
        log.info("compiled %s: %s", case, result)
        assert result["has_cubin"]
        assert result["shared_bytes"] <= SHARED_LIMIT[case[4]], (case, result)


# ------------------------------------------------------------------ (d) CUDA


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_realistic_shape(dtype):
    from bsbr_export.ops.kernel import chunk_attention_triton

    B, H, T, d, L = 1, 12, 4096, 64, 128
    q, k, v, S, g = make_inputs(B, H, T, d, L, "random", device="cuda")
    ref32 = chunk_attention_ref(q, k, v, S, g, L)
    lq, lk, lv, lS = (x.to(dtype) for x in (q, k, v, S))
    ref_lowp = chunk_attention_ref(lq, lk, lv, lS, g, L)
    out = chunk_attention_triton(lq, lk, lv, lS, g, L)
    eps = _fp32_eps(ref32) if dtype == torch.float32 else 1e-5
    _check(f"cuda {dtype} B{B} H{H} T{T} d{d} L{L}", out, ref32, ref_lowp, eps=eps)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("L,d", [(100, 64), (128, 128), (100, 128), (24, 16)])
def test_cuda_odd_lengths(L, d):
    from bsbr_export.ops.kernel import chunk_attention_triton

    for T in _lengths(L):
        q, k, v, S, g = make_inputs(2, 3, T, d, L, "random", seed=T, device="cuda")
        ref32 = chunk_attention_ref(q, k, v, S, g, L)
        lq, lk, lv, lS = (x.half() for x in (q, k, v, S))
        out = chunk_attention_triton(lq, lk, lv, lS, g, L)
        _check(f"cuda fp16 L{L} d{d} T{T}", out, ref32, chunk_attention_ref(lq, lk, lv, lS, g, L))


@needs_cuda
@needs_triton
@pytest.mark.parametrize("op", ["plain", "normalised"])
@pytest.mark.parametrize("L,d", [(128, 64), (100, 128)])
def test_cuda_fp16_q_fp32_state(op, L, d):
    """fp16 q/k/v with fp32 S (and Z): on a GPU the retrieval product must not round S to TF32."""
    from bsbr_export.ops.kernel import chunk_attention_normalised_triton, chunk_attention_triton

    T = 4 * L + 7
    if op == "plain":
        q, k, v, S, g = make_inputs(1, 12, T, d, L, "random", seed=T, device="cuda")
        ref32 = chunk_attention_ref(q, k, v, S, g, L)
        low = [x.half() for x in (q, k, v)]
        out = chunk_attention_triton(*low, S, g, L)
        ref_low = chunk_attention_ref(*low, S, g, L)
    else:
        q, k, v, qf, S, Z, g = make_normalised_inputs(1, 12, T, d, L, seed=T, device="cuda")
        ref32 = chunk_attention_normalised_ref(q, k, v, qf, S, Z, g, L)
        low = [x.half() for x in (q, k, v, qf)]
        out = chunk_attention_normalised_triton(*low, S, Z, g, L)
        ref_low = chunk_attention_normalised_ref(*low, S, Z, g, L)
    _check(f"cuda {op} fp16 q fp32 S L{L} d{d} T{T}", out, ref32, ref_low)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("L,d", [(128, 64), (100, 64), (100, 128)])
def test_cuda_normalised(dtype, L, d):
    from bsbr_export.ops.kernel import chunk_attention_normalised_triton

    for T in (L - 1, L + 1, 4096 + 5):
        q, k, v, qf, S, Z, g = make_normalised_inputs(1, 12, T, d, L, seed=T, device="cuda")
        ref32 = chunk_attention_normalised_ref(q, k, v, qf, S, Z, g, L)
        low = [x.to(dtype) for x in (q, k, v, qf, S, Z)]
        out = chunk_attention_normalised_triton(*low, g, L)
        eps = _fp32_eps(ref32) if dtype == torch.float32 else 1e-5
        _check(f"cuda normalised {dtype} L{L} T{T}", out, ref32, chunk_attention_normalised_ref(*low, g, L), eps=eps)


@needs_triton
@pytest.mark.parametrize("op", ["plain", "normalised"])
def test_kernel_benchmark_smoke(op, tmp_path):
    """scripts/bench_kernel.py --quick under the interpreter: parity gate passes, table written."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "kernel_bench.md"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_kernel.py"), "--device", "cpu", "--quick",
                           "--op", op, "--output", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert f"benchmark: {op} op" in text and "parity FAILED" not in text and "fused kernel not run" not in text
    assert text.count("\n| ") >= 3  # header + the two quick lengths


def _worker(mode: str) -> None:
    """Subprocess entry point: run every case of `mode`, print one JSON line of results."""
    from bsbr_export.ops.kernel import is_interpreted

    assert is_interpreted() == (mode == "interpreter"), f"wrong Triton mode for the {mode} worker"
    torch.set_num_threads(1)
    if mode == "interpreter":
        cases = {case["id"]: (run_interpreter_case, case) for case in interpreter_cases()}
    else:
        cases = {str(case): (lambda c: compile_case(*c), case) for case in COMPILE_CASES}
    results = {}
    for key, (fn, case) in cases.items():
        try:
            results[key] = fn(case)
        except Exception as exc:  # reported per case by the parent test
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
