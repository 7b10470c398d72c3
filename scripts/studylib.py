"""Shared plumbing of the conversion-study scripts (scripts/study_*.py).

Each study script parses the common options here, loads the original model and its
conversions, evaluates on held-out windows and writes one Markdown fragment
``docs/results/study_<name>.md`` whose every table has the command, model, data and
machine above it. ``scripts/make_results.py`` assembles the fragments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export import metrics as M  # noqa: E402
from bsbr_export.convert import convert, hf_config, planned_config  # noqa: E402
from bsbr_export.errors import BSBRExportError  # noqa: E402
# The per-window metrics and their summary: table 2's figures and the main command's fidelity line.
from bsbr_export.fidelity import (agreement, compare, converted_outputs, load_original,  # noqa: E402,F401
                                  original_outputs, summarise, window_metrics, windows)
from bsbr_export.ops.baselines import WindowAttention  # noqa: E402
from bsbr_export.ops.state import StateSpec  # noqa: E402
from bsbr_export.util import machine_info  # noqa: E402

DEFAULT_MODEL = "models/gpt2-pystdlib"
EOT = "<|endoftext|>"

# The conversions compared throughout: name -> converter options. Rounds one and two retrieve
# from every earlier chunk, however long the context (retrieval_until "all"); round three's rows
# (ROUND_THREE) are the main command's conversion, which stops the retrieval at the position table.
VARIANTS = {
    "plain": dict(retrieval="plain", retrieval_scale=1.0, local_window="chunk", retrieval_until="all"),
    "local": dict(retrieval="plain", retrieval_scale=0.0, local_window="chunk", retrieval_until="all"),
    # Initial g from the sweep of table 1 (g = 0.01 .. 1 on the bundled model); calibration trains it.
    "normalised": dict(retrieval="normalised", feature_map="elu1", retrieval_scale=0.03, local_window="chunk",
                       retrieval_until="all"),
}
VARIANT_NOTES = {
    "plain": "(a) g = 1, phi = identity, raw retrieved state added to the softmax output",
    "local": "(b) retrieval scale g = 0: block-local attention only",
    "normalised": "(c) local softmax and retrieval share one denominator, phi = elu + 1, initial g = 0.03",
}

# Round two (--with-baselines): the look-back local window and the baselines BSBR must beat.
LOOKBACK_VARIANTS = {f"{n}, look-back": {**VARIANTS[n], "local_window": "lookback"} for n in ("local", "normalised")}
LOOKBACK_NOTE = ("`…, look-back`: the variant with the look-back local window (softmax over the own and the "
                 "previous chunk, retrieval from the chunks before)")
# A learned feature map starts as elu + 1: it differs from its variant only once trained (table 9).
LEARNED_VARIANTS = {f"{n}, learned φ": {**spec, "feature_map": "learned"}
                    for n, spec in (("normalised", VARIANTS["normalised"]),
                                    ("normalised, look-back", LOOKBACK_VARIANTS["normalised, look-back"]))}
LEARNED_NOTE = ("`…, learned φ`: the retrieval's feature map elu(x W + b) + 1 with a per-head W and b, "
                "starting as elu + 1 and trained by attention transfer")
# Round three (--with-baselines): the main command's conversion (convert's defaults: look-back window,
# normalised retrieval, elu + 1, g = 0.03, softmax weights, retrieval until the position table) and
# its other retrieval weights; ``self`` rows of table 9 calibrate them as ``--calibrate self`` does.
ROUND_THREE = {"default": {}, **{f"default, {w} weights": {"retrieval_weights": w} for w in ("sum", "decay", "gate")}}
ROUND_THREE_NOTE = ("`default`: the main command's conversion (look-back window, normalised retrieval, elu + 1, "
                    "g = 0.03, softmax retrieval weights, retrieval until token 1024: chunks that start at or "
                    "after the position table retrieve nothing); `default, W weights`: the same with the "
                    "retrieval weights W (docs/bsbr-math.md, \"Retrieval weights\")")
# --calibrate self's conversion (calibrate_run.CALIBRATION_DEFAULTS): only training makes hedgehog a
# good retrieval, so it appears calibrated only (table 9) and in the cost table.
SELF_RECIPE = {"default, hedgehog φ, decay weights": {"feature_map": "hedgehog", "retrieval_weights": "decay"}}
BASELINE_SINKS = 4
BASELINE_NOTE = ("`window W`: the original's attention over the W most recent tokens only (no retrieval); "
                 "`sinks 4 + window W`: the same plus the first 4 tokens (as StreamingLLM keeps them); "
                 "both with the original weights and GPT-2's positions (beyond the table, the conversion's "
                 "position policy)")
_BASELINE_NAME = re.compile(r"(?:sinks (\d+) \+ )?window (\d+)")


def baseline_names(L: int) -> list[str]:
    """The baselines of the fidelity tables: windows of one and two chunks, without and with sinks."""
    return [f"window {L}", f"window {2 * L}", f"sinks {BASELINE_SINKS} + window {L}",
            f"sinks {BASELINE_SINKS} + window {2 * L}"]


def long_windows_arg(ap: argparse.ArgumentParser, default) -> None:
    """--long-windows: one count for every long length, or one count per length (in --long's order)."""
    ap.add_argument("--long-windows", type=int, nargs="+", default=default,
                    help="windows per long length: one count for all, or one per --long length (e.g. 8 8 4)")


def windows_per_length(lengths: list[int], counts) -> dict[int, int | None]:
    """--long-windows resolved: {T: windows (None = all)}."""
    if counts is None:
        return {T: None for T in lengths}
    counts = [counts] if isinstance(counts, int) else list(counts)
    if len(counts) == 1:
        counts = counts * len(lengths)
    if len(counts) != len(lengths):
        raise SystemExit(f"error: --long-windows takes one count or one per --long length ({len(lengths)}), "
                         f"got {len(counts)}")
    return dict(zip(lengths, counts))


def describe_counts(per: dict) -> str:
    return ", ".join(f"{n if n is not None else 'all'} at {T}" for T, n in per.items())


def added_rows(L: int) -> list[str]:
    """Rows --with-baselines adds: the look-back variants, round three's, then the baselines."""
    return list(LOOKBACK_VARIANTS) + list(ROUND_THREE) + baseline_names(L)


def row_spec(name: str):
    """What a row name stands for: the converter options of a variant (dict) or a baseline's
    attention (``WindowAttention``: ``window W`` or ``sinks S + window W``)."""
    if name in VARIANTS:
        return dict(VARIANTS[name])
    if name in LOOKBACK_VARIANTS:
        return dict(LOOKBACK_VARIANTS[name])
    for table in (LEARNED_VARIANTS, ROUND_THREE, SELF_RECIPE):
        if name in table:
            return dict(table[name])
    m = _BASELINE_NAME.fullmatch(name)
    if m:
        return WindowAttention(int(m.group(2)), int(m.group(1) or 0))
    raise SystemExit(f"error: unknown variant or baseline {name!r} (variants: "
                     f"{', '.join(repr(n) for n in [*VARIANTS, *LOOKBACK_VARIANTS, *LEARNED_VARIANTS, *ROUND_THREE, *SELF_RECIPE])}; "
                     f"baselines: 'window W', 'sinks S + window W')")


def is_baseline(spec) -> bool:
    return isinstance(spec, WindowAttention)


# --------------------------------------------------------------------------- options

def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="HF GPT-2 directory or hub name (e.g. gpt2) [%(default)s]")
    ap.add_argument("--data", default=None,
                    help="held-out token ids (.npy); default: the model's heldout_ids.npy, else the held-out "
                         "stdlib files of the bundled manifest tokenised with the model's tokenizer")
    ap.add_argument("--quick", action="store_true", help="tiny inputs, for CI")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="fragment directory")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures", help="figure directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-baselines", action="store_true",
                    help="also the look-back variants and the baselines (sliding window, sinks + window), with "
                         "their decode state at 8192 tokens")
    return ap


