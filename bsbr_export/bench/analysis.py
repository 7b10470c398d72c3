"""Analysis of a finished run: scaling exponents, speedups, ratios to the dense floor, target verdicts."""

from __future__ import annotations

import numpy as np

from .results import median, ratio
from .spec import BACKENDS
from .targets import targets

SPEEDUPS = (("bsbr-ort", "hf-ort"), ("bsbr-ort", "hf-torch"), ("bsbr-torch", "hf-torch"),
            ("hf-ort", "hf-torch"))


def loglog_slope(xs, ys) -> tuple[float, float]:
    """Least-squares exponent p of y = a x^p, and the fit's r^2 in log space."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    p, c = np.polyfit(lx, ly, 1)
    resid = ly - (p * lx + c)
    tot = ((ly - ly.mean()) ** 2).sum()
    return float(p), float(1.0 - (resid ** 2).sum() / tot) if tot > 0 else 1.0


def analyse(result: dict) -> None:
    """Scaling exponents, speedups, ratios to the floor and the target verdicts (in place)."""
    spec = result["spec"]
    lengths = sorted(spec["lengths"])
    lo, hi = spec["fit_range"]
    if sum(lo <= T <= hi for T in lengths) < 2:  # lengths that miss the range: fit over all of them
        lo, hi = lengths[0], lengths[-1]
    result["fit_range_used"] = [lo, hi]
    scaling = {}
    for b in BACKENDS:
        pts = [(T, median(result, b, T)) for T in lengths if lo <= T <= hi]
        pts = [(T, m) for T, m in pts if m is not None]
        if len(pts) >= 2:
            p, r2 = loglog_slope(*zip(*pts))
            scaling[b] = {"exponent": p, "r2": r2, "lengths": [T for T, _ in pts]}
    result["scaling"] = scaling
    result["speedups"] = {f"{a}/{b}": {str(T): ratio(median(result, b, T), median(result, a, T))
                                       for T in lengths} for a, b in SPEEDUPS}
    result["vs_floor"] = {b: {str(T): ratio(median(result, b, T), median(result, "floor-ort", T))
                              for T in lengths} for b in BACKENDS if b != "floor-ort"}
    result["targets"] = targets(result)
