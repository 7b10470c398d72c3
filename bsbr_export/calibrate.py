"""Calibration of a converted model: train what the conversion added, against the original.

The student is the converted ``BSBRGPT2``; the teacher is the original GPT-2 (any callable
``input_ids -> logits``). The loss is the mean over positions of
``KL(P_teacher || P_student)`` of the next-token distributions, so calibration pulls the
converted model towards the original's behaviour rather than towards the data.

``what="conversion"`` trains only the parameters the conversion introduced: the meta
query/key projections (``meta_q``, ``meta_k``) and the per-head retrieval scale ``g``
and a learned feature map (``feature_map="learned"``; ``elu1``/``relu`` have no parameters) and the
per-head decay of ``retrieval_weights="decay"`` (kept in (0, 1] after every step).
``what="full"`` fine-tunes every
parameter. With the normalised retrieval, ``g`` is trained as ``exp(theta)`` at learning
rate ``lr_g`` (its shared denominator needs g > 0; scales that differ by orders of magnitude
are reached in a few steps).

``transfer`` is an optional first stage (attention transfer): each layer's conversion
parameters learn to imitate that layer's softmax attention, its weights or its output, with
the original's hidden states as inputs; ``calibrate`` then runs as the second stage.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .ops.chunk import bsbr_attention
from .ops.naive import normalised_log_weights

CONVERSION_PARAMS = ("attn.meta_q.", "attn.meta_k.", "attn.g", "attn.parametrizations.g.", "attn.fm.", "attn.decay")


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


@torch.no_grad()
def sliding_logp(teacher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int) -> torch.Tensor:
    """The original's next-token log-probs over input ids ``x`` (B, N) of any length: the original
    over ``window`` tokens at a time, each window advanced by ``window // 2``, so that every position
    past the first window is predicted from at least ``window // 2`` tokens before it (the original
    with a sliding context, which a long converted window should match, not beat by guessing).
    ``teacher``: input ids -> logits. (B, N, V)."""
    def logp(ids):
        return torch.log_softmax(teacher(ids).float(), -1)

    N = x.shape[1]
    if N <= window:
        return logp(x)
    half = max(1, window // 2)
    out, pos = [logp(x[:, :window])], window
    while pos < N:
        end = min(pos + half, N)
        lo = max(0, end - window)
        out.append(logp(x[:, lo:end])[:, pos - lo:])
        pos = end
    return torch.cat(out, 1)


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
    def target(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(teacher(x).float(), -1)

    return _train(model, lambda x, lp: distill_loss(model(x), lp), target, windows, passes, lr, what, lr_g,
                  after_pass, cache_teacher, warmup, log, progress, "KL")


TRANSFER_LOSSES = ("weights", "output")


def transfer_loss(block, hidden: torch.Tensor, loss: str = "weights") -> torch.Tensor:
    """Attention transfer for one layer, given the original's input to it (``hidden``, (B, T, E)):

    ``weights``: KL(softmax weights || the conversion's weights) per query, averaged (Hedgehog's
      objective; the conversion's weights from ``normalised_log_weights``, so normalised retrieval
      without compression only);
    ``output``: mean squared difference of the attention outputs (LoLCATs' first stage).
    The query/key/value projections are the original's, so only what the conversion added moves."""
    a, cfg = block.attn, block.attn.cfg
    x = block.ln_1(hidden)
    with torch.no_grad():
        q, k, v = a.qkv(x)
    r, h = a.meta(x)
    L = cfg.chunk_size
    if loss == "weights":
        if cfg.retrieval != "normalised" or a.U is not None:
            raise ValueError("weight transfer needs the normalised retrieval without compression")
        with torch.no_grad():
            T = q.shape[2]
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            log_a = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), -1)
        log_w = normalised_log_weights(q, k, r, h, a.g, L, a.fmap, cfg.local_window, cfg.retrieval_weights, a.decay,
                                       cfg.retrieving_chunks)
        kl = torch.where(causal, log_a.exp() * (log_a - log_w), torch.zeros_like(log_w))
        return kl.sum(-1).mean()
    if loss == "output":
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = bsbr_attention(q, k, v, r, h, a.g, L, a.U, retrieval=cfg.retrieval, feature_map=a.fmap,
                           local_window=cfg.local_window, retrieval_weights=cfg.retrieval_weights, decay=a.decay,
                           retrieving_chunks=cfg.retrieving_chunks)
        return F.mse_loss(o, ref)
    raise ValueError(f"transfer loss must be one of {TRANSFER_LOSSES}, got {loss!r}")