def setup(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def _in_repo(arg: str) -> str:
    """A path inside the repository, relative to its root; any other argument as it is."""
    p = Path(arg)
    if not p.is_absolute():
        return arg
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return arg


def command_line() -> str:
    """The command as run, with paths inside the repository relative to its root."""
    return " ".join(["python", _in_repo(sys.argv[0]), *(shlex.quote(_in_repo(a)) for a in sys.argv[1:])])


def machine() -> str:
    """The study's machine line: the CPU (``util.machine_info``), torch's threads and versions."""
    return (f"{machine_info()['cpu']}, {torch.get_num_threads()} torch threads ({os.cpu_count()} CPUs visible), "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")


def provenance(args, data_desc: str, cmd: str | None = None) -> str:
    """The block above every table: command, model, data, machine."""
    return "\n".join([
        f"- command: `{cmd or command_line()}`",
        f"- model: `{args.model}`",
        f"- data: {data_desc}",
        f"- machine: {machine()}",
        f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ])


def write_fragment(args, name: str, text: str) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"study_{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(f"wrote {path}")
    return path


def figure_path(args, name: str) -> Path:
    args.figures.mkdir(parents=True, exist_ok=True)
    return args.figures / name


def rel_to_out(args, path: Path) -> str:
    """A figure's path as seen from docs/RESULTS.md (one directory above the fragments)."""
    return os.path.relpath(path, args.out.parent)


# --------------------------------------------------------------------------- models and data

def start(args, with_heldout: bool = True):
    """The prologue every study script shares: setup, the clock, the original model and the
    held-out data -> (t0, hf, model_dir, ids, data_desc); ids/data_desc are None without it."""
    setup(args)
    t0 = time.time()
    try:
        hf, model_dir = load_original(args.model)
    except BSBRExportError as e:  # unreadable model or unreachable hub: one line, exit 1
        raise SystemExit(f"error: {e}") from None
    ids, data_desc = heldout(args, model_dir) if with_heldout else (None, None)
    return t0, hf, model_dir, ids, data_desc


def load_converted(model: str, **options):
    return convert(model, **options).eval()


class Baseline:
    """A baseline as the studies call a model: the original weights (in a conversion whose BSBR
    parts go unused) with ``WindowAttention`` in place of BSBR attention."""

    def __init__(self, model, attention: WindowAttention):
        self.model, self.attention, self.cfg = model, attention, model.cfg

    def __call__(self, input_ids, output_hidden_states=False):
        return self.model(input_ids, impl=self.attention, output_hidden_states=output_hidden_states)

    def eval(self):
        self.model.eval()
        return self

    def state_bytes(self, context: int) -> int:
        return self.attention.state_bytes(self.cfg.n_layer, self.cfg.n_embd, context)


def load_model(model: str, spec, chunk_size: int, **extra):
    """A row of a table: ``spec`` a row name, converter options or a ``WindowAttention``;
    ``extra``: converter options on top (e.g. the position policy, which baselines share)."""
    spec = row_spec(spec) if isinstance(spec, str) else spec
    if is_baseline(spec):
        return Baseline(load_converted(model, chunk_size=chunk_size, **extra), spec)
    return load_converted(model, chunk_size=chunk_size, **{**spec, **extra})


COST_CONTEXT = 8192


def decode_state_bytes(model: str, spec, chunk_size: int, context: int = COST_CONTEXT) -> int:
    """Bytes of the state one sequence carries while decoding after ``context`` tokens (float32):
    a variant's from its ``StateSpec`` (``bytes_at``), a baseline's KV cache of its window and
    sinks. Read from the model's config alone (no weights)."""
    spec = row_spec(spec) if isinstance(spec, str) else spec
    if is_baseline(spec):
        hf, _ = hf_config(model)
        return spec.state_bytes(hf["n_layer"], hf["n_embd"], context)
    cfg, _ = planned_config(model, chunk_size=chunk_size, **spec)
    return StateSpec.from_config(cfg).bytes_at(context)


COST_PREFILL = 4096
COST_FILE = "study_cost.json"  # scripts/study_cost.py's ratios, beside the fragments
COST_FIELDS = ("local_window", "retrieval", "feature_map", "retrieval_weights", "retrieval_until", "compression")


def cost_key(model: str, spec, chunk_size: int):
    """(key, converter options) of the graph a BSBR row exports to: what sets its cost (trained
    values do not), read from the model's config alone; (None, None) for a baseline."""
    spec = row_spec(spec) if isinstance(spec, str) else spec
    if is_baseline(spec):
        return None, None
    cfg, _ = planned_config(model, chunk_size=chunk_size, **spec)
    opts = {f: getattr(cfg, f) for f in COST_FIELDS}
    until = opts["retrieval_until"]
    opts["retrieval_until"] = "all" if until is None else "positions" if until == cfg.n_positions else until
    key = " / ".join(str(opts[f]) for f in COST_FIELDS[:5]) + (f" / κ {opts['compression']}" if opts["compression"]
                                                                 else "")
    return key, opts


def ort_cost(args, spec, chunk_size: int) -> str:
    """A row's ORT prefill against the dense floor (scripts/study_cost.py, run first by
    make_results --run): "1.10x", or "n/a" for a baseline, another chunk size or no cost run."""
    f = args.out / COST_FILE
    key, _ = cost_key(args.model, spec, chunk_size)
    if key is None or not f.is_file():
        return "n/a"
    rec = json.loads(f.read_text())
    r = rec["shapes"].get(key) if rec.get("chunk_size") == chunk_size else None
    return f"{r['ratio']:.2f}x" if r else "n/a"


def ort_cost_header(args) -> str:
    f = args.out / COST_FILE
    T = json.loads(f.read_text())["length"] if f.is_file() else COST_CONTEXT
    return f"ORT prefill at T={T} / dense floor"


@torch.no_grad()
def prefill_seconds(models: dict, T: int = COST_PREFILL, repeats: int = 3) -> dict:
    """Median seconds of one forward pass over T tokens (batch 1, this process's torch threads)
    per model, timed round-robin so that a disturbance of the machine falls on every row alike."""
    V = min(m.cfg.vocab_size for m in models.values())
    x = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
    times = {n: [] for n in models}
    for m in models.values():
        m(x[:, :256])  # warm-up
    for _ in range(repeats):
        for n, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(v)) for n, v in times.items()}


