"""Reading a result dict: the look-ups every table, fit and target uses, and their number formats."""

from __future__ import annotations

from ..ops.state import kv_cache_bytes
from .spec import BACKENDS, MIB


def median(result: dict, backend: str, seq: int, batch: int = 1, key: str = "median_ms"):
    """``key`` (the median latency by default) of a timed prefill case; None if it was not timed."""
    for c in result["prefill"]:
        if c["backend"] == backend and c["seq"] == seq and c["batch"] == batch and c["status"] == "ok":
            return c[key]
    return None


def decode_mean(result: dict, backend: str, context: int):
    for c in result["decode"]:
        if c["backend"] == backend and c["context"] == context and c["status"] == "ok":
            return c["per_token_mean_ms"]
    return None


def decode_row(result: dict, backend: str, context: int):
    """The decode case of ``backend`` at ``context`` (any status); None if there is none."""
    return next((c for c in result["decode"] if c["backend"] == backend and c["context"] == context), None)


def decode_state_bytes(result: dict, context: int) -> tuple:
    """(BSBR state bytes, KV cache bytes) at ``context``: the BSBR state as a BSBR backend's
    decode row records it (``ops.state.StateSpec``), the KV cache from the model's sizes
    (``ops.state.kv_cache_bytes``, what every KV-cache backend holds); None where not measured."""
    bsbr = next((c["state_bytes"] for b in ("bsbr-ort", "bsbr-torch") for c in [decode_row(result, b, context)]
                 if c is not None and c["status"] == "ok"), None)
    m = result.get("model") or {}
    kv = kv_cache_bytes(m["n_layer"], m["n_embd"], context) if "n_layer" in m and "n_embd" in m else None
    return bsbr, kv


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(result: dict, backend: str, seq: int, batch: int = 1):
    """(fastest, slowest) timed run of a prefill case in ms; None if it was not timed."""
    t = median(result, backend, seq, batch, key="times_ms")
    return (min(t), max(t)) if t else None


def ratio_range(result: dict, num: str, den: str, seq: int):
    """The range of median(num) / median(den) over the runs: (fastest num / slowest den, slowest
    num / fastest den); None where either case has no runs."""
    a, b = times(result, num, seq), times(result, den, seq)
    return None if a is None or b is None else (a[0] / b[1], a[1] / b[0])


def fmt_range(r, fmt) -> str:
    return "" if r is None else f" ({fmt(r[0])}-{fmt(r[1])})"


def timed_backends(result: dict) -> list[str]:
    """Backends with a prefill row to show: timed, failed while timed, or stopped by the gate."""
    return [b for b in BACKENDS if any(c["backend"] == b and c["status"] in ("ok", "failed", "parity_failed")
                                       for c in result["prefill"])]


def lo_hi(result: dict) -> str:
    lo, hi = result.get("fit_range_used") or result["spec"]["fit_range"]
    return f"{lo}..{hi}"


def fmt_ms(v) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_mib(nbytes) -> str:
    v = nbytes / MIB
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def fmt_x(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def cell(result: dict, b: str, T: int, batch: int = 1, fmt=fmt_ms, key="median_ms", spread=False) -> str:
    """A prefill table cell: the formatted value (with ``spread``, the median and its runs'
    range), or why there is none."""
    for c in result["prefill"]:
        if c["backend"] == b and c["seq"] == T and c["batch"] == batch:
            if c["status"] == "ok":
                return fmt(c[key]) + (fmt_range(times(result, b, T, batch), fmt) if spread else "")
            return "parity FAILED" if c["status"] == "parity_failed" else c["status"]
    return "—"
