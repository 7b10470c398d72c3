"""Calibration of a converted model: train what the conversion added, against the original.

The student is the converted ``BSBRGPT2``; the teacher is the original GPT-2 (any callable
``input_ids -> logits``). The loss is the mean over positions of
``KL(P_teacher || P_student)`` of the next-token distributions, so calibration pulls the
converted model towards the original's behaviour rather than towards the data.

``what="conversion"`` trains only the parameters the conversion introduced: the meta
query/key projections (``meta_q``, ``meta_k``) and the per-head retrieval scale ``g``
(the feature maps ``elu1``/``relu`` have no parameters). ``what="full"`` fine-tunes every
parameter. With the normalised retrieval, ``g`` is trained as ``exp(theta)`` at learning
rate ``lr_g`` (its shared denominator needs g > 0; scales that differ by orders of magnitude
are reached in a few steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

CONVERSION_PARAMS = ("attn.meta_q.", "attn.meta_k.", "attn.g", "attn.parametrizations.g.")


def trainable(model, what: str = "conversion") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs that calibration updates; freezes every other parameter."""
    if what not in ("conversion", "full"):
        raise ValueError(f"what must be 'conversion' or 'full', got {what!r}")
    out = []
    for name, p in model.named_parameters():
        train = what == "full" or any(k in name for k in CONVERSION_PARAMS)
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    return out


def distill_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) in nats; teacher given as log-probs (..., V)."""
    lq = torch.log_softmax(student_logits.float(), -1).flatten(0, -2)
    return F.kl_div(lq, teacher_logp.flatten(0, -2), log_target=True, reduction="batchmean")


@dataclass
class CalibrationLog:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)


def calibrate(model, teacher: Callable[[torch.Tensor], torch.Tensor], windows: list[torch.Tensor], passes: int,
              lr: float = 1e-3, what: str = "conversion", lr_g: float = 0.05, after_pass: Callable[[int, object], None] | None = None,
              cache_teacher: bool = True, warmup: int = 10, log: CalibrationLog | None = None,
              progress: Callable[[str], None] | None = None) -> CalibrationLog:
    """Train ``model`` for ``passes`` passes over ``windows`` (each (1, T) input ids), one
    window per step, Adam at a constant ``lr`` (``lr_g`` for a normalised g) after a linear warmup. ``after_pass(k, model)``
    runs after pass k (1-based), with the model in eval mode."""
    normalised = model.cfg.retrieval == "normalised"
    if normalised:
        # g > 0 is trained in log space: multiplicative steps, and it can never turn negative.
        for blk in model.h:
            with torch.no_grad():
                blk.attn.g.clamp_(min=1e-6)
            parametrize.register_parametrization(blk.attn, "g", _Exp())
    named = trainable(model, what)
    g_params = [p for n, p in named if n.endswith("attn.g") or "parametrizations.g" in n]
    rest = [p for n, p in named if not any(p is q for q in g_params)]
    groups = [{"params": rest, "base_lr": lr}, {"params": g_params, "base_lr": lr_g if normalised else lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    log = log or CalibrationLog()
    cache: dict[int, torch.Tensor] = {}

    def target(i: int, x: torch.Tensor) -> torch.Tensor:
        if i in cache:
            return cache[i]
        with torch.no_grad():
            lp = torch.log_softmax(teacher(x).float(), -1)
        if cache_teacher:
            cache[i] = lp
        return lp

    order_gen = torch.Generator().manual_seed(0)
    for k in range(1, passes + 1):
        model.train()
        t0 = time.time()
        for i in torch.randperm(len(windows), generator=order_gen).tolist():
            x = windows[i]
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * min(1.0, (log.steps + 1) / warmup)
            loss = distill_loss(model(x), target(i, x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.steps += 1
            log.tokens += x.numel()
            log.losses.append(loss.item())
        log.seconds += time.time() - t0
        model.eval()
        if progress:
            n = len(windows)
            progress(f"pass {k}/{passes}: mean KL {sum(log.losses[-n:]) / n:.4f}, {log.seconds:.0f} s")
        if after_pass is not None:
            after_pass(k, model)
    if normalised:
        for blk in model.h:
            parametrize.remove_parametrizations(blk.attn, "g", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return log


class _Exp(torch.nn.Module):
    """g = exp(theta); right_inverse gives theta = log g."""

    def forward(self, theta):
        return theta.exp()

    def right_inverse(self, g):
        return g.log()