def transfer(model, hidden_states: Callable[[torch.Tensor], list[torch.Tensor]], windows: list[torch.Tensor],
             passes: int, loss: str = "weights", lr: float = 1e-3, lr_g: float = 0.05,
             after_pass: Callable[[int, object], None] | None = None, warmup: int = 10,
             log: CalibrationLog | None = None, progress: Callable[[str], None] | None = None) -> CalibrationLog:
    """Stage 1 of a two-stage calibration: every layer's conversion parameters trained at once to
    imitate the original's attention in that layer (``transfer_loss``, summed over layers), each
    layer fed the original's own hidden states, so no layer waits for the ones below to converge.
    ``hidden_states(x)``: the original's input to each block for input ids x (HF
    ``hidden_states[:n_layer]``). Windows must fit the original's positions. Stage 2 is
    ``calibrate`` (KL of the next-token distributions)."""
    if loss not in TRANSFER_LOSSES:
        raise ValueError(f"transfer loss must be one of {TRANSFER_LOSSES}, got {loss!r}")

    def target(x: torch.Tensor) -> list[torch.Tensor]:
        return [t.float() for t in hidden_states(x)[: len(model.h)]]

    def step_loss(x, hidden):
        return sum(transfer_loss(blk, hs, loss) for blk, hs in zip(model.h, hidden))

    return _train(model, step_loss, target, windows, passes, lr, "conversion", lr_g, after_pass, True, warmup,
                  log, progress, f"{loss} transfer loss")


@contextlib.contextmanager
def training(model, what: str = "conversion", lr: float = 1e-3, lr_g: float = 0.05):
    """The optimiser every calibration loop uses: yields ``(named, opt)``, the trainable
    ``(name, parameter)`` pairs and Adam over them (``lr``; a normalised g trained as exp(theta) at
    ``lr_g``, so ``named`` holds theta, ``...parametrizations.g.original``). On exit g is a plain
    parameter again (its trained value), every parameter requires grad and the model is in eval mode."""
    normalised = model.cfg.retrieval == "normalised"
    if normalised:
        # g > 0 is trained in log space: multiplicative steps, and it can never turn negative.
        for blk in model.h:
            with torch.no_grad():
                blk.attn.g.clamp_(min=1e-6)
            parametrize.register_parametrization(blk.attn, "g", _Exp())
    try:
        named = trainable(model, what)
        g_params = [p for n, p in named if n.endswith("attn.g") or "parametrizations.g" in n]
        rest = [p for n, p in named if not any(p is q for q in g_params)]
        groups = [{"params": rest, "lr": lr}, {"params": g_params, "lr": lr_g if normalised else lr}]
        yield named, torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    finally:
        if normalised:
            for blk in model.h:
                parametrize.remove_parametrizations(blk.attn, "g", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


@torch.no_grad()
def keep_in_range(model) -> None:
    """After an optimiser step: a learned decay (``retrieval_weights="decay"``) stays in (0, 1], as
    the config requires."""
    for blk in model.h:
        if getattr(blk.attn, "decay", None) is not None:
            blk.attn.decay.clamp_(1e-4, 1.0)


def _train(model, step_loss, target, windows, passes, lr, what, lr_g, after_pass, cache_teacher, warmup, log,
           progress, loss_name) -> CalibrationLog:
    """The loop both stages share: Adam over ``trainable(model, what)`` (``training``), g in log
    space when normalised, one window per step in a fixed shuffled order, the teacher's targets cached."""
    log = log or CalibrationLog()
    cache: dict[int, object] = {}

    def cached(i: int, x: torch.Tensor):
        if i in cache:
            return cache[i]
        with torch.no_grad():
            t = target(x)
        if cache_teacher:
            cache[i] = t
        return t

    order_gen = torch.Generator().manual_seed(0)
    with training(model, what, lr, lr_g) as (_, opt):
        # Linear warm-up over the first ``warmup`` steps, counted from the log's steps (a log handed
        # back in continues it): factor min(1, (step + 1) / warmup) on each group's lr.
        done = log.steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (done + s + 1) / warmup))
        for k in range(1, passes + 1):
            model.train()
            t0 = time.time()
            for i in torch.randperm(len(windows), generator=order_gen).tolist():
                x = windows[i]
                loss = step_loss(x, cached(i, x))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                keep_in_range(model)
                sched.step()
                log.steps += 1
                log.tokens += x.numel()
                log.losses.append(loss.item())
            log.seconds += time.time() - t0
            model.eval()
            if progress:
                n = len(windows)
                progress(f"pass {k}/{passes}: mean {loss_name} {sum(log.losses[-n:]) / n:.4f}, {log.seconds:.0f} s")
            if after_pass is not None:
                after_pass(k, model)
    return log


class _Exp(torch.nn.Module):
    """g = exp(theta); right_inverse gives theta = log g."""

    def forward(self, theta):
        return theta.exp()

    def right_inverse(self, g):
        return g.log()