def cost_note(T: int = COST_PREFILL) -> str:
    return (f"Cost: prefill s at T={T}: one forward pass of the torch model over {T} tokens "
            f"(batch 1, median of 3, rows timed round-robin in one process); ORT prefill / dense floor: the "
            "row's graph at GPT-2 small shape in ONNX Runtime against the same graph without attention (section "
            "\"Cost of each conversion in ONNX Runtime\"; n/a for the baselines, which export to no graph here); "
            "decode state MiB at "
            f"T={COST_CONTEXT}: what one sequence carries while decoding after {COST_CONTEXT} tokens, float32 "
            "(BSBR: `StateSpec.bytes_at`; baselines: the KV cache of the window and sinks).")


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 30  # whole files are tokenised, then cut into windows
    return tok


def manifest_path(model_dir: Path) -> Path:
    own = Path(model_dir) / "corpus_manifest.json"
    return own if own.is_file() else ROOT / DEFAULT_MODEL / "corpus_manifest.json"


def stdlib_stream(model_dir: Path, split: str, max_tokens: int | None = None, seed: int | None = None):
    """Token ids of the ``split`` files of this machine's stdlib, joined by <|endoftext|>.

    Files in manifest order, or shuffled with ``seed``; stops once ``max_tokens`` are reached."""
    tok = tokenizer(model_dir)
    eot = tok.convert_tokens_to_ids(EOT)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [e["path"] for e in json.loads(manifest_path(model_dir).read_text()) if e["split"] == split]
    if seed is not None:
        np.random.default_rng(seed).shuffle(files)
    ids: list[int] = []
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids.extend(tok(text)["input_ids"])
        ids.append(eot)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids, dtype=np.int64)


