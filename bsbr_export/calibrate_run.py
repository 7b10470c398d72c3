"""The calibrate command's driver: convert (or load) the model, train what the conversion added
on the user's text until it stops improving, and write the calibrated checkpoint.

Stage 1 is attention transfer (``calibrate.transfer_loss``: the conversion's attention weights
against softmax's when the retrieval is normalised without compression, else the attention
outputs), each layer fed the original's hidden states. Stage 2 (optional) is KL distillation of
the next-token distributions (``calibrate.distill_loss``). Each stage trains the conversion's
parameters with Adam (``calibrate.training``) on a fresh random window of the training text per
step, evaluates its loss on the fixed held-out windows every ``eval_every`` steps, stops after
``patience`` evaluations without improvement (or at the budget: wall-clock minutes, steps) and
keeps the parameters of its best evaluation.

Every evaluation writes a checkpoint (the trainable parameters, Adam's state, the step, the
sampler's RNG state, the best so far) atomically to the work directory (``OUT.partial`` unless
given); the same command run again resumes from it. The output is written atomically at the end
(``save_bsbr``) with ``calibration.json`` beside config.json; then the checkpoint goes.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .calibrate_data import Corpus, load as load_corpus, sampled, sampled_plan
from .errors import ConfigError

CHECKPOINT = "checkpoint.pt"
SAMPLED = "sampled.npy"  # --self: the documents sampled from the original, kept for a resumed run
STAGES = {1: "attention transfer", 2: "KL distillation"}
# Stage 1's Adam learning rate per feature map: a hedgehog map starts far from where training
# takes it (the runs of docs/results/self-calibration-hedgehog*.md used 1e-2).
STAGE1_LR = {"hedgehog": 1e-2}
DEFAULT_LR = 1e-3
# Long windows of stage 2 (``Settings.long_every``): this many training windows joined, the
# original's targets over them from a sliding context (``calibrate.sliding_logp``), so that
# the retrieval learns what chunks beyond the original's positions are worth.
LONG_WINDOWS = 4
LONG_EVERY = 4  # 1 stage-2 step in 4 (docs/results/self-calibration-hedgehog-decay-long.md)
MIN_IMPROVEMENT = 1e-4  # relative: a held-out loss lower by less is no improvement


@dataclass
class Settings:
    seq_len: int | None = None  # default: min(1024, n_positions)
    batch_size: int = 1
    stage2: bool = False
    minutes: float | None = 30.0
    max_steps: int | None = None  # per stage
    eval_every: int = 50
    patience: int = 5
    lr: float | None = None  # stage 1; None: STAGE1_LR of the feature map
    lr_kl: float = 1e-3  # stage 2
    lr_g: float = 0.05
    warmup: int = 10
    heldout_windows: int = 8
    seed: int = 0
    self_tokens: int | None = None  # train on this many tokens sampled from the original (no --data)
    long_every: int | None = None  # stage 2: 1 step in long_every on a long window (0: never; None: LONG_EVERY)
    long_len: int | None = None  # its tokens; default LONG_WINDOWS x seq_len


@dataclass
class Plan:
    """Everything checked before any model is loaded."""

    model: str
    kind: str  # "hf": an HF GPT-2 converted here; "bsbr": an already converted directory
    original: str
    tokenizer_dir: Path
    options: dict
    allow_pickle: bool
    cfg: object  # the BSBRConfig of the model to calibrate
    corpus: Corpus
    out: Path
    work: Path
    work_given: bool  # --work: only the checkpoint file goes at the end, not the directory
    force: bool
    settings: Settings


def prepare(model: str, data, out: Path, settings: Settings, original: str | None = None, work: Path | None = None,
            force: bool = False, allow_pickle: bool = False, options: dict | None = None) -> Plan:
    """Check the output, the model, the options and the data (tokenised and split), loading no
    weights: every problem is a one-line ``BSBRExportError``."""
    from .convert import converted_config, converted_dir, hf_config, planned_config, recorded_original

    out = Path(out)
    options = dict(options or {})
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists (use --force to replace it)")
    p = Path(model)
    if converted_dir(p) is not None:
        if options:
            raise ConfigError(f"{p} is already converted; conversion options {sorted(options)} do not apply")
        cfg = converted_config(p)
        original = original or recorded_original(p)
        if original is None:
            raise ConfigError(f"{p} is a converted model that does not record its original GPT-2: pass "
                              f"--original (the HF GPT-2 it was converted from)")
        hf, orig_dir = hf_config(original)
        shape = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions")
        diff = [k for k in shape if hf.get(k, 1024 if k == "n_positions" else None) != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"--original {original} is not the model {p} was converted from ({', '.join(diff)} "
                              f"differ)")
        kind, tok_dir = "bsbr", p if (p / "tokenizer.json").is_file() else orig_dir
    else:
        if original is not None:
            raise ConfigError(f"--original is for a converted MODEL; {model} is the original itself")
        cfg, tok_dir = planned_config(model, **options)
        kind, original = "hf", model
    s = Settings(**asdict(settings))
    s.seq_len = s.seq_len or min(1024, cfg.n_positions)
    if s.lr is None:
        s.lr = STAGE1_LR.get(cfg.feature_map, DEFAULT_LR)
    asked = s.long_every is not None
    if not asked:  # long windows teach the retrieval beyond the position table: none when it stops there
        s.long_every = LONG_EVERY if s.stage2 and cfg.retrieval_until is None else 0
    if s.long_every:
        if not s.stage2:
            raise ConfigError("--long-every trains stage 2 on long windows: add --stage2")
        s.long_len = s.long_len or LONG_WINDOWS * s.seq_len
        if s.long_len <= s.seq_len or s.long_every < 1:
            raise ConfigError(f"long windows need --long-every >= 1 and --long-len above --seq-len {s.seq_len}, "
                              f"got {s.long_every} and {s.long_len}")
    if s.seq_len > cfg.n_positions:
        raise ConfigError(f"--seq-len {s.seq_len} is longer than the original's {cfg.n_positions} positions")
    exact = (1 + cfg.lookback) * cfg.chunk_size  # tokens the conversion computes exactly as GPT-2 does
    if s.seq_len <= exact:
        raise ConfigError(f"--seq-len {s.seq_len} lies within the {exact} tokens the conversion computes exactly "
                          f"as the original (chunk {cfg.chunk_size}, {cfg.local_window} window): there is nothing "
                          f"to calibrate; use a longer --seq-len or a smaller --chunk-size")
    if s.self_tokens is not None and data:
        raise ConfigError("--self trains on text sampled from the original: give it or --data, not both")
    if s.self_tokens is None and not data:
        raise ConfigError("no data: give --data PATH (your text) or --self (text sampled from the original)")
    # Sampled text needs the original loaded: ``run`` samples it (the corpus is None until then).
    corpus = load_corpus(data, tok_dir, s.seq_len, cfg.vocab_size, cfg.eos_token_id, s.seed) if data else None
    have = len(corpus.train) if corpus is not None else sampled_plan(s.self_tokens, s.seq_len, 1)[0] * s.seq_len
    if s.long_every and have < s.long_len:
        if asked:
            raise ConfigError(f"long windows of {s.long_len} tokens (--long-len) need at least that many training "
                              f"tokens, the data has {have}: lower --long-len or give more text")
        s.long_every, s.long_len = 0, None  # the default, where the text is too short for it: short windows only
    given = work is not None
    work = Path(work) if given else out.with_name(out.name + ".partial")
    return Plan(str(model), kind, str(original), Path(tok_dir), options, allow_pickle, cfg, corpus, out, work, given,
                force, s)


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fingerprint(plan: Plan) -> dict:
    s = plan.settings
    return {"model": str(Path(plan.model).resolve()) if Path(plan.model).exists() else plan.model,
            "original": plan.original, "config": plan.cfg.to_dict(), "data": plan.corpus.fingerprint(),
            "seq_len": s.seq_len, "batch_size": s.batch_size, "stage2": s.stage2, "lr": s.lr,
            "lr_kl": s.lr_kl, "lr_g": s.lr_g, "long_every": s.long_every, "long_len": s.long_len,
            "warmup": s.warmup, "heldout_windows": s.heldout_windows, "seed": s.seed}


def _metrics(hf, model, wins) -> dict:
    from .fidelity import agreement

    a = agreement(hf, model, wins)
    return {"top1": a["top1"][0], "kl_mean_nats": a["kl"][0], "ppl": a["ppl"], "ppl_original": a["ppl_ref"]}


def _metrics_line(m: dict) -> str:
    return (f"top-1 agreement {m['top1']:.1%}, mean KL {m['kl_mean_nats']:.4f} nats, perplexity "
            f"{m['ppl']:.3f} (original {m['ppl_original']:.3f})")


def _save_checkpoint(work: Path, state: dict) -> None:
    import torch

    from .util import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(work / CHECKPOINT, buf.getvalue())


def load_checkpoint(work: Path, fingerprint: dict) -> dict | None:
    """The work directory's checkpoint, checked to be this calibration's; None when there is none."""
    import torch

    f = work / CHECKPOINT
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{f}: unreadable checkpoint ({type(e).__name__}); remove it to start over") from None
    diff = [k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k]]
    if diff:
        raise ConfigError(f"{f} is the checkpoint of a different calibration ({', '.join(diff)} differ); remove "
                          f"{work} to start over, or rerun the command that wrote it")
    return state


class Stage:
    """One stage's loop: steps, evaluations, early stopping, checkpoints."""

    def __init__(self, k: int, loss_name: str, step_loss: Callable, eval_loss: Callable, budget_s: float,
                 plan: Plan, state: dict, log: Callable[[str], None], long: bool = False):
        self.k, self.loss_name, self.step_loss, self.eval_loss = k, loss_name, step_loss, eval_loss
        self.budget_s, self.plan, self.state, self.log, self.long = budget_s, plan, state, log, long
        self.step_s = self.eval_s = 0.0  # the longest step and the last evaluation: the budget keeps room for both

    def run(self, model) -> dict:
        import torch

        from .calibrate import keep_in_range, training

        s, st = self.plan.settings, self.state
        gen = torch.Generator().manual_seed(s.seed * 1009 + self.k)
        with training(model, "conversion", s.lr if self.k == 1 else s.lr_kl, s.lr_g) as (named, opt):
            params = dict(named)
            base = [g["lr"] for g in opt.param_groups]
            resume = st.get("current") if st.get("stage") == self.k else None
            if resume is not None:
                with torch.no_grad():
                    for n, v in resume["params"].items():
                        params[n].copy_(v)
                opt.load_state_dict(resume["opt"])
                gen.set_state(resume["rng"])
                cur = {k: resume[k] for k in ("step", "elapsed", "best", "bad", "history")}
            else:
                cur = {"step": 0, "elapsed": 0.0, "best": None, "bad": 0, "history": []}
            st["stage"] = self.k
            t0 = time.time() - cur["elapsed"]
            if resume is None:
                self._evaluate(cur, [], t0, params, opt, gen)
            losses, stop = [], None
            while stop is None:
                stop = self._stop(cur, t0)
                if stop is not None:
                    break
                for g, lr in zip(opt.param_groups, base):
                    g["lr"] = lr * min(1.0, (cur["step"] + 1) / s.warmup)
                n = s.long_len if self.long and cur["step"] % s.long_every == s.long_every - 1 else None
                t_step = time.time()
                x = self.plan.corpus.sample(gen, s.batch_size, n)
                model.train()
                loss = self.step_loss(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                keep_in_range(model)
                model.eval()
                losses.append(loss.item())
                cur["step"] += 1
                self.step_s = max(self.step_s, time.time() - t_step)
                if cur["step"] % s.eval_every == 0 or self._stop(cur, t0) is not None:
                    self._evaluate(cur, losses, t0, params, opt, gen)
                    losses = []
            with torch.no_grad():
                for n, v in cur["best"]["params"].items():
                    params[n].copy_(v)
        h0 = cur["history"][0]["heldout"]
        return {"stage": self.k, "name": STAGES[self.k], "loss": self.loss_name, "steps": cur["step"],
                "seconds": round(cur["elapsed"], 1), "initial_heldout_loss": h0,
                "best_heldout_loss": cur["best"]["loss"], "best_step": cur["best"]["step"], "stopped": stop,
                "evaluations": cur["history"]}

    def _stop(self, cur: dict, t0: float) -> str | None:
        s = self.plan.settings
        if cur["bad"] >= s.patience:
            return f"converged (no improvement in {s.patience} evaluations)"
        if s.max_steps is not None and cur["step"] >= s.max_steps:
            return f"max steps ({s.max_steps})"
        if time.time() - t0 + self.step_s + self.eval_s >= self.budget_s:
            return "time budget"
        return None

    def _evaluate(self, cur, losses, t0, params, opt, gen) -> None:
        s = self.plan.settings
        t_eval = time.time()
        ev = self.eval_loss()
        self.eval_s = time.time() - t_eval
        best = cur["best"]
        if best is None or ev < best["loss"] - max(1e-12, MIN_IMPROVEMENT * abs(best["loss"])):
            cur["best"] = {"loss": ev, "step": cur["step"],
                           "params": {n: p.detach().clone() for n, p in params.items()}}
            cur["bad"] = 0
        else:
            cur["bad"] += 1
        cur["elapsed"] = time.time() - t0
        train = sum(losses) / len(losses) if losses else None
        cur["history"].append({"step": cur["step"], "train": train, "heldout": ev,
                               "seconds": round(cur["elapsed"], 1)})
        left = self.budget_s - cur["elapsed"]
        if s.max_steps is not None and cur["step"]:
            left = min(left, (s.max_steps - cur["step"]) * cur["elapsed"] / cur["step"])
        eta = "" if not math.isfinite(left) else f", ETA <= {clock(max(0.0, left))}"
        tl = "-" if train is None else f"{train:.4f}"
        self.log(f"stage {self.k} ({STAGES[self.k]}) step {cur['step']}: train {tl}, held-out {ev:.4f} "
                 f"(best {cur['best']['loss']:.4f} at step {cur['best']['step']}), {clock(cur['elapsed'])} "
                 f"elapsed{eta}")
        self.state["current"] = {**cur, "params": {n: p.detach().clone() for n, p in params.items()},
                                 "opt": opt.state_dict(), "rng": gen.get_state()}
        _save_checkpoint(self.plan.work, self.state)


def run(plan: Plan, log: Callable[[str], None], model=None) -> dict:
    """Calibrate as planned and write ``plan.out``; returns what calibration.json holds. ``model``:
    the converted model, already in memory (the main command's ``--calibrate self``): calibrated in
    place and not written (``plan.out`` unused)."""
    import torch

    from . import __version__
    from .calibrate import distill_loss, sliding_logp, transfer_loss
    from .convert import convert, load_bsbr, save_bsbr
    from .fidelity import load_original, windows

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    s, hf, t_start = plan.settings, None, time.time()
    if plan.corpus is None:  # --self: sample the data from the original first (cached in the work dir)
        hf, _ = load_original(plan.original)
        n_train, n_held = sampled_plan(s.self_tokens, s.seq_len, s.heldout_windows)
        log(f"sampling {n_train + n_held} documents of {s.seq_len} tokens from the original "
            f"({n_held} held out)")
        plan.corpus = sampled(hf, s.self_tokens, s.seq_len, s.heldout_windows, s.seed,
                              _eos(plan.cfg), log, plan.work / SAMPLED)
    corpus = plan.corpus
    fp = _fingerprint(plan)
    state = load_checkpoint(plan.work, fp)
    if state is not None:
        cur = state.get("current") or {}
        log(f"resuming from {plan.work / CHECKPOINT}: stage {state['stage']} step {cur.get('step', 0)} "
            f"({clock(cur.get('elapsed', 0.0))} of training done)")
        state["resumed"] = state.get("resumed", 0) + 1
    else:
        state = {"fingerprint": fp, "stages": [], "resumed": 0}
    plan.work.mkdir(parents=True, exist_ok=True)

    how = " (converting it)" if plan.kind == "hf" else ""
    log(f"loading {plan.model}{how} and the original {plan.original}" if model is None else
        f"loading the original {plan.original}")
    keep = model is not None
    if not keep:
        model = (convert(plan.model, allow_pickle=plan.allow_pickle, **plan.options) if plan.kind == "hf"
                 else load_bsbr(plan.model))
    if hf is None:
        hf, _ = load_original(plan.original)
    wins = corpus.windows(s.heldout_windows)
    d = corpus.summary(len(wins))
    src = f"{d['files']} files" if d['files'] else d['paths'][0]
    log(f"data: {src}, {d['documents']} documents, {d['tokens_train']:,} training and "
        f"{d['tokens_heldout']:,} held-out tokens; {len(wins)} held-out windows of {s.seq_len} tokens")
    if "before" not in state:
        t_measure = time.time()
        state["before"] = _metrics(hf, model, wins)
        state["measure_s"] = time.time() - t_measure
    log(f"held-out before: {_metrics_line(state['before'])}")
    n_layer = model.cfg.n_layer
    cfg = model.cfg
    kind = "weights" if cfg.retrieval == "normalised" and cfg.compression is None else "output"

    def hidden(x):
        with torch.no_grad():
            return [t.float() for t in hf(input_ids=x, output_hidden_states=True).hidden_states[:n_layer]]

    def transfer_step(x):
        return sum(transfer_loss(b, h, kind) for b, h in zip(model.h, hidden(x)))

    def distill_step(x):  # a long window's targets: the original over a sliding context
        return distill_loss(model(x), sliding_logp(lambda i: hf(input_ids=i).logits, x, plan.cfg.n_positions))

    long_wins = []
    if s.long_every:
        long_wins = [w[:, :-1] for w in windows(corpus.heldout, s.long_len, 2)]
        n = len(long_wins)
        log(f"stage 2: 1 step in {s.long_every} on a window of {s.long_len} tokens; " +
            (f"{n} held-out window{'s' if n > 1 else ''} of {s.long_len} tokens" if n else
             "the held-out text holds no window that long: held-out loss on short windows only"))

    def heldout(step_loss, long=False):
        def ev():
            with torch.no_grad():
                short = sum(step_loss(x[:, :-1]).item() for x in wins) / len(wins)
                if not (long and long_wins):
                    return short
                return (short + sum(step_loss(x).item() for x in long_wins) / len(long_wins)) / 2
        return ev

    # The budget counts from the start (sampling, loading and the first measures included) and
    # keeps room for the last measures.
    total_s = (math.inf if s.minutes is None else
               60.0 * s.minutes - (time.time() - t_start) - state.get("measure_s", 0.0))
    if total_s <= 0:
        log(f"the budget of {s.minutes:g} min is spent before training (sampling, loading and measures took "
            f"{clock(time.time() - t_start)}): no step will run; give more minutes")
    stages = [(1, f"{kind} transfer loss", transfer_step)] + ([(2, "KL (nats)", distill_step)] if s.stage2 else [])
    for k, name, step_loss in stages:
        if any(r["stage"] == k for r in state["stages"]):
            continue
        spent = sum(r["seconds"] for r in state["stages"])
        budget = total_s / 2 if k == 1 and s.stage2 else total_s - spent
        if budget <= 0:  # spent before this stage began (the first log line of the run said why)
            log(f"stage {k}: {STAGES[k]}, skipped: no budget left")
            continue
        log(f"stage {k}: {STAGES[k]}, {name}" + ("" if not math.isfinite(budget) else f", budget {clock(budget)}"))
        long = k == 2 and bool(s.long_every)
        r = Stage(k, name, step_loss, heldout(step_loss, long), budget, plan, state, log, long).run(model)
        state["stages"].append(r)
        state.pop("current", None)
        log(f"stage {k} done: {r['steps']} steps, {clock(r['seconds'])}, {r['stopped']}; best held-out "
            f"{r['best_heldout_loss']:.4f} at step {r['best_step']} (from {r['initial_heldout_loss']:.4f})")
    after = _metrics(hf, model, wins)
    log(f"held-out after:  {_metrics_line(after)}")
    record = {"format": "bsbr-export calibration", "bsbr_export_version": __version__,
              "source": {"model": plan.model, "kind": plan.kind, "original": _where(plan.original)},
              "options": plan.options, "data": d,
              "training": {"trained": "the conversion's parameters (meta query/key projections, retrieval "
                                      "scale g, a learned feature map)",
                           **{k: v for k, v in asdict(s).items() if k != "seq_len"}},
              "stages": state["stages"],
              "heldout": {"windows": len(wins), "tokens_per_window": s.seq_len, "before": state["before"],
                          "after": after},
              "seconds": round(sum(r["seconds"] for r in state["stages"]), 1), "resumed": state["resumed"]}
    if not keep:
        save_bsbr(model, plan.out, tokenizer_from=plan.tokenizer_dir, force=plan.force,
                  extra={"calibration.json": json.dumps(record, indent=2) + "\n"})
    if plan.work_given:
        for name in (CHECKPOINT, SAMPLED):
            (plan.work / name).unlink(missing_ok=True)
    else:
        shutil.rmtree(plan.work, ignore_errors=True)
    return record


def _eos(cfg) -> int:
    """The token that ends a sampled document (and starts the next): the config's, else 0."""
    return next((t for t in (cfg.eos_token_id, cfg.bos_token_id) if t is not None), 0)


def _where(source: str) -> str:
    """A local original as an absolute path (so that a later run finds it from anywhere), a hub name as it is."""
    p = Path(source)
    return str(p.resolve()) if p.exists() else source


# --self's training tokens unless told otherwise: sampling them takes about a tenth of
# --calibrate self's 10 minutes on 2 cores (the runs of docs/results/self-calibration*.md).
SELF_TOKENS = 32768
# What a conversion calibrated here gets when the user names neither (docs/results/
# self-calibration-hedgehog*.md): the hedgehog map, trained, retrieves much better than elu + 1,
# and decay weights keep later chunks' agreement close to the first ones'.
CALIBRATION_DEFAULTS = {"feature_map": "hedgehog", "retrieval_weights": "decay"}


def calibration_options(model, options: dict) -> dict:
    """The conversion options of a calibration of ``model`` (``calibrate``, ``--calibrate self``):
    when ``model`` is converted here (not a converted directory) with the normalised retrieval
    (the default), ``options`` with ``CALIBRATION_DEFAULTS`` for what they do not name."""
    from .convert import converted_dir

    if converted_dir(model) is None and options.get("retrieval", "normalised") == "normalised":
        return {**options, **{k: v for k, v in CALIBRATION_DEFAULTS.items() if options.get(k) is None}}
    return dict(options)


def self_calibrate(model, source: str, options: dict, minutes: float, work: Path, log: Callable[[str], None],
                   tokens: int | None = None, original: str | None = None, stage2: bool = True,
                   seq_len: int | None = None, long_every: int | None = None, long_len: int | None = None) -> dict:
    """``--calibrate self`` of the main command and ``export``: ``run`` on the converted ``model``
    in memory (calibrated in place) with ``tokens`` training tokens sampled from the original
    (``SELF_TOKENS`` unless given), a budget of ``minutes`` (``stage2``: KL distillation after the
    transfer, which gets half, 1 step in ``long_every`` on long windows, ``LONG_EVERY`` unless given);
    the checkpoint lives in ``work`` (removed at the end). Returns the calibration record.
    ``options``: those the model was converted with (``calibration_options`` of the user's)."""
    settings = Settings(minutes=minutes, self_tokens=tokens or SELF_TOKENS, stage2=stage2, seq_len=seq_len,
                        long_every=long_every, long_len=long_len)
    plan = prepare(str(source), (), work / "calibrated", settings,
                   original=original, work=work, options=options)
    try:
        return run(plan, log, model=model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
