"""Benchmark the fused chunk-attention kernel against PyTorch.

Backends, all at the same (B, H, T, d) with chunk L, for one op (--op): ``plain``
(bsbr::ChunkAttention) or ``normalised`` (bsbr::ChunkAttentionNormalised, the default
conversion's op):
  fused   the Triton kernel (bsbr_export/ops/kernel.py)
  chunked vectorised PyTorch: plain: pad to C*L, SDPA is_causal on (B, H*C, L, d) chunks
          (4-D, so SDPA may pick its flash kernel), einsum retrieval term; normalised:
          the model's own path (bsbr_export.ops.chunk.chunk_attention_normalised)
  full    torch SDPA is_causal over the whole sequence: what BSBR replaces
          (a different op, so timed without a parity check)

Before timing a BSBR backend at a length, its output is compared with the fp32
reference (bsbr_export/ops/naive.py): at most 3x the distance of the
reference run on the same low-precision inputs. A backend that fails is not
timed at that length, and the script exits non-zero.

GPU:  python scripts/bench_kernel.py --device cuda [--op normalised] [--output docs/kernel_bench.md]
CPU smoke test: python scripts/bench_kernel.py --device cpu --quick
(the fused kernel joins on CPU only under Triton's interpreter: TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export.ops.chunk import chunk_attention, chunk_attention_normalised  # noqa: E402
from bsbr_export.ops.naive import (chunk_attention_normalised_ref, chunk_attention_ref,  # noqa: E402
                                   compare_to_baseline)
from bsbr_export.util import median_ms  # noqa: E402


def _flash_only():
    """SDPA restricted to its flash backend (torch >= 2.3), or no restriction where unavailable."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def full_causal_sdpa(q, k, v, *_) -> torch.Tensor:
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            with _flash_only():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d)
        except RuntimeError:  # no flash kernel for this card/shape: SDPA's own choice
            pass
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d)


def fused_backend(device: str, op: str):
    """The Triton kernel of ``op``, or (None, reason) when it cannot run here."""
    try:
        from bsbr_export.ops import kernel as kt

        kt.require_triton()
    except ImportError as exc:
        return None, str(exc)
    if device == "cpu" and not kt.is_interpreted():
        return None, "on CPU the kernel needs TRITON_INTERPRET=1"
    return (kt.chunk_attention_normalised_triton if op == "normalised" else kt.chunk_attention_triton), ""


def make_inputs(B, H, T, d, L, device, seed=0, op: str = "plain"):
    """The op's inputs, g last: plain (q, k, v, S, g); normalised (q, k, v, qf, S, Z, g)."""
    gen = torch.Generator().manual_seed(seed)
    C = math.ceil(T / L)
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))  # (B, H, T, d)
    S = torch.randn(B, H, C, d, d, generator=gen) / math.sqrt(d)  # (B, H, C, d, d)
    if op == "normalised":
        qf = F.elu(q) + 1.0
        Z = torch.rand(B, H, C, d, generator=gen) * L  # sums of positive features
        g = torch.rand(H, generator=gen) * 0.5
        return [x.to(device) for x in (q, k, v, qf, S, Z, g)]
    g = torch.rand(H, generator=gen) + 0.5  # (H,)
    return [x.to(device) for x in (q, k, v, S, g)]


OPS = {  # op -> (fp32 reference, vectorised torch path)
    "plain": (chunk_attention_ref, chunk_attention),
    "normalised": (chunk_attention_normalised_ref, chunk_attention_normalised),
}


