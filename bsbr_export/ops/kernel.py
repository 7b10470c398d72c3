"""Fused chunk attention as one Triton kernel.

    o[b,h,t] = sum_{s in chunk(t), s <= t} softmax_s(q_t . k_s / sqrt(d)) v_s
               + g[h] * (q_t @ S[b,h,chunk(t)])          chunk(t) = t // L

The normalised op (``bsbr::ChunkAttentionNormalised``, the default conversion) shares one
denominator between the two terms; the same kernel computes it with NORMALISED set:

    o[b,h,t] = (sum_s e^{q_t.k_s/sqrt(d)} v_s + g[h] qf_t @ S) / (sum_s e^{q_t.k_s/sqrt(d)} + g[h] qf_t . Z)

with qf = feature(q) and Z[b,h,chunk(t)] (d,), both scaled by e^{-M}, M = max(row max, 0).

With ``lookback=1`` (the look-back local window, ``bsbr::ChunkAttention[Normalised]Lookback``)
the softmax of t also covers every key of the chunk before t's: s from (chunk(t) - 1) L on.

One program handles one (batch*head, chunk, block of BLOCK_M queries): it
streams the chunk's keys in blocks of BLOCK_N with an online softmax (causal
inside the chunk, nothing outside it), then adds g * q @ S_chunk and writes
the block once. No L x L (let alone T x T) matrix reaches global memory.
T need not be a multiple of L, and L need not be a power of two: rows and
keys past the chunk's end are masked. The grid has one axis (B*H may exceed the
65,535 programs of CUDA's axis y); each program's base offsets are 64-bit, so
tensors of 2^31 elements or more do not wrap (`check_launch_bounds` rejects what
would still overflow). Block sizes, warps and stages come from declared tables per
GPU class (`kernel_config`); the products' precisions from `dot_precisions`.

Triton is optional. Importing this module works without it; calling
`chunk_attention_triton` then raises ImportError. On CPU the kernel runs under
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
triton is first imported.
"""

from __future__ import annotations

import torch

from bsbr_export.ops.naive import check_chunk_attention_args, check_chunk_attention_normalised_args

try:
    import triton
    import triton.language as tl
