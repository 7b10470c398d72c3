"""Options several commands share: the conversion options of every command that converts a
GPT-2 (``convert``, the main command, ``export``, ``check``, ``calibrate``)."""

from __future__ import annotations

import click

from .cli_runtime import Choice
from .config import DEFAULT_LOCAL_WINDOW, DEFAULT_RETRIEVAL_WEIGHTS


def conversion_options(f):
    """Options shared by every command that converts a GPT-2."""
    opts = [
        click.option("--chunk-size", type=int, default=128, show_default=True,
                     help="Tokens per chunk L: softmax attention inside a chunk, retrieval between chunks."),
        click.option("--compression", type=int, default=None,
                     help="State compression factor kappa (must divide the head dim); default: off."),
        click.option("--position-policy", type=Choice(["absolute", "chunk"]), default="absolute",
                     show_default=True, help="Positions for t >= n_positions (see README)."),
        click.option("--meta-init", type=Choice(["qk", "random"]), default="qk", show_default=True,
                     help="Initialisation of the meta query/key projections."),
        click.option("--retrieval-scale", type=float, default=None,
                     help="Initial per-head retrieval scale g [normalised: 0.03; plain: 0, i.e. "
                          "block-local attention only]."),
        click.option("--retrieval", type=Choice(["plain", "normalised"]), default="normalised",
                     show_default=True,
                     help="plain: o = a + g q S. normalised: local and retrieved terms share one softmax "
                          "denominator (needs a positive --feature-map)."),
        click.option("--feature-map", type=Choice(["identity", "elu1", "relu", "learned", "hedgehog"]), default=None,
                     help="Feature map phi on keys and queries of the retrieval [normalised: elu1; "
                          "plain: identity]. learned (elu(xW + b) + 1) and hedgehog (softmax of xW, both signs) "
                          "have weights of their own: train them with --calibrate self or the calibrate command "
                          "(an untrained hedgehog map retrieves poorly)."),
        click.option("--local-window", type=Choice(["chunk", "lookback"]), default=DEFAULT_LOCAL_WINDOW,
                     show_default=True,
                     help="What a token's local softmax covers. chunk: the earlier tokens of its own chunk. "
                          "lookback: those and the whole previous chunk (retrieval from the chunks before "
                          "that); exact GPT-2 up to 2 chunks, state K/V of 2 chunks."),
        click.option("--retrieval-weights", type=Choice(["softmax", "sum", "decay", "gate"]),
                     default=None,
                     help="Weights of the retrieved chunks: softmax over them; sum (all 1); "
                     f"decay (lambda^age, lambda learned per head); gate (sigmoid, unnormalised) "
                     f"[{DEFAULT_RETRIEVAL_WEIGHTS}; decay when calibrated: --calibrate self, calibrate]."),
        click.option("--retrieval-decay", type=float, default=0.95, show_default=True,
                     help="Initial lambda in (0, 1] of --retrieval-weights decay."),
        click.option("--retrieval-until", default=None, metavar="TOKENS|positions|all", callback=_until,
                     help="Chunks that start at or after this token retrieve nothing (the local softmax alone). "
                          "positions: the model's position table (n_positions), where GPT-2's learned positions "
                          "end; all: every chunk retrieves [positions]."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow loading a pytorch_model.bin pickle checkpoint (runs code from the file)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _until(ctx, param, value):
    """--retrieval-until: a number of tokens as an int, a word as it is (the config checks both)."""
    return int(value) if value is not None and value.strip().isdigit() else value


def options_dict(chunk_size, compression, position_policy, meta_init, retrieval_scale, retrieval, feature_map,
                 local_window, retrieval_weights, retrieval_decay, retrieval_until) -> dict:
    out = dict(chunk_size=chunk_size, compression=compression, position_policy=position_policy,
               meta_init=meta_init, retrieval_scale=retrieval_scale, retrieval=retrieval, feature_map=feature_map,
               local_window=local_window, retrieval_weights=retrieval_weights, retrieval_decay=retrieval_decay)
    if retrieval_until is not None:  # not named: the config's default
        out["retrieval_until"] = retrieval_until
    return out


def changed_options(opts: dict) -> dict:
    """Conversion options the user set away from their defaults (a converted model takes none)."""
    defaults = dict(chunk_size=128, compression=None, position_policy="absolute", meta_init="qk",
                    retrieval_scale=None, retrieval="normalised", feature_map=None, local_window=DEFAULT_LOCAL_WINDOW,
                    retrieval_weights=None, retrieval_decay=0.95, retrieval_until=None)
    return {k: v for k, v in options_dict(**opts).items() if v != defaults.get(k)}
