"""Small helpers every stage shares: atomic writes, timing, the machine, Markdown tables, KL.

Torch-free (numpy only), so the runtime and the benchmark's parent process can use them.
"""

from __future__ import annotations

import functools

import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- atomic writes

FILE_MODE = 0o644  # every file an export writes, whatever the writer's umask or tempfile's 0600
DIR_MODE = 0o755


@contextlib.contextmanager
def atomic_dir(out, force: bool = False, tag: str = "partial"):
    """Build a directory under a temporary name next to ``out``; rename it into place on success.

    Yields the temporary path. On any exception (Ctrl-C included) the temporary directory is
    removed and ``out`` is left as it was; with ``force`` an existing ``out`` is replaced only
    once the new one is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}.", dir=out.parent))
    try:
        yield tmp
        fix_modes(tmp)
        if out.exists():
            if not force:
                raise FileExistsError(f"{out}: already exists (use --force to replace it)")
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fix_modes(root) -> None:
    """Give every file below ``root`` FILE_MODE and every directory DIR_MODE (root included)."""
    root = Path(root)
    root.chmod(DIR_MODE)
    for p in root.rglob("*"):
        p.chmod(DIR_MODE if p.is_dir() else FILE_MODE)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------- timing

def summarize(times_ms: list[float]) -> dict:
    """Median, min, mean and spread of wall times in ms (the median is what tables report)."""
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms),
            "stdev_ms": statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
            "runs": len(times_ms), "times_ms": [round(t, 3) for t in times_ms]}


def time_calls(fn, warmup: int, runs: int, warm_fn=None) -> dict:
    """Wall time of ``fn()``: warm-up calls (of ``warm_fn`` if given), then ``runs`` timed calls; ms."""
    for _ in range(warmup):
        (warm_fn or fn)()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times) | {"warmup": warmup}


def median_ms(fn, runs: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return time_calls(fn, warmup, runs)["median_ms"]


# --------------------------------------------------------------------------- this process's memory

def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process (since the last ``reset_peak_rss``)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stages:
    """Wall time and peak RSS of each stage of a long job (for its manifest): the RSS high-water
    mark is reset when a stage starts, where the kernel allows it (``peak_is_stage_only``)."""

    def __init__(self):
        self.record: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        only = reset_peak_rss()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_bytes": peak_rss_bytes(),
                                 "peak_is_stage_only": only}


# --------------------------------------------------------------------------- the machine

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def machine_info() -> dict:
    """CPU model, SIMD flags, cores and memory: recorded with every table of timings."""
    model, flags, mem = None, "", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    simd = [f for f in SIMD_FLAGS if f" {f}" in f" {flags} "]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.processor() or platform.machine() or "unknown", "cores": cores,
            "cpu_count": os.cpu_count(), "simd": simd, "memory_bytes": mem, "platform": platform.platform()}


def machine_line(info: dict | None = None) -> str:
    """One line: 'CPU (flags), N cores, X GiB, platform'."""
    m = info or machine_info()
    mem = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    return (f"{m['cpu']} ({', '.join(m['simd']) or 'no AVX2'}), {m['cores']} cores{mem}, "
            f"{m['platform']}")


# --------------------------------------------------------------------------- Markdown

def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table, one line per row, ending in a newline."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- distributions

def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_from_logprobs(lp, lq):
    """KL(P || Q) over the last axis in nats, from log-probabilities: numpy arrays or torch tensors
    (the result has the inputs' type and precision)."""
    p = lp.exp() if hasattr(lp, "exp") else np.exp(lp)
    return (p * (lp - lq)).sum(-1)


# --------------------------------------------------------------------------- the C heap

@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, looked up once (``find_library`` runs ``ldconfig``: milliseconds a call)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _glibc(name: str, *args) -> bool:
    """Call one of glibc's malloc tuning functions; False where there is no such function."""
    fn = getattr(_libc(), name, None)
    return bool(fn(*args)) if fn is not None else False


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op):
    what torch freed after a reference row no longer counts while the candidate runs."""
    _glibc("malloc_trim", 0)


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve every C-heap allocation of ``threshold`` bytes or more by a mapping of its own,
    handed back to the system when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op returning
    False elsewhere). glibc's default raises that threshold each time a large block is freed (up
    to 32 MiB), after which the activations of a long run live on the heap, which then stays
    fragmented at its high-water mark: at the gpt2-medium shape, batch 3 x 1024 tokens, the
    parity session peaked at 4.21 GiB by default and 2.76 GiB with a 1 MiB threshold (and 4 MiB)."""
    M_MMAP_THRESHOLD = -3
    return _glibc("mallopt", M_MMAP_THRESHOLD, threshold)