except ImportError:  # the wrapper reports it
    triton = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _chunk_attention_kernel(
        Q, K, V, S, G, O, QF, Z,
        sq_b, sq_h, sq_t,
        sk_b, sk_h, sk_t,
        sv_b, sv_h, sv_t,
        ss_b, ss_h, ss_c, ss_r,
        so_b, so_h, so_t,
        sf_b, sf_h, sf_t,  # qf strides (normalised only)
        sz_b, sz_h, sz_c,  # Z strides (normalised only)
        H, T, L, n_mblocks, n_cm,  # n_cm = chunks * query blocks per chunk
        qk_scale,  # log2(e) / sqrt(d): the softmax runs in base 2
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # q.k and p.v products
        STATE_PRECISION: tl.constexpr,  # q @ S (qf @ S): "ieee"/"tf32x3" when S is fp32
        NORMALISED: tl.constexpr = False,
        LOOKBACK: tl.constexpr = 0,  # earlier chunks (0 or 1) whose keys the softmax also covers
    ):
        # One grid axis (axis 1 would cap B*H at 65,535): pid -> (batch*head, chunk, query block).
        pid = tl.program_id(0)
        pid_bh = pid // n_cm
        pid_cm = pid % n_cm
        c = pid_cm // n_mblocks
        mb = pid_cm % n_mblocks
        # 64-bit per-program bases: b*stride_b + ... reaches 2^31 long before one (b, h, chunk)
        # block does; the in-block offsets below stay 32-bit (the wrapper checks their bound).
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        c = c.to(tl.int64)
        chunk_start = c * L
        chunk_len = tl.minimum(L, T - chunk_start).to(tl.int32)  # last chunk may be short

        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query index inside the chunk
        offs_d = tl.arange(0, D)
        row_ok = offs_m < chunk_len

        q_ptrs = Q + (b * sq_b + h * sq_h + chunk_start * sq_t) + offs_m[:, None] * sq_t + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

        k_base = K + (b * sk_b + h * sk_h + chunk_start * sk_t)
        v_base = V + (b * sv_b + h * sv_h + chunk_start * sv_t)
        # Causal: this query block never looks past its own last row. Look-back: the keys start at
        # the previous chunk's first (offsets relative to this chunk's start, so negative there).
        hi = tl.minimum((mb + 1) * BLOCK_M, chunk_len)
        if LOOKBACK:
            lo = -(tl.minimum(c, LOOKBACK) * L).to(tl.int32)
        else:
            lo = 0
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < chunk_len
            k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            # The range's first key is allowed for every row: a finite max after the first block.
            allowed = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        s_ptrs = S + (b * ss_b + h * ss_h + c * ss_c) + offs_d[:, None] * ss_r + offs_d[None, :]
        state = tl.load(s_ptrs)  # (D, D)
        g = tl.load(G + h).to(tl.float32)
        if NORMALISED:
            # (e^{m-M} acc + g e^{-M} qf S) / (e^{m-M} l + g e^{-M} qf . Z), M = max(m, 0), base 2.
            qf_ptrs = QF + (b * sf_b + h * sf_h + chunk_start * sf_t) + offs_m[:, None] * sf_t + offs_d[None, :]
            qf = tl.load(qf_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
            z = tl.load(Z + (b * sz_b + h * sz_h + c * sz_c) + offs_d).to(tl.float32)  # (D,)
            retrieved = tl.dot(qf.to(state.dtype), state, input_precision=STATE_PRECISION)  # (BLOCK_M, D)
            m_top = tl.maximum(m_i, 0.0)
            wa = tl.exp2(m_i - m_top)
            wb = g * tl.exp2(-m_top)
            den = wa * l_i + wb * tl.sum(qf.to(tl.float32) * z[None, :], 1)
            o = (wa[:, None] * acc + wb[:, None] * retrieved) / den[:, None]
        else:
            # Retrieval term: g[h] * q @ S[b, h, c]
            retrieved = tl.dot(q.to(state.dtype), state, input_precision=STATE_PRECISION)  # (BLOCK_M, D)
            o = acc / l_i[:, None] + g * retrieved
        o_ptrs = O + (b * so_b + h * so_h + chunk_start * so_t) + offs_m[:, None] * so_t + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])


def require_triton() -> None:
    """Raise ImportError with the install command when Triton is missing."""
    if triton is None:
        raise ImportError("Triton is not installed: pip install triton (CPU tests use TRITON_INTERPRET=1)")


