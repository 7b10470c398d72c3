"""The whole job behind ``bsbr-export MODEL --engine ...``: convert, export, check, build.

Every option and path is checked before any work. Everything is written into a
temporary directory beside ``out`` (``.OUT.partial.*``, under the lock ``.OUT.lock``) and
renamed into place at the end, so an interrupted or failed run never leaves a directory
that looks valid; the next run to the same ``out`` removes what a killed one left. ``manifest.json`` records versions, options, file hashes, the
parity results and the conversion's fidelity to the original GPT-2 (``fidelity.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import BSBRExportError, ConfigError, ModelLoadError
from .runtime import TorchHalfRunner

ENGINES = ("onnx", "fp32", "fp16", "int8")
CALIBRATIONS = ("none", "self")  # --calibrate: none, or on text sampled from the original (calibrate_run)


class ParityError(BSBRExportError):
    """A backend disagrees with PyTorch beyond tolerance; the message holds the failing cases."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    from . import __version__

    v = {"bsbr_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import tensorrt

        v["tensorrt"] = tensorrt.__version__
    except ImportError:
        v["tensorrt"] = None
    return v


def heldout_text(model_dir: Path | None) -> np.ndarray | None:
    """Held-out token ids shipped with a model directory (the bundled model has them)."""
    if model_dir is not None and (Path(model_dir) / "heldout_ids.npy").is_file():
        return np.load(Path(model_dir) / "heldout_ids.npy").astype(np.int64)
    return None


def parity_onnx(reference, onnx_path, max_len, text_ids, precision="fp32", threads=None, progress=None,
                lengths=None, batches=(1, 3)) -> dict:
    """ORT vs torch fp32 on the grid. fp16 tolerance: 3x the torch-fp16 distance, measured per case.

    ``reference``: the torch model (run live, beside the session) or a ``RecordedReference``
    made by ``record_reference`` (the model already freed; its fp16 baseline recorded with it).
    """
    from .check import RecordedReference, check_parity, lean_ort_runner
    from .runtime import TorchRunner

    if isinstance(reference, RecordedReference):
        cfg, ref = reference.cfg, reference
        baseline = reference.baseline if precision != "fp32" else None
        if precision != "fp32" and baseline is None:
            raise ValueError("an fp16 check needs the fp16 baseline recorded with the reference")
    else:
        cfg, ref = reference.cfg, TorchRunner(reference)
        baseline = TorchHalfRunner(reference) if precision != "fp32" else None
    with lean_ort_runner(onnx_path, threads=threads) as cand:
        report = check_parity(ref, cand, chunk=cfg.chunk_size, max_len=max_len, vocab=cfg.vocab_size,
                              text_ids=text_ids, precision=precision, progress=progress, lengths=lengths,
                              batches=batches, baseline=baseline)
    report["candidate"] = f"onnxruntime {Path(onnx_path).name}"
    return report


def record_reference(model, path, max_len, text_ids, fp16_baseline: bool, progress=None):
    """Run the torch model (and its fp16 copy) over the whole parity grid once, keeping the
    logits in ``path``; the model can be freed afterwards (``parity_onnx`` takes the record)."""
    from .check import BATCHES, RecordedReference, grid_cases
    from .runtime import TorchRunner

    cfg = model.cfg
    inputs = [ids for *_, ids in grid_cases(cfg.chunk_size, max_len, cfg.vocab_size, text_ids, BATCHES)]
    rec = RecordedReference(path, cfg)
    baseline = TorchHalfRunner(model) if fp16_baseline else None
    rec.record(TorchRunner(model), inputs, baseline=baseline, progress=progress)
    return rec


def reference_mode(cfg, max_len: int, engine: str, where: Path, choice: str = "auto") -> dict:
    """Where the torch reference lives while the graphs are checked, with the estimates behind
    the choice: "memory" (the torch model beside each ONNX session) or "disk" (its logits
    recorded first, the model freed before any session is created: the weights are held once).
    ``auto`` takes disk whenever the disk has room for twice the record: the torch copy of the
    weights is then never held beside the session's, at the cost of writing and reading the
    record (docs/results/gpt2-family.md gives each GPT-2 size's peaks and times this way)."""
    from .check import BATCHES, record_bytes

    est = {mode: estimate_peak(cfg, max_len, engine, recorded=mode == "disk") for mode in ("memory", "disk")}
    need = record_bytes(cfg, max_len, BATCHES)
    where = Path(where)
    while not where.exists():  # the output's parent may not exist yet: its nearest existing ancestor
        where = where.parent
    free = shutil.disk_usage(where).free
    if choice == "auto":
        choice = "disk" if free >= 2 * need else "memory"
    elif choice == "disk" and free < need:
        raise ConfigError(f"--parity-reference disk: the reference logits need {need / 2**30:.1f} GiB, "
                          f"{where} has {free / 2**30:.1f} GiB free")
    elif choice not in ("memory", "disk"):
        raise ConfigError(f"--parity-reference must be auto, memory or disk, got {choice!r}")
    return {"mode": choice, "record_bytes": need if choice == "disk" else 0,
            "estimated_peak_bytes": est, "session": None}


def check_output(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before any work: an existing file, an
    existing directory without ``force``, a path under a file, or a read-only directory."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"{out} is an existing file; --out must name a directory")
        if not force:
            raise ConfigError(f"{out} already exists (use --force to replace it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out}: cannot be created, {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: cannot be created, {parent} is not writable")


def check_tensorrt(engine: str) -> None:
    """Refuse ``--engine fp32|fp16`` before any work when TensorRT cannot be imported, saying
    what to do instead."""
    from .trt import TensorRTNotInstalled, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTNotInstalled as e:
        raise ConfigError(f"--engine {engine} builds a TensorRT engine: {str(e).splitlines()[0]}; "
                          f"or use --engine onnx or int8 (ONNX Runtime), or add --onnx-only to write and "
                          f"check the {engine} graphs without an engine") from None


def estimate_peak(cfg, max_len: int, engine: str = "onnx", recorded: bool = False) -> int:
    """The parity grid's estimated peak for an engine (fp16 adds the torch fp16 baseline and the
    fp16 graph's check)."""
    from .check import BATCHES, peak_bytes

    need = peak_bytes(cfg, max_len, BATCHES, recorded=recorded)
    if engine == "fp16":
        need = max(need, peak_bytes(cfg, max_len, BATCHES, baseline=True, fp16=True, recorded=recorded))
    return need


def check_memory(cfg, max_len: int, engine: str = "onnx", log=print, what: str = "--max-seq-len",
                 recorded: bool = False) -> int:
    """Estimate the parity grid's peak memory, say it, and refuse when the machine cannot hold it."""
    from .check import BATCHES, available_bytes, gib

    need = estimate_peak(cfg, max_len, engine, recorded)
    have = available_bytes()
    case = f"batch {max(BATCHES)} x {max_len} tokens"
    if have is not None and need > have:
        raise ConfigError(f"{what} {max_len}: the parity check's largest case ({case}) needs about {gib(need)}, "
                          f"more than the {gib(have)} this machine has available; use a smaller {what}")
    log(f"    parity memory: about {gib(need)} at most ({case}"
        + (", torch reference recorded to disk first" if recorded else "") + ")"
        + (f", {gib(have)} available" if have is not None else ""))
    return need


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold ``.OUT.lock`` beside ``out`` for the whole run; a second writer fails at once, naming
    the first (its pid). The lock file is never removed (its pid is cleared on release): a writer
    that opened it before a release then locks the same file as one that opens it after, so two
    writers can never both hold the lock."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{out} is being written by another bsbr-export run (pid {other}; lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def remove_leftovers(out: Path, log=print) -> list[Path]:
    """Remove the ``.OUT.partial.*`` directories a killed run left (call with the lock held)."""
    gone = []
    for p in sorted(out.parent.glob(f".{out.name}.partial.*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            log(f"    removed {p}, left by an interrupted run")
            gone.append(p)
    return gone


def run_pipeline(source, out, engine: str = "onnx", max_seq_len: int | None = None, force: bool = False,
                 allow_pickle: bool = False, inline: bool = False, threads: int | None = None,
                 log=print, case_progress=None, parity_reference: str = "auto", int8_min_top1: float | None = None,
                 int8_max_kl: float | None = None, onnx_only: bool = False, eval_text=None,
                 calibrate: str = "none", calibrate_minutes: float = 10.0, **options) -> dict:
    """Run the pipeline; returns the manifest. Raises ParityError, ConfigError, ...

    ``onnx_only``: with engine fp32 or fp16, write and check the graphs but build no TensorRT
    engine (without it, a missing TensorRT stops the run before any work).

    Every option and path is checked before any work (the configuration is read from
    config.json alone); the output is built under ``.OUT.partial.*`` beside it, under a lock.
    ``eval_text``: a UTF-8 text whose first tokens measure the conversion against the original
    GPT-2 (``fidelity``) in place of the model's held-out ids. ``calibrate="self"``: before the
    export, calibrate the conversion on text sampled from the original (``calibrate_run.self_calibrate``,
    a budget of ``calibrate_minutes``); its record goes into the manifest and bsbr/calibration.json.
    """
    from . import fidelity
    from .convert import (convert, converted_config, converted_dir, load_bsbr, planned_config, recorded_original,
                          resolve_model_dir, save_bsbr)
    from .export import ExportSpec, export_onnx
    from .util import Stages, atomic_dir

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if calibrate not in CALIBRATIONS:
        raise ConfigError(f"--calibrate must be one of {CALIBRATIONS}, got {calibrate!r}")
    if calibrate != "none" and not calibrate_minutes > 0:
        raise ConfigError(f"--calibrate-minutes must be > 0, got {calibrate_minutes}")
    if engine == "int8":  # the int8 gate's thresholds (quantize.py), checked before any work
        from . import quantize

        gate = {"min_top1": quantize.MIN_TOP1 if int8_min_top1 is None else int8_min_top1,
                "max_kl": quantize.MAX_KL if int8_max_kl is None else int8_max_kl}
        quantize.check_thresholds(**gate)
    out = Path(out)
    check_output(out, force)
    bsbr_dir = converted_dir(source)  # a converted (e.g. calibrated) model is exported as it is
    if bsbr_dir is not None:
        if options:
            raise ConfigError(f"{source} is already converted; conversion options {sorted(options)} do not apply")
        cfg, src_dir, original = converted_config(bsbr_dir), bsbr_dir, recorded_original(bsbr_dir)
        try:
            orig_dir = None if original is None else resolve_model_dir(original)
        except ModelLoadError:  # moved, or a hub name offline: no fidelity step, the export goes on
            orig_dir = None
    else:
        if calibrate == "self":  # a trained feature map unless the user named one
            from .calibrate_run import calibration_options

            options = calibration_options(source, options)
        cfg, src_dir = planned_config(source, **options)
        original, orig_dir = str(source), src_dir
    if calibrate != "none" and orig_dir is None:
        raise ConfigError(f"--calibrate {calibrate} needs the original GPT-2 of {source}, which is not at hand")
    max_len = max_seq_len if max_seq_len is not None else cfg.n_positions
    build_engine = engine in ("fp32", "fp16") and not onnx_only
    spec = ExportSpec(max_seq_len=max_len, inline=inline, short_prompts=not build_engine)  # TensorRT parses it
    t0 = time.time()
    step = iter(range(1, 20))
    log(f"[{next(step)}] checking options and memory")
    if build_engine:
        check_tensorrt(engine)
    text_ids = heldout_text(orig_dir or src_dir)
    fid_plan = (fidelity.plan(cfg, src_dir, eval_text, text_ids) if orig_dir is not None  # --eval-text checked here
                else {"skipped": f"the original GPT-2 of {source} ({original or 'not recorded'}) is not at hand"})
    where = reference_mode(cfg, max_len, engine, out.parent, parity_reference)
    check_memory(cfg, max_len, engine, log, recorded=where["mode"] == "disk")
    from .util import map_large_allocations

    mapped = map_large_allocations()
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        remove_leftovers(out, log)
        log(f"[{next(step)}] converting {source}")
        stage = Stages()  # time and peak memory per stage, for the manifest (machines are sized by them)
        with stage("convert"):
            model = load_bsbr(bsbr_dir) if bsbr_dir else convert(src_dir, allow_pickle=allow_pickle, **options)
        local = orig_dir is not None and Path(original).exists()
        manifest = {"source": str(source), "original": str(Path(original).resolve()) if local else original,
                    "engine": engine, "max_seq_len": max_len, "inline": inline,
                    "options": model.cfg.to_dict(), "versions": versions(), "parity": {}, "files": {}}
        with atomic_dir(out, force=force) as tmp:
            if calibrate == "self":
                from .calibrate_run import self_calibrate

                log(f"[{next(step)}] calibrating on text sampled from the original (budget {calibrate_minutes:g} min)")
                with stage("calibrate"):
                    manifest["calibration"] = self_calibrate(model, str(source), options, calibrate_minutes,
                                                             tmp / ".calibrate", lambda m: log(f"    {m}"),
                                                             original=original if bsbr_dir else None)
                _free_torch_memory()
            log(f"[{next(step)}] exporting ONNX (prefill, extend, decode and close graphs, max {max_len} tokens)")
            with stage("export"):
                record = None if bsbr_dir is None else bsbr_dir / "calibration.json"
                record = (json.dumps(manifest["calibration"], indent=2) + "\n" if "calibration" in manifest
                          else record.read_text() if record is not None and record.is_file() else None)
                save_bsbr(model, tmp / "bsbr", tokenizer_from=src_dir,
                          extra=None if record is None else {"calibration.json": record})
                export_onnx(model, tmp, spec, progress=lambda m: log(f"    {m}"))
            if engine == "fp16":
                log(f"[{next(step)}] exporting the fp16 graphs (LayerNorm and softmax in fp32)")
                with stage("export_fp16"):
                    export_onnx(model, tmp, replace(spec, fp16=True), progress=lambda m: log(f"    {m}"))
            if engine == "int8":
                log(f"[{next(step)}] exporting the int8 graphs (dense weights int8; attention, LayerNorm, softmax "
                    f"and embeddings fp32)")
                with stage("export_int8"):
                    quantize.export_int8(model, tmp, max_len, inline=inline, log=log)
            if "skipped" in fid_plan:
                manifest["fidelity"] = {"skipped": fid_plan["skipped"]}
            else:
                log(f"[{next(step)}] fidelity: the converted model vs the original GPT-2, both torch "
                    f"({fid_plan['windows']} x {fid_plan['tokens']} tokens of {fid_plan['source']})")
                with stage("fidelity"):
                    manifest["fidelity"] = fidelity.measure(orig_dir, model, fid_plan)
                _free_torch_memory()
            reference = model
            if where["mode"] == "disk":
                log(f"[{next(step)}] torch reference over the parity grid, recorded to disk "
                    f"({where['record_bytes'] / 2**30:.1f} GiB) so that torch and ONNX Runtime never hold "
                    f"the weights together")
                with stage("reference"):
                    reference = record_reference(model, tmp / ".reference.f32", max_len, text_ids,
                                                 fp16_baseline=engine == "fp16")
                model = None  # the record stands for the model from here on
                _free_torch_memory()
            from .check import PARITY_SESSION

            where["session"] = dict(PARITY_SESSION, malloc_mmap_threshold=(
                PARITY_SESSION["malloc_mmap_threshold"] if mapped else None))
            manifest["parity_reference"] = where
            log(f"[{next(step)}] parity: onnxruntime vs the converted torch model (fp32)")
            with stage("parity_fp32"):
                report = parity_onnx(reference, tmp / "model.onnx", max_len, text_ids, "fp32", threads,
                                     case_progress)
            _record(manifest, "onnx_fp32", report, tmp)
            onnx_for_engine = tmp / "model.onnx"
            if engine == "int8":
                log(f"[{next(step)}] parity: onnxruntime int8 graph vs the fp32 graph (top-1 >= "
                    f"{gate['min_top1']:.0%}, mean KL <= {gate['max_kl']:g} nats)")
                with stage("parity_int8"):
                    manifest["parity"]["onnx_int8"] = quantize.gate_int8(
                        tmp, cfg, max_len, text_ids, threads, **gate,
                        progress=lambda c: log(quantize.case_line(c)) if case_progress else None)
            if engine == "fp16":
                log(f"[{next(step)}] parity: onnxruntime fp16 graph vs the converted torch model (fp32)")
                with stage("parity_fp16"):
                    report = parity_onnx(reference, tmp / "model_fp16.onnx", max_len, text_ids, "fp16", threads,
                                         case_progress)
                _record(manifest, "onnx_fp16", report, tmp)
                onnx_for_engine = tmp / "model_fp16.onnx"
            if build_engine:
                log(f"[{next(step)}] building the TensorRT engine ({engine})")
                _build_and_check(reference, onnx_for_engine, tmp, engine, max_len, text_ids, manifest,
                                 case_progress)
            elif engine in ("fp32", "fp16"):
                manifest["engine_status"] = "not built (--onnx-only)"
            if where["mode"] == "disk":
                reference.remove()
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    manifest["files"][f.relative_to(tmp).as_posix()] = file_sha256(f)
            manifest["seconds"] = round(time.time() - t0, 1)
            manifest["stages"] = stage.record
            log("    peak memory by stage: " + ", ".join(f"{k} {v['peak_rss_bytes'] / 2**30:.2f} GiB"
                                                         for k, v in stage.record.items()))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _record(manifest: dict, key: str, report: dict, tmp: Path) -> None:
    from .check import markdown_table, write_report

    write_report(report, tmp, f"parity_{key}")
    manifest["parity"][key] = {"passed": report["passed"], "precision": report["precision"],
                               "worst_max_abs": max(c["max_abs"] for c in report["cases"]),
                               "min_top1": min(c["top1"] for c in report["cases"]),
                               "cases": len(report["cases"])}
    if not report["passed"]:
        raise ParityError(f"{report['candidate']} fails parity against torch fp32:\n"
                          + markdown_table(report, only_failed=True))


def _free_torch_memory() -> None:
    """Collect what the freed torch model left and hand the C heap's free pages back."""
    import gc

    from .util import release_free_memory

    gc.collect()
    release_free_memory()


def _build_and_check(reference, onnx_path, tmp, engine, max_len, text_ids, manifest, case_progress):
    """Build the engine, then check it like any other runner (needs TensorRT and a GPU).
    ``reference``: the torch model or its ``RecordedReference`` (as for ``parity_onnx``)."""
    from .check import RecordedReference, check_parity
    from .runtime import TorchRunner
    from .trt import TensorRTRunner, engine_from_onnx

    path = engine_from_onnx(onnx_path, tmp / f"model_{engine}.engine", min_seq=1, opt_seq=min(512, max_len),
                            max_seq=max_len, max_batch=8, timing_cache_path=tmp / "timing.cache")
    if isinstance(reference, RecordedReference):
        ref, baseline = reference, (reference.baseline if engine == "fp16" else None)
    else:
        ref, baseline = TorchRunner(reference), (TorchHalfRunner(reference) if engine == "fp16" else None)
    cfg = reference.cfg
    with TensorRTRunner(path) as runner:
        kw = dict(chunk=cfg.chunk_size, max_len=max_len, vocab=cfg.vocab_size, text_ids=text_ids,
                  precision=engine, progress=case_progress)
        report = check_parity(ref, runner, baseline=baseline, **kw)
    report["candidate"] = f"TensorRT {path.name}"
    _record(manifest, f"tensorrt_{engine}", report, tmp)
    manifest["engine_status"] = f"built: {path.name}"