def heldout(args, model_dir: Path) -> tuple[np.ndarray, str]:
    """(held-out token stream, description)."""
    if args.data:
        return np.load(args.data).astype(np.int64), f"`{args.data}`"
    own = Path(model_dir) / "heldout_ids.npy"
    if own.is_file():
        ids = np.load(own).astype(np.int64)
        return ids, f"`{args.model}/heldout_ids.npy` (held-out stdlib files, {len(ids):,} tokens)"
    ids = stdlib_stream(model_dir, "heldout")
    return ids, f"held-out stdlib files of the bundled manifest, tokenised by the model's tokenizer ({len(ids):,} tokens)"


# --------------------------------------------------------------------------- evaluation

def fmt(ms, digits=4) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def pct(ms) -> str:
    m, s = ms
    return f"{100 * m:.2f}% ± {100 * s:.2f}"




def state_bytes(model, max_len: int) -> int:
    """Bytes of the preallocated decode state for batch 1 and ``max_len`` tokens (a baseline: its
    KV cache)."""
    if isinstance(model, Baseline):
        return model.state_bytes(max_len)
    spec = model.state_spec()
    return spec.nbytes(1, spec.capacity(max_len))


# --------------------------------------------------------------------------- shared evaluations

class Reference:
    """The original model's outputs on a fixed set of windows, computed once."""

    def __init__(self, hf, wins: list[torch.Tensor]):
        self.wins = wins
        self.outs = [original_outputs(hf, x[:, :-1]) for x in wins]