def is_interpreted() -> bool:
    """True when the kernel was built under Triton's CPU interpreter."""
    return triton is not None and type(_chunk_attention_kernel).__name__ == "InterpretedFunction"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_kernel_args(q, k, v, S, g) -> None:
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d={d} is not supported by the Triton kernel; use one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if S.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"S must be {q.dtype} or float32, got {S.dtype}")
    if not g.dtype.is_floating_point:
        raise ValueError(f"g must be a float tensor, got {g.dtype}")
    devices = {x.device for x in (q, k, v, S, g)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type == "cpu" and not is_interpreted():
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")


# Launch configurations per GPU class, (q dtype, head dim class) -> block sizes, warps, stages.
# Declared, not autotuned at run time: the TensorRT plugin launches inside enqueue (no
# benchmarking there, and CUDA-graph capture must see one launch), and every configuration
# here is compiled by tests/test_kernel.py for its architecture and kept under its shared
# memory (Ampere sm_80/86/89: 100 KB, Hopper sm_90: 227 KB). BLOCK_M/BLOCK_N are caps:
# a short chunk gets the next power of two >= L (at least 16). scripts/gpu_check.py times
# the candidates of the card it runs on and reports the fastest, to update these tables.
#   "small" d <= 64, "large" d = 128.
AMPERE_CONFIGS = {
    (torch.float16, "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    (torch.float16, "large"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    (torch.float32, "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    (torch.float32, "large"): {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
}
HOPPER_CONFIGS = {
    (torch.float16, "small"): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    (torch.float16, "large"): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    (torch.float32, "small"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (torch.float32, "large"): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
}
# Candidates scripts/gpu_check.py times on a real card (fp16, the benchmark's shape).
TUNING_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
    for bm, bn in ((64, 64), (128, 64), (128, 32), (64, 32)) for w in (4, 8) for st in (2, 3)
]
INT32_MAX = 2**31 - 1


def kernel_config(chunk_size: int, d: int, dtype: torch.dtype, capability: tuple | None = None) -> dict:
    """Block sizes, warps and stages for one launch.

    ``capability``: the GPU's (major, minor); None (CPU, the interpreter, or compiling
    without a GPU) takes the Ampere table, which every GPU from sm_80 on can run.
    """
    table = HOPPER_CONFIGS if capability is not None and tuple(capability) >= (9, 0) else AMPERE_CONFIGS
    cfg = dict(table[(torch.float32 if dtype == torch.float32 else torch.float16, "large" if d > 64 else "small")])
    fit = max(16, triton.next_power_of_2(chunk_size))
    cfg["BLOCK_M"], cfg["BLOCK_N"] = min(cfg["BLOCK_M"], fit), min(cfg["BLOCK_N"], fit)
    return cfg


def dot_precisions(dtype: torch.dtype, s_dtype: torch.dtype, allow_tf32: bool = False) -> dict:
    """``input_precision`` of the kernel's products (Triton's ``tl.dot``).

    fp16 q/k/v: the local products are fp16 tensor-core dots (the precision flag does not
    apply). fp32 q/k/v: IEEE fp32 by default; ``allow_tf32`` uses TF32 tensor cores (10-bit
    mantissa, about 5e-4 relative error: outside the fp32 parity bound of the tests, so it
    is opt-in). The retrieval product q @ S with fp32 S and fp16 q would be rounded to TF32
    on a GPU (but not under the interpreter, which computes in fp32): it uses "tf32x3"
    (three TF32 products, about fp32 accuracy, still on tensor cores) instead.
    """
    if dtype == torch.float32:
        local = "tf32" if allow_tf32 else "ieee"
        return {"DOT_PRECISION": local, "STATE_PRECISION": local}
    return {"DOT_PRECISION": "tf32", "STATE_PRECISION": "tf32x3" if s_dtype == torch.float32 else "tf32"}


def launch_options(d: int, dtype: torch.dtype, s_dtype: torch.dtype | None = None, chunk_size: int = 128,
                   capability: tuple | None = None, allow_tf32: bool = False) -> dict:
    """Compile-time options shared by the launch and the ahead-of-time compile check."""
    return {**kernel_config(chunk_size, d, dtype, capability),
            **dot_precisions(dtype, s_dtype if s_dtype is not None else dtype, allow_tf32)}


def check_launch_bounds(tensors: dict, B: int, H: int, T: int, chunk_size: int, block_m: int,
                        lookback: int = 0) -> None:
    """Raise ValueError when a launch would overflow what the kernel indexes in 32 bits.

    Per-program bases (b * stride_b + h * stride_h + chunk_start * stride_t) are 64-bit, so
    no tensor size wraps them; what stays 32-bit is the offset inside one (b, h, chunk)
    block, at most ((1 + lookback) L + BLOCK_M) rows times the time stride, and the program count.
    ``tensors``: name -> (B, H, T, d) tensor.
    """
    n_programs = B * H * triton.cdiv(T, chunk_size) * triton.cdiv(chunk_size, block_m)
    if n_programs > INT32_MAX:
        raise ValueError(f"grid of {n_programs} programs exceeds 2^31 - 1: split the batch")
    for name, x in tensors.items():
        inner = ((1 + lookback) * chunk_size + block_m) * abs(x.stride(2)) + x.shape[-1]
        if inner > INT32_MAX:
            raise ValueError(f"{name}: one chunk spans {inner} elements (>= 2^31) at strides {x.stride()}; "
                             "make it contiguous or use a shorter chunk")


def chunk_attention_triton(q, k, v, S, g, chunk_size: int, out: torch.Tensor | None = None,
                           allow_tf32: bool = False, config: dict | None = None, lookback: int = 0) -> torch.Tensor:
    """Fused chunk attention (see module docstring); same contract as `chunk_attention_ref`.

    q, k, v: (B, H, T, d) fp16/fp32, d in {16, 32, 64, 128}; S: (B, H, C, d, d) of q's dtype
    or fp32; g: (H,). Any strides work as long as they can be given per dimension (the last
    dimension is made contiguous if needed). `out`, if given, is a (B, H, T, d) tensor of
    q's dtype with a contiguous last dimension that receives the result (used by the
    TensorRT plugin). ``allow_tf32``: fp32 inputs on TF32 tensor cores (see `dot_precisions`).
    ``config``: block sizes/warps/stages replacing `kernel_config`'s (tuning only).
    ``lookback``: 1 for the look-back local window (``ops.chunk.chunk_attention(..., lookback=1)``).
    Launches on the current torch stream.
    """
    require_triton()
    check_chunk_attention_args(q, k, v, S, g, chunk_size)
    _check_kernel_args(q, k, v, S, g)
    return _launch(q, k, v, S, g, chunk_size, out, None, None, allow_tf32, config, lookback)


def chunk_attention_normalised_triton(q, k, v, qf, S, Z, g, chunk_size: int,
                                      out: torch.Tensor | None = None, allow_tf32: bool = False,
                                      config: dict | None = None, lookback: int = 0) -> torch.Tensor:
    """The normalised op (module docstring); same contract as `chunk_attention_normalised_ref`.

    As `chunk_attention_triton`, plus qf = feature(q) (B, H, T, d) of q's dtype and
    Z: (B, H, C, d) of S's dtype; g >= 0. Accumulates in fp32 whatever the input dtype.
    """
    require_triton()
    check_chunk_attention_normalised_args(q, k, v, qf, S, Z, g, chunk_size)
    _check_kernel_args(q, k, v, S, g)
    if qf.dtype != q.dtype or Z.dtype != S.dtype or qf.device != q.device or Z.device != q.device:
        raise ValueError(f"qf must match q ({q.dtype}) and Z must match S ({S.dtype}), on q's device")
    qf, Z = _last_dim_contiguous(qf), _last_dim_contiguous(Z)
    return _launch(q, k, v, S, g, chunk_size, out, qf, Z, allow_tf32, config, lookback)


def _capability(x: torch.Tensor):
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


def _launch(q, k, v, S, g, chunk_size, out, qf, Z, allow_tf32=False, config=None, lookback=0):
    if lookback not in (0, 1):
        raise ValueError(f"lookback must be 0 or 1, got {lookback!r}")
    q, k, v, S = (_last_dim_contiguous(x) for x in (q, k, v, S))
    g = g.contiguous()
    B, H, T, d = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q's shape and dtype, with a contiguous last dimension")
    normalised = qf is not None
    if not normalised:  # unused by the kernel: any valid pointer and zero strides
        qf, Z = q, g
    f_strides = (qf.stride(0), qf.stride(1), qf.stride(2)) if normalised else (0, 0, 0)
    z_strides = (Z.stride(0), Z.stride(1), Z.stride(2)) if normalised else (0, 0, 0)

    opts = launch_options(d, q.dtype, S.dtype, chunk_size, _capability(q), allow_tf32)
    if config is not None:
        opts.update(config)
    n_mblocks = triton.cdiv(chunk_size, opts["BLOCK_M"])
    n_cm = triton.cdiv(T, chunk_size) * n_mblocks
    named = {"q": q, "k": k, "v": v, "out": out}
    if normalised:
        named["qf"] = qf
    check_launch_bounds(named, B, H, T, chunk_size, opts["BLOCK_M"], lookback)
    grid = (B * H * n_cm,)
    _chunk_attention_kernel[grid](
        q, k, v, S, g, out, qf, Z,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        S.stride(0), S.stride(1), S.stride(2), S.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        *f_strides, *z_strides,
        H, T, chunk_size, n_mblocks, n_cm,
        _LOG2E / d**0.5,
        D=d,
        NORMALISED=normalised,
        LOOKBACK=lookback,
        **opts,
    )
    return out
