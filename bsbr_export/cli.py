"""The ``bsbr-export`` command line: parse options, then call one function of a stage.

``bsbr-export MODEL --engine onnx|fp32|fp16 --out DIR`` runs the whole pipeline;
subcommands run one stage each. This is the only module that talks to the terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import BSBRExportError


class PipelineGroup(click.Group):
    """A group whose first argument may be a model instead of a subcommand: then it runs ``run``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def conversion_options(f):
    """Options shared by every command that converts a GPT-2."""
    opts = [
        click.option("--chunk-size", type=int, default=128, show_default=True,
                     help="Tokens per chunk L: softmax attention inside a chunk, retrieval between chunks."),
        click.option("--compression", type=int, default=None,
                     help="State compression factor kappa (must divide the head dim); default: off."),
        click.option("--position-policy", type=click.Choice(["absolute", "chunk"]), default="absolute",
                     show_default=True, help="Positions for t >= n_positions (see README)."),
        click.option("--meta-init", type=click.Choice(["qk", "random"]), default="qk", show_default=True,
                     help="Initialisation of the meta query/key projections."),
        click.option("--retrieval-scale", type=float, default=1.0, show_default=True,
                     help="Initial per-head retrieval scale g (0 = block-local attention only)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow loading a pytorch_model.bin pickle checkpoint (runs code from the file)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options(chunk_size, compression, position_policy, meta_init, retrieval_scale) -> dict:
    return dict(chunk_size=chunk_size, compression=compression, position_policy=position_policy,
                meta_init=meta_init, retrieval_scale=retrieval_scale)


def fail(msg: str, code: int = 1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsbr-export")
def main():
    """Convert a GPT-2 to BSBR attention, export it to ONNX, build TensorRT engines,
    and check parity against PyTorch.

    \b
    Whole pipeline:   bsbr-export MODEL --engine onnx|fp32|fp16 --out DIR
    One stage:        bsbr-export convert MODEL --out DIR   (see COMMAND --help)

    MODEL is a local HF GPT-2 directory (e.g. models/gpt2-pystdlib) or a hub name
    such as gpt2 (needs the HuggingFace hub).
    """


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


if __name__ == "__main__":
    main()