@torch.no_grad()
def evaluate(ref: Reference, model) -> tuple[dict, torch.Tensor]:
    """(summary of tables 1-2 metrics and perplexity, top-1 agreement per window and position)."""
    per = [window_metrics(out, model, x) for x, out in zip(ref.wins, ref.outs)]
    return summarise(per), torch.stack([r["top1"] for r in per])


_ORIGINAL_PIECES: dict[int, torch.Tensor] = {}  # one original model per run


@torch.no_grad()
def long_perplexity(hf, model, ids: np.ndarray, T: int, n: int | None) -> dict | None:
    """Perplexities of the same tokens: the original and the model in pieces of n_positions
    tokens, and the model over one window of T tokens; ``change``: the one window against the
    original's pieces with its bootstrap interval over windows (``metrics.perplexity_change``).
    None when the stream is too short."""
    N = hf.config.n_positions
    wins = windows(ids, T, n)
    if not wins:
        return None
    acc = {"orig_pieces": [], "pieces": [], "window": []}
    for x in wins:
        tgt = x[:, 1:]
        pieces = [(s, min(s + N, T)) for s in range(0, T, N)]
        key = hash(x.numpy().tobytes())
        if key not in _ORIGINAL_PIECES:  # the original's NLL of a window: computed once per run
            _ORIGINAL_PIECES[key] = torch.cat([M.nll(hf(input_ids=x[:, a:b]).logits[0], tgt[0, a:b])
                                               for a, b in pieces])
        acc["orig_pieces"].append(_ORIGINAL_PIECES[key])
        acc["pieces"].append(torch.cat([M.nll(model(x[:, a:b])[0], tgt[0, a:b]) for a, b in pieces]))
        acc["window"].append(M.nll(model(x[:, :-1])[0], tgt[0]))
    out = {k: M.perplexity(v) for k, v in acc.items()}
    out["change"] = M.perplexity_change(acc["orig_pieces"], acc["window"])
    out["windows"] = len(wins)
    return out
