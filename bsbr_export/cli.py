"""The ``bsbr-export`` command line: parse options, then call one function of a stage.

``bsbr-export MODEL --engine onnx|fp32|fp16 --out DIR`` runs the whole pipeline;
subcommands run one stage each. This module and the other ``cli_*`` modules are the only ones
that talk to the terminal.
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli_calibrate import calibrate
from .cli_options import changed_options as _changed, conversion_options, options_dict as _options
from .cli_runtime import Choice, fail, generate, serve
from .errors import BSBRExportError


class PipelineGroup(click.Group):
    """A group whose first argument may be a model instead of a subcommand: then it runs ``run``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:  # a base install (runtime only) running a conversion command
            if (e.name or "").split(".")[0] not in EXPORT_EXTRA:
                raise
            fail(f"{e.name} is not installed: conversion, export and checks need the export extra "
                 f"(pip install 'bsbr-export[export]')")


# Modules of the ``export`` extra: the base install (load and generate) runs without them.
EXPORT_EXTRA = ("torch", "transformers", "safetensors", "huggingface_hub")


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsbr-export")
def main():
    """Convert a GPT-2 to BSBR attention, export it to ONNX, build TensorRT engines,
    and check parity against PyTorch.

    \b
    Whole pipeline:   bsbr-export MODEL --engine onnx|fp32|fp16|int8 --out DIR
    One stage:        bsbr-export convert MODEL --out DIR   (see COMMAND --help)

    MODEL is a local HF GPT-2 directory (e.g. models/gpt2-pystdlib) or a hub name
    such as gpt2 (needs the HuggingFace hub).
    """


main.add_command(generate)  # the commands over an export (cli_runtime.py)
main.add_command(serve)
main.add_command(calibrate)  # cli_calibrate.py


@main.command()
@click.argument("model")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@conversion_options
def convert(model, out, force, allow_pickle, **opts):
    """Convert a GPT-2 checkpoint to a BSBR checkpoint (config.json + model.safetensors)."""
    from .convert import convert as do_convert, resolve_model_dir, save_bsbr

    try:
        if out.exists() and not force:
            fail(f"{out} already exists (use --force to replace it)")
        m = do_convert(model, allow_pickle=allow_pickle, **_options(**opts))
        save_bsbr(m, out, tokenizer_from=resolve_model_dir(model), force=force)
    except BSBRExportError as e:
        fail(str(e))
    c = m.cfg
    click.echo(f"converted {model} -> {out}: {c.n_layer} layers, {c.n_head} heads, chunk {c.chunk_size}, "
               f"compression {c.compression or 'off'}, position policy {c.position_policy}")


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _case_line(case) -> None:
    mark = "ok" if case.passed else "FAIL"
    click.echo(f"    {case.source:7s} batch {case.batch} seq {case.seq:5d}  max|diff| {case.max_abs:.2e} "
               f"(tol {case.atol:.1e})  top-1 {case.top1:.1%}  {mark}", err=True)


@main.command()
@click.argument("model")
@click.option("--engine", type=Choice(["onnx", "fp32", "fp16", "int8"]), default="onnx", show_default=True,
              help="onnx: ONNX + ONNX Runtime parity. fp32/fp16: also a TensorRT engine (needs TensorRT); "
                   "fp16 writes and checks the fp16 ONNX first. int8: also the int8 CPU graphs (dense "
                   "weights int8), gated against the fp32 graph (--int8-min-top1, --int8-max-kl).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (created atomically).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Longest sequence the export serves [n_positions].")
@click.option("--inline", is_flag=True, help="Write the standard-ops-only graph (no bsbr::ChunkAttention function).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads [all cores].")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--parity-reference", type=Choice(["auto", "memory", "disk"]), default="auto",
              show_default=True,
              help="Where torch's reference logits live during parity. memory: the torch model runs beside "
                   "each ONNX Runtime session (the weights held twice). disk: torch runs the whole grid first, "
                   "its logits go to a file in the partial output (deleted at the end) and the model is freed "
                   "before any session opens (the weights held once; needs disk for the logits: 3.5 GB at "
                   "1024 tokens). auto: disk when the disk has room for twice that, else memory.")
