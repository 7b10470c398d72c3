"""The ``calibrate`` command: train a conversion on the user's text (``calibrate_run``). Like
``cli``, this module only parses and calls one function of a stage; ``cli`` adds it to its group."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_options import changed_options, conversion_options
from .cli_runtime import fail
from .errors import BSBRExportError

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--data", "data", multiple=True, type=click.Path(path_type=Path),
              help="Text to calibrate on (repeatable): a text file, a directory (every non-hidden text file "
                   "under it) or a .jsonl file (a \"text\" field per line).")
@click.option("--self", "self_data", is_flag=True,
              help="No text of yours: train on documents sampled from the original GPT-2 itself "
                   "(temperature 1; --self-tokens of them, about 10% more held out).")
@click.option("--self-tokens", type=click.IntRange(min=1), default=32768, show_default=True,
              help="With --self: training tokens to sample.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory: the calibrated BSBR checkpoint (written atomically at the end).")
@click.option("--original", default=None,
              help="The original HF GPT-2 (directory or hub name), when MODEL is already converted [the one "
                   "MODEL records: its calibration.json, or the manifest.json of the main command's output].")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per training and held-out window [min(1024, n_positions)].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Windows per training step.")
@click.option("--stage2", is_flag=True,
              help="After attention transfer, distil: KL(original || converted) of the next-token "
                   "distributions, early-stopped on the held-out KL.")
@click.option("--long-every", type=click.IntRange(min=0), default=None,
              help="With --stage2: 1 step in N on a long window (--long-len tokens), its targets the original "
                   "over a sliding context of its n_positions, so that the retrieval learns what context beyond "
                   "them is worth; 0: never [4 with --stage2].")
@click.option("--long-len", type=click.IntRange(min=2), default=None,
              help="Tokens of a --long-every window [4 x --seq-len].")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Wall-clock budget from start to end (sampling for --self, the held-out measures, every "
                   "stage; resumed runs add their training to it; with --stage2, attention transfer gets at "
                   "most half).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Most training steps per stage.")
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between held-out evaluations (each writes a checkpoint).")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
              help="Evaluations without improvement before a stage stops.")
@click.option("--heldout-windows", type=click.IntRange(min=1), default=8, show_default=True,
              help="Held-out windows each evaluation reads (spread over the held-out text).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate of stage 1 (meta projections, a trained feature map) [1e-2 with the "
                   "hedgehog map, else 1e-3].")
@click.option("--lr-kl", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate of stage 2 (--stage2).")
@click.option("--lr-g", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Learning rate of a normalised retrieval scale g, trained as exp(theta).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the held-out split and of the training windows.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Directory for the resumable checkpoint [OUT.partial beside OUT].")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@conversion_options
def calibrate(model, data, self_data, self_tokens, out, original, seq_len, batch_size, stage2, long_every, long_len,
              minutes, max_steps,
              eval_every, patience, heldout_windows, lr, lr_kl, lr_g, seed, work, force, allow_pickle, **opts):
    """Calibrate a conversion on your own text: train what the conversion added (the meta
    query/key projections, the retrieval scale g, a trained feature map) to imitate the
    original GPT-2, and write the calibrated checkpoint to OUT.

    \b
    MODEL: an HF GPT-2 (directory or hub name), converted first with the conversion
    options below (with the hedgehog feature map unless --feature-map names one);
    or a converted BSBR directory (then --original, unless it records its original).

    \b
    Data (--data, repeatable):
      FILE.txt (any name)  one document, UTF-8
      DIR                  every file under it, sorted, recursively; hidden files and
                           directories, empty and binary files skipped
      FILE.jsonl           one document per line: {"text": "..."}
    Documents are tokenised with the model's tokenizer and joined with its end-of-text
    token. About 10% of the tokens (whole documents, chosen by --seed; at least one
    window) are held out. Training draws a fresh random window of --seq-len tokens per
    step; held-out windows are fixed. Bad data (missing path, empty or non-UTF-8 file,
    bad JSONL line, fewer tokens than two windows) fails in one line before any work.
    --self in place of --data: documents sampled from the original itself (seeded;
    kept in the checkpoint directory, so a resumed run samples nothing again).

    \b
    Training: stage 1, attention transfer (each layer's attention against softmax's,
    the original's hidden states as input); with --stage2, then KL distillation to the
    original's next-token distributions (with --long-every, some steps on long windows).
    Each stage evaluates its held-out loss every
    --eval-every steps, stops after --patience evaluations without improvement, and
    keeps its best parameters. Budget: --minutes (wall clock) and --max-steps (per stage).
    One progress line per evaluation on stderr: step, train and held-out loss, elapsed, ETA.

    \b
    Resume: every evaluation writes a checkpoint to OUT.partial (or --work). Run the
    same command again (after Ctrl-C, a crash, or with a larger budget) and it resumes
    from there; at the end OUT is written and the checkpoint removed.

    \b
    Writes OUT: config.json, model.safetensors and the tokenizer (what `bsbr-export
    OUT --out DIR`, `export` and `load_bsbr` take), and calibration.json: the source,
    the data, each stage's steps, time and best held-out loss, and the held-out top-1
    agreement, KL and perplexity against the original before and after.
    """
    from .calibrate_run import CHECKPOINT, Settings, calibration_options, prepare, run

    settings = Settings(seq_len=seq_len, batch_size=batch_size, stage2=stage2, long_every=long_every,
                        long_len=long_len, minutes=minutes, max_steps=max_steps,
                        eval_every=eval_every, patience=patience, lr=lr, lr_kl=lr_kl, lr_g=lr_g,
                        heldout_windows=heldout_windows, seed=seed, self_tokens=self_tokens if self_data else None)
    plan = None
    try:
        plan = prepare(model, data, out, settings, original=original, work=work, force=force,
                       allow_pickle=allow_pickle, options=calibration_options(model, changed_options(opts)))
        record = run(plan, lambda msg: click.echo(msg, err=True))
    except BSBRExportError as e:
        fail(str(e))
    except KeyboardInterrupt:
        if plan is not None and (plan.work / CHECKPOINT).is_file():
            fail(f"interrupted; the last checkpoint is in {plan.work}: run the same command again to resume",
                 INTERRUPTED)
        fail("interrupted before the first checkpoint; nothing to resume", INTERRUPTED)
    after, before = record["heldout"]["after"], record["heldout"]["before"]
    click.echo(f"wrote {out}: {' + '.join(s['name'] for s in record['stages']) or 'no stage ran'}, "
               f"{sum(s['steps'] for s in record['stages'])} steps in {record['seconds']:.0f} s; held-out top-1 "
               f"{before['top1']:.1%} -> {after['top1']:.1%}, KL {before['kl_mean_nats']:.4f} -> "
               f"{after['kl_mean_nats']:.4f} nats, perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} "
               f"(original {after['ppl_original']:.3f})")
