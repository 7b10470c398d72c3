"""The main command on every GPT-2 size: time and peak memory per stage, into a RESULTS fragment.

    flock /tmp/bsbr-cpu.lock python scripts/gpt2_family.py WORKDIR [--shapes gpt2,gpt2-medium,...]

For each shape (the real configurations of gpt2, gpt2-medium, gpt2-large and gpt2-xl, 1024
positions, random weights written straight to safetensors one tensor at a time), runs
``bsbr-export MODEL --engine onnx --out OUT --max-seq-len N`` under ``/usr/bin/time -v`` (N = 1024,
256 for gpt2-xl) and reads the manifest's per-stage times and peaks. W is the converted
checkpoint's tensor bytes. Writes docs/results/gpt2-family.md after every shape, so a partial
run keeps what it measured. Each shape's files are removed once it is measured.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = ROOT / "docs" / "results" / "gpt2-family.md"
SHAPES = {"gpt2": (12, 768, 12, 1024), "gpt2-medium": (24, 1024, 16, 1024), "gpt2-large": (36, 1280, 20, 1024),
          "gpt2-xl": (48, 1600, 25, 256)}  # n_layer, n_embd, n_head, --max-seq-len
VOCAB, POSITIONS = 50257, 1024


def hf_tensors(n_layer: int, E: int):
    """(name, shape, kind) of an HF GPT-2 checkpoint; kind: "w" random, "one", "zero"."""
    yield "transformer.wte.weight", (VOCAB, E), "w"
    yield "transformer.wpe.weight", (POSITIONS, E), "w"
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            yield p + ln + ".weight", (E,), "one"
            yield p + ln + ".bias", (E,), "zero"
        for mod, shape in (("attn.c_attn", (E, 3 * E)), ("attn.c_proj", (E, E)), ("mlp.c_fc", (E, 4 * E)),
                           ("mlp.c_proj", (4 * E, E))):
            yield p + mod + ".weight", shape, "w"
            yield p + mod + ".bias", (shape[1],), "zero"
    yield "transformer.ln_f.weight", (E,), "one"
    yield "transformer.ln_f.bias", (E,), "zero"


def write_random_gpt2(out: Path, n_layer: int, E: int, n_head: int, seed: int = 0) -> None:
    """An HF GPT-2 directory with N(0, 0.02) weights, streamed into model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB, "n_positions": POSITIONS,
        "n_embd": E, "n_layer": n_layer, "n_head": n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256}, indent=1))
    specs, header, offset = list(hf_tensors(n_layer, E)), {}, 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _, shape, kind in specs:
            a = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) if kind == "w"
                 else np.full(shape, 1.0 if kind == "one" else 0.0, np.float32))
            f.write(a.tobytes())


def measure(name: str, work: Path) -> dict:
    n_layer, E, n_head, max_len = SHAPES[name]
    model, out = work / name / "hf", work / name / "out"
    shutil.rmtree(work / name, ignore_errors=True)
    write_random_gpt2(model, n_layer, E, n_head)
    cmd = ["bsbr-export", str(model), "--engine", "onnx", "--out", str(out), "--max-seq-len", str(max_len)]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    r = {"name": name, "layers": n_layer, "width": E, "heads": n_head, "max_seq_len": max_len,
         "exit": proc.returncode, "peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None}
    if proc.returncode == 0:
        m = json.loads((out / "manifest.json").read_text())
        W = (out / "bsbr" / "model.safetensors").stat().st_size
        onnx = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
        r |= {"W": W, "onnx_bytes": onnx, "stages": m["stages"], "seconds": m["seconds"],
              "cases": m["parity"]["onnx_fp32"]["cases"], "worst": m["parity"]["onnx_fp32"]["worst_max_abs"],
              "reference": m["parity_reference"]["mode"],
              # The bound: 2.5 W + twice the largest grid case's logits (batch 3 x N x vocab, fp32).
              "target_bytes": 2.5 * W + 2 * 3 * max_len * VOCAB * 4}
    else:
        r["error"] = (log.strip().splitlines() or ["no output"])[-1][:300]
    shutil.rmtree(work / name, ignore_errors=True)
    return r


def fragment(rows: list[dict], command: str) -> str:
    sys.path.insert(0, str(ROOT))
    from bsbr_export.util import machine_line, markdown_table

    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    table = []
    for r in rows:
        if r["exit"] != 0:
            table.append([r["name"], r["max_seq_len"], "—", "—", "—", "—", "—", "—",
                          f"failed (exit {r['exit']}): {r['error']}"])
            continue
        st, W = r["stages"], r["W"]
        peak, bound = r["peak_rss_bytes"], r["target_bytes"]
        table.append([r["name"], r["max_seq_len"], gib(W), f"{r['onnx_bytes'] / W:.3f}",
                      *(f"{st[s]['seconds']:.0f} s, {gib(st[s]['peak_rss_bytes'])} ({st[s]['peak_rss_bytes'] / W:.2f} W)"
                        if s in st else "—" for s in ("convert", "export", "reference", "parity_fp32")),
                      r["reference"], f"{gib(peak)} ({peak / W:.2f} W)",
                      f"{gib(bound)}: {'met' if peak <= bound else 'MISSED'}",
                      f"{r['seconds'] / 60:.1f} min, {r['cases']} cases pass, worst {r['worst']:.1e}"])
    return ("## The GPT-2 family on one machine\n\n"
            "Every GPT-2 size (the real configurations, random weights, 1024 positions) through the main "
            "command; peaks are RSS high-water marks (GiB), per stage from the manifest (the mark reset at "
            "each stage's start) and for the whole process from `/usr/bin/time -v`. W = the converted "
            "checkpoint's tensors. reference: where torch's logits lived during parity (`--parity-reference "
            "auto`: memory = the torch model beside the ONNX Runtime session; disk = torch ran the grid first, "
            "its logits recorded to a file, the model freed before the session opened, stage \"reference\"). "
            "Target: whole command peak <= 2.5 W + 2 x the largest grid case's logits (batch 3 x N x vocab x 4 "
            "bytes).\n\n"
            f"- command: `{command}`\n- machine: {machine_line()}\n\n"
            + markdown_table(["shape", "--max-seq-len", "W GiB", "ONNX files / W", "convert", "export",
                              "reference", "parity fp32", "reference kept in", "whole command peak",
                              "target", "result"], table))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="scratch directory (a few times the largest model's size)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from " + ", ".join(SHAPES))
    args = ap.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    bad = [s for s in names if s not in SHAPES]
    if bad:
        ap.error(f"unknown shapes {bad}")
    command = "python scripts/gpt2_family.py WORKDIR" + ("" if names == list(SHAPES) else f" --shapes {args.shapes}")
    rows = []
    for name in names:
        rows.append(measure(name, args.work))
        (args.work / "rows.json").write_text(json.dumps(rows, indent=1))
        FRAGMENT.write_text(fragment(rows, command))
        print(f"{name}: exit {rows[-1]['exit']}, peak {rows[-1]['peak_rss_bytes']}", flush=True)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