def time_ms(fn, device: str, warmup: int, runs: int) -> float:
    """Median wall time of `fn()` in ms after `warmup` warm-up calls over `runs` runs: on GPU
    triton's ``do_bench`` (CUDA events, L2 cleared before each run), whose budgets are times:
    `runs` (`warmup`) times one timed call, at least its defaults of 100 ms (25 ms), so a short
    call runs more often; perf_counter on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        fn()  # compiles and allocates; its time sets do_bench's budgets
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=max(25.0, warmup * est), rep=max(100.0, runs * est), return_mode="median")
    return median_ms(fn, runs, warmup)


def bench_length(T, args, dtype, backends) -> dict:
    """Parity-check, then time, every backend at one sequence length."""
    *inputs, g = make_inputs(1, args.heads, T, args.head_dim, args.chunk, args.device, seed=T, op=args.op)
    reference = OPS[args.op][0]
    ref32 = reference(*inputs, g, args.chunk)
    low = [x.to(dtype) for x in inputs]
    ref_low = reference(*low, g, args.chunk)
    row = {"T": T}
    for name, fn, checked in backends:
        if checked:
            with torch.no_grad():
                nums = compare_to_baseline(fn(*low, g, args.chunk), ref32, ref_low)
            row[f"{name}_parity"] = nums
            if not nums["ok"]:
                row[name] = None
                continue
        with torch.no_grad():
            row[name] = time_ms(lambda: fn(*low, g, args.chunk), args.device, args.warmup, args.runs)
    del inputs, ref32, ref_low, low
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def header(args, dtype, fused_note: str) -> list[str]:
    if args.device == "cuda":
        where = f"GPU: {torch.cuda.get_device_name()}"
    else:
        where = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"# Fused chunk attention benchmark: {args.op} op",
        "",
        f"- {where}",
        f"- torch {torch.__version__}, triton {triton_version}",
        f"- batch 1, {args.heads} heads, head dim {args.head_dim}, chunk {args.chunk}, {dtype}, "
        + (f"median of {args.runs} runs after {args.warmup} warm-up runs" if args.device != "cuda" else
           f"median of triton.testing.do_bench over >= 100 ms or about {args.runs} runs, L2 cleared per run"),
        "- parity: max/mean |out - fp32 reference| within 3x the reference's own low-precision distance",
    ]
    if fused_note:
        lines.append(f"- fused kernel not run: {fused_note}")
    else:
        from bsbr_export.ops.kernel import launch_options

        cap = torch.cuda.get_device_capability() if args.device == "cuda" else None
        opts = launch_options(args.head_dim, dtype, dtype, args.chunk, cap)
        lines.append("- fused launch: " + ", ".join(f"{k} {v}" for k, v in opts.items()))
    return lines + [""]


def fmt_ms(x) -> str:
    return "parity FAILED" if x is None else ("-" if x == "-" else f"{x:.3f}")


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def table(rows) -> list[str]:
    lines = [
        "| T | fused (ms) | torch chunked (ms) | full causal SDPA (ms) | chunked / fused | SDPA / fused "
        "| fused max err (limit) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fused, chunked, full = r.get("fused", "-"), r.get("chunked", "-"), r.get("full", "-")
        p = r.get("fused_parity")
        parity = f"{p['err_max']:.2e} ({p['limit_max']:.2e})" if p else "-"
        lines.append(f"| {r['T']} | {fmt_ms(fused)} | {fmt_ms(chunked)} | {fmt_ms(full)} | "
                     f"{ratio(chunked, fused)} | {ratio(full, fused)} | {parity} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--op", choices=sorted(OPS), default="plain",
                   help="plain: bsbr::ChunkAttention; normalised: bsbr::ChunkAttentionNormalised")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--output", type=Path, default=None, help="also write the Markdown here")
    p.add_argument("--json", type=Path, default=None, help="also write the rows (times in ms, parity) as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.heads, args.head_dim, args.chunk = [64, 200], 2, 32, 48
        args.runs, args.warmup = 5, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --device cpu --quick)")
    if args.runs < 10 and not args.quick:
        p.error("--runs must be >= 10 for a reported number")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    fused, fused_note = fused_backend(args.device, args.op)
    backends = [("chunked", OPS[args.op][1], True), ("full", full_causal_sdpa, False)]
    if fused is not None:
        backends.insert(0, ("fused", fused, True))
    rows = []
    for T in args.lengths:
        rows.append(bench_length(T, args, dtype, backends))
        print(f"T={T} done", file=sys.stderr, flush=True)
    text = "\n".join(header(args, dtype, fused_note) + table(rows)) + "\n"
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"op": args.op, "dtype": str(dtype), "heads": args.heads,
                                         "head_dim": args.head_dim, "chunk": args.chunk, "fused_note": fused_note,
                                         "rows": rows}, indent=1))
    failed = [r["T"] for r in rows for name, _, checked in backends if checked and r.get(name, 0) is None]
    if failed:
        print(f"parity FAILED at T={sorted(set(failed))}: no speed reported there", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