@click.option("--int8-min-top1", type=click.FloatRange(0.0, 1.0), default=None,
              help="--engine int8: least top-1 agreement with the fp32 graph, per source over the grid [0.97].")
@click.option("--int8-max-kl", type=click.FloatRange(min=0.0), default=None,
              help="--engine int8: largest mean KL(fp32 || int8) in nats, per source over the grid [0.02].")
@click.option("--onnx-only", is_flag=True,
              help="--engine fp32/fp16: write and check the graphs, build no TensorRT engine (without this, "
                   "a missing TensorRT stops the command before any work).")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text whose first 1024 tokens (the model's tokenizer; at least two chunks) measure "
                   "the conversion against the original GPT-2, both in torch: top-1 agreement and mean "
                   "KL(original || converted), printed after the parity lines and kept in manifest.json "
                   "[the model's heldout_ids.npy, 4 windows of 1024 tokens; without either: skipped].")
@click.option("--calibrate", type=Choice(["none", "self"]), default="none", show_default=True,
              help="self: before the export, calibrate the conversion on text sampled from the original GPT-2 "
                   "itself (the calibrate command's --self --stage2: attention transfer, then KL distillation "
                   "with some steps on long windows, each early-stopped on held-out samples; hedgehog map and "
                   "decay weights unless named; the record in manifest.json and bsbr/calibration.json). For "
                   "your own text, or a run that resumes after an interruption, use `bsbr-export calibrate` "
                   "and pass its output.")
@click.option("--calibrate-minutes", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Wall-clock budget of --calibrate self, sampling included.")
@conversion_options
def run(model, engine, out, max_seq_len, inline, threads, force, parity_reference, int8_min_top1, int8_max_kl,
        onnx_only, eval_text, calibrate, calibrate_minutes, allow_pickle, **opts):
    """Whole pipeline: convert, export, check parity, build (the default command).

    \b
    Writes into OUT:
      bsbr/                 the converted checkpoint (config.json, model.safetensors, tokenizer)
      model.onnx            prefill graph: input_ids -> every position's logits (+ decode state)
      extend.onnx           generation's prefill: ragged prompts, or a prompt fed in pieces
      decode.onnx           one token per row over an explicit state
      close.onnx            the chunk-closing step, run once per chunk while decoding
      weights.onnx.data     the weights of all four graphs, each tensor stored once
      *_fp16.onnx, weights_fp16.onnx.data   the same in fp16, with --engine fp16
      *_int8.onnx, weights_int8.onnx.data   int8 dense weights (fp32 tensors read from
                            weights.onnx.data), with --engine int8
      parity_*.json/.md     parity reports (parity_onnx_int8: int8 vs the fp32 graph)
      manifest.json         versions, options, file hashes, parity summary, fidelity to
                            the original GPT-2, where the reference lived, time and peak
                            memory of each stage

    Parity compares the graphs with the converted torch model; the fidelity line compares
    the converted model with the original GPT-2 (the conversion's own change). MODEL may be
    a converted directory (convert's or calibrate's output): exported as it is.

    Options, paths, the parity check's memory and (for an engine) TensorRT are checked
    before any work. While it
    runs, .OUT.lock beside OUT keeps a second writer out; leftovers of a killed run
    (.OUT.partial.*) are removed. Files are 0644, directories 0755.
    """
    from .convert import converted_dir
    from .pipeline import run_pipeline

    try:
        manifest = run_pipeline(model, out, engine=engine, max_seq_len=max_seq_len, force=force,
                                allow_pickle=allow_pickle, inline=inline, threads=threads, log=_log,
                                case_progress=_case_line, parity_reference=parity_reference,
                                int8_min_top1=int8_min_top1, int8_max_kl=int8_max_kl, onnx_only=onnx_only,
                                eval_text=eval_text, calibrate=calibrate, calibrate_minutes=calibrate_minutes,
                                **(_changed(opts) if converted_dir(model) else _options(**opts)))
    except BSBRExportError as e:
        fail(str(e))
    except OSError as e:
        fail(_os_error(e))
    _summary(manifest, out)


def repo_relative(val, root: Path):
    """A path inside the repository as seen from its root, so that a recorded command reruns from
    there wherever it was typed; anything else as it is."""
    if isinstance(val, Path) and val.is_absolute() and val.resolve().is_relative_to(root):
        return val.resolve().relative_to(root)
    return val


def _os_error(e: OSError) -> str:
    """An OSError as one line: the path and the reason."""
    where = e.filename or ""
    return f"{where}: {e.strerror or e}" if where else (e.strerror or str(e))


def _summary(manifest: dict, out: Path) -> None:
    click.echo(f"wrote {out} in {manifest['seconds']}s")
    for key, p in manifest["parity"].items():
        if p.get("precision") == "int8":  # a statistical gate against the fp32 graph
            click.echo(f"  parity {key:12s} {'pass' if p['passed'] else 'FAIL'}: {p['cases']} cases vs the fp32 "
                       f"graph, min top-1 {p['min_top1']:.1%}, max mean KL {p['max_kl_mean']:.2e} nats")
            continue
        graph = "TensorRT" if key.startswith("tensorrt") else "ONNX"
        click.echo(f"  parity {key:12s} {'pass' if p['passed'] else 'FAIL'}: {graph} vs converted torch, "
                   f"{p['cases']} cases, worst max|diff| {p['worst_max_abs']:.2e}, min top-1 {p['min_top1']:.1%}")
    if "calibration" in manifest:
        c = manifest["calibration"]
        b, a = c["heldout"]["before"], c["heldout"]["after"]
        click.echo(f"  calibration         {sum(s['steps'] for s in c['stages'])} steps in {c['seconds']:.0f} s on "
                   f"samples of the original: held-out top-1 {b['top1']:.1%} -> {a['top1']:.1%}, KL "
                   f"{b['kl_mean_nats']:.4f} -> {a['kl_mean_nats']:.4f}")
    if "fidelity" in manifest:
        from .fidelity import summary_line

        click.echo(f"  fidelity            {summary_line(manifest['fidelity'])}")
    if "engine_status" in manifest:
        click.echo(f"  engine: {manifest['engine_status']}")


@main.command()
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the ONNX files.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Longest sequence the export serves [n_positions].")
@click.option("--fp16", is_flag=True, help="Write the fp16 graph (LayerNorm and softmax kept in fp32).")
@click.option("--int8", is_flag=True,
              help="Write the int8 graphs (dense weights int8, the rest fp32); beside an fp32 export in OUT "
                   "they read its fp32 tensors from weights.onnx.data. No gate: the main command's "
                   "--engine int8 checks them.")
@click.option("--inline", is_flag=True, help="Write the standard-ops-only graph.")
@click.option("--no-decode", is_flag=True, help="Skip the decode graph.")
@click.option("--calibrate", type=Choice(["none", "self"]), default="none", show_default=True,
              help="self: calibrate the conversion on text sampled from the original first (as the main command).")
@click.option("--calibrate-minutes", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Wall-clock budget of --calibrate self, sampling included.")
@conversion_options
def export(model, out, max_seq_len, fp16, int8, inline, no_decode, calibrate, calibrate_minutes, allow_pickle, **opts):
    """Export a converted (or convert-on-the-fly) model to ONNX, without parity checks."""
    import tempfile

    from .calibrate_run import calibration_options, self_calibrate
    from .convert import load_any
    from .export import ExportSpec, export_onnx

    try:
        options = _changed(opts)
        if calibrate == "self":  # a trained feature map unless one is named
            options = calibration_options(model, options)
        m = load_any(model, allow_pickle=allow_pickle, **options)
        if calibrate == "self":
            with tempfile.TemporaryDirectory(prefix="bsbr-calibrate-") as work:
                self_calibrate(m, model, options, calibrate_minutes, Path(work) / "work", _log)
        spec = ExportSpec(max_seq_len=max_seq_len or m.cfg.n_positions, fp16=fp16, int8=int8, inline=inline)
        files = [*export_onnx(m, out, spec, decode=not no_decode, progress=_log), *_copy_tokenizer(model, out)]
    except BSBRExportError as e:
        fail(str(e))
    for name in files:
        click.echo(f"wrote {out / name}")
    if not (out / "tokenizer.json").is_file():
        click.echo(f"warning: {model} has no tokenizer.json, so load({out}) and serve {out} need one copied in", err=True)


def _copy_tokenizer(model, out: Path) -> list[str]:
    """The model's tokenizer files beside the graphs, so that ``load(OUT)`` and ``serve OUT`` take
    the export as it is."""
    import shutil

    from .convert import TOKENIZER_FILES, resolve_model_dir

    src = resolve_model_dir(model)
    copied = []
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)
            copied.append(f)
    return copied


@main.command()
@click.argument("onnx_file", type=click.Path(path_type=Path))
@click.option("--model", "model_src", required=True,
              help="The model the graph came from: the bsbr/ directory of the main command's output, or "
                   "the original HF GPT-2 with the same conversion options. The graph's recorded "
                   "configuration must match it.")
@click.option("--precision", type=Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write parity JSON/Markdown here.")
@click.option("--threads", type=int, default=None)
@conversion_options
def check(onnx_file, model_src, precision, report, threads, allow_pickle, **opts):
    """Parity of an ONNX prefill graph against the PyTorch model on the sequence-length grid."""
    from .check import config_difference, markdown_table, write_report
    from .convert import load_any, resolve_model_dir
    from .pipeline import check_memory, heldout_text, parity_onnx
    from .runtime import ORTRunner, onnx_metadata

    try:
        m = load_any(model_src, allow_pickle=allow_pickle, **_changed(opts))
        with ORTRunner(onnx_file, threads=threads) as r:
            meta = onnx_metadata(r.session)
        diff = config_difference(meta, m.cfg, precision)
        if diff is not None:
            fail(f"{onnx_file} does not match {model_src}: {diff}")
        max_len = meta["max_seq_len"]
        check_memory(m.cfg, max_len, precision, _log, what="the graph's max_seq_len")
        from .util import map_large_allocations

        map_large_allocations()
        rep = parity_onnx(m, onnx_file, max_len, heldout_text(resolve_model_dir(model_src)), precision,
                          threads, _case_line)
    except BSBRExportError as e:
        fail(str(e))
    if report:
        write_report(rep, report)
    if not rep["passed"]:
        click.echo(markdown_table(rep, only_failed=True), err=True)
        fail(f"parity FAILED for {sum(not c['passed'] for c in rep['cases'])} of {len(rep['cases'])} cases")
    click.echo(f"parity pass: {len(rep['cases'])} cases, worst max|diff| "
               f"{max(c['max_abs'] for c in rep['cases']):.2e}")


class IntList(click.ParamType):
    """Comma-separated positive integers as a tuple; with ``zero_skips``, a lone ``0`` is ``()``."""

    name = "N,N,..."

    def __init__(self, zero_skips: bool = False):
        self.zero_skips = zero_skips

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if self.zero_skips and value.strip() == "0":
            return ()
        try:
            vals = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            self.fail(f"must be comma-separated integers, got {value!r}", param, ctx)
        if not vals or min(vals) < 1:
            self.fail(f"must be positive integers, got {value!r}", param, ctx)
        return vals


class BatchByLength(click.ParamType):
    """``BATCHxT`` (e.g. ``8x256``) as the tuple ``(batch, T)``, both positive."""

    name = "BATCHxT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            bt, T = (int(v) for v in value.lower().split("x"))
        except ValueError:
            self.fail(f"must read BATCHxT, e.g. 8x256, got {value!r}", param, ctx)
        if bt < 1 or T < 1:
            self.fail(f"batch and T must be positive, got {value!r}", param, ctx)
        return bt, T


@main.command()
@click.option("--quick", is_flag=True, help="CI smoke test: tiny random model, T in {16, 48}, 2 runs (seconds); targets are not judged.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Directory for bench.json, bench.md and the plots [./bench-out/MODEL, in the current "
                   "directory].")
@click.option("--model", default=None,
              help="gpt2-small-random (GPT2Config() shape, random weights) or a local HF GPT-2 directory "
                   "[gpt2-small-random; --quick: tiny-random].")
@click.option("--lengths", type=IntList(), default=None,
              help="Prefill lengths T, comma-separated [1,32,128,...,8192].")
@click.option("--decode-contexts", type=IntList(zero_skips=True), default=None,
              help="Decode contexts, comma-separated [256,...,8192]; 0 = skip.")
@click.option("--throughput", type=BatchByLength(), default=None, help="Throughput point BATCHxT [8x256].")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Timed runs per case [5-7 by length].")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="Threads for torch and ONNX Runtime [0: all cores].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="BSBR chunk L [128; --quick: 16].")
@click.option("--profile-len", type=click.IntRange(min=1), default=None,
              help="T of the ORT op-type profiles [the longest T].")
@click.option("--fragment", type=click.Path(path_type=Path), default=None,
              help="Also write the Markdown fragment for docs/RESULTS.md here (scripts/make_results.py asks for "
                   "docs/results/bench.md) [none: the run writes under --out only].")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Keep models and ONNX exports here (several GB) instead of a temporary directory.")
def bench(quick, out, model, lengths, decode_contexts, throughput, runs, threads, chunk_size, profile_len, fragment,
          work):
    """Prefill latency, throughput, peak memory, decode and scaling of every backend, in one run.

    \b
    Prefill: HF GPT-2 (torch SDPA), HF GPT-2 exported by torch.onnx (dynamo) in ONNX
    Runtime, BSBR (torch), BSBR (ONNX Runtime, fp32 and int8 weights), TensorRT (when
    present), and the dense floor (the same graph with attention removed).
    Decode: HF GPT-2 + KV cache (torch), GPT-2 + KV cache in ONNX Runtime (Optimum's
    layout, IOBinding), BSBR state (torch, and ONNX Runtime through the runtime engine).
    A backend whose parity check fails is reported "parity FAILED" and not timed.
    Each prefill case runs in its own child process (peak RSS per case). Run heavy
    sweeps alone on the machine, e.g.:  flock /tmp/bsbr-cpu.lock bsbr-export bench
    """
    from .bench import BenchSpec, quick_spec, run_bench

    root = Path(__file__).resolve().parents[1]
    changes = {key: val for key, val in (
        ("model", model), ("lengths", lengths), ("decode_contexts", decode_contexts), ("throughput", throughput),
        ("runs", runs), ("chunk_size", chunk_size), ("profile_len", profile_len)) if val is not None}
    changes["threads"] = threads
    spec = quick_spec(**changes) if quick else BenchSpec(**changes)
    # The options as typed again: lists comma-separated, () as 0, the throughput point as BATCHxT.
    listed = {"--lengths": lengths, "--decode-contexts": decode_contexts}
    listed = {k: None if v is None else ",".join(map(str, v)) or "0" for k, v in listed.items()}
    point = None if throughput is None else "{}x{}".format(*throughput)
    command = "bsbr-export bench" + "".join(
        f" {flag}" if val is True else f" {flag} {repo_relative(val, root)}" for flag, val in (
            ("--quick", quick or None), ("--model", model), ("--out", out), ("--lengths", listed["--lengths"]),
            ("--decode-contexts", listed["--decode-contexts"]), ("--throughput", point), ("--runs", runs),
            ("--threads", threads or None), ("--chunk-size", chunk_size), ("--profile-len", profile_len),
            ("--fragment", fragment), ("--work", work)) if val)
    tag = spec.model if spec.model in ("gpt2-small-random", "tiny-random") else Path(spec.model).name
    out = out or Path.cwd() / "bench-out" / tag
    if spec.model not in ("gpt2-small-random", "tiny-random") and not (Path(spec.model) / "config.json").is_file():
        fail(f"{spec.model}: not a local HF GPT-2 directory (no config.json) nor gpt2-small-random")
    try:
        result = run_bench(spec, out, fragment=fragment, command=command, work_dir=work, log=_log)
    except BSBRExportError as e:
        fail(str(e))
    for t in [] if quick else result["targets"]:  # the smoke run judges none (bench.md lists them)
        v = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        click.echo(f"  {t['status']:4s}  {t['description']}: {v} (need {t['comparison']} {t['threshold']:.2f})")
    frag = f"; fragment {fragment}" if fragment is not None else ""
    click.echo(f"wrote {out}/bench.json, bench.md and plots{frag} ({result['seconds'] / 60:.1f} min)")
    if quick:
        click.echo("quick run: targets not judged (tiny model, 2 runs); run without --quick to judge them")


if __name__ == "__main__":
    main()
