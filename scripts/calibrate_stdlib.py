"""`bsbr-export calibrate --data` as a user runs it, on held-in stdlib text, and what it buys on held-out text.

    python scripts/calibrate_stdlib.py [--model models/gpt2-pystdlib] [--minutes 30] [--windows 16]
                                       [--long 2048 4096 8192] [--extra-args ...]
                                       [--out docs/results/calibrate-stdlib.md]

The training files are the ``train`` split of the model's corpus_manifest.json (the stdlib files
the bundled model was trained on), copied from this machine's stdlib into a temporary directory
and given to the command as ``--data DIR``; the command runs in a subprocess with ``--stage2``
and ``--minutes``, the rest of its options at their defaults (plus ``--extra-args``). The
calibrated checkpoint is then measured as scripts/self_calibration.py measures: top-1 agreement,
mean KL and perplexity against the original on ``--windows`` held-out windows of 1024 tokens of
heldout_ids.npy (files of the ``heldout`` split: text neither training nor calibration saw),
agreement in chunks 2 and 7, and perplexity over long windows against the original in 1024-token
pieces. Last, the main command exports the checkpoint (``--engine onnx``) and its parity grid is
reported. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bsbr_export.convert import convert, load_bsbr  # noqa: E402
from bsbr_export.fidelity import load_original, original_outputs, windows  # noqa: E402
from bsbr_export.util import atomic_write_text, machine_line  # noqa: E402
from self_calibration import long_rows, measure, row, tables  # noqa: E402
from studylib import manifest_path  # noqa: E402


def held_in_files(model: Path, dest: Path) -> int:
    """Copy the ``train`` split's stdlib files into ``dest``; returns how many were there to copy."""
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for e in json.loads(manifest_path(model).read_text()):
        src = root / e["path"]
        if e["split"] == "train" and src.is_file():
            to = dest / e["path"]
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, to)
            n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2-pystdlib")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--long", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--extra-args", default="", help="more options of the calibrate command, one shell string")
    ap.add_argument("--out", default=str(ROOT / "docs/results/calibrate-stdlib.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    model = Path(a.model)
    hf, d = load_original(model)
    held = np.load(d / "heldout_ids.npy")
    wins = windows(held, 1024, a.windows)
    hf_outs = [original_outputs(hf, x[:, :-1]) for x in wins]
    with tempfile.TemporaryDirectory(prefix="calibrate-stdlib-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "calibrated"
        files = held_in_files(model, data)
        cmd = ["bsbr-export", "calibrate", str(model), "--data", str(data), "--out", str(out), "--stage2",
               "--minutes", f"{a.minutes:g}", *shlex.split(a.extra_args)]
        print("$", shlex.join(cmd), flush=True)
        t_cal = time.time()
        subprocess.run(cmd, check=True)
        t_cal = time.time() - t_cal
        rec = json.loads((out / "calibration.json").read_text())
        cal = load_bsbr(out)
        cfg = cal.cfg
        name = f"{cfg.local_window}, {cfg.retrieval_weights} weights, {cfg.feature_map} φ"
        before = measure(hf_outs, convert(a.model, **rec["options"]), wins)
        after = measure(hf_outs, cal, wins)
        steps = " + ".join(str(s["steps"]) for s in rec["stages"])
        took = f"{rec['seconds']:.0f} s training ({steps} steps), {t_cal:.0f} s in all"
        rows = [row(name, "none", before), row(name, "calibrate --data", after, took)]
        print(rows, flush=True)
        long = long_rows(hf, cal, held, a.long, name, "calibrate --data")
        exported = Path(tmp) / "exported"
        main_cmd = ["bsbr-export", str(out), "--out", str(exported), "--engine", "onnx"]
        t_main = time.time()
        res = subprocess.run(main_cmd, capture_output=True, text=True)
        t_main = time.time() - t_main
        parity = "failed to run" if res.returncode else (
            "passed" if all(v.get("passed") for v in json.loads((exported / "manifest.json").read_text())
                            ["parity"].values() if isinstance(v, dict) and "passed" in v) else "failed")
    d = rec["data"]
    this = shlex.join(["python", "scripts/calibrate_stdlib.py", *(argv if argv is not None else sys.argv[1:])])
    stopped = "; ".join(f"stage {s['stage']}: {s['stopped']}" for s in rec["stages"])
    lines = ["## `bsbr-export calibrate --data`: held-in stdlib text, held-out agreement", "",
             f"    {this.strip()}", "",
             f"- machine: {machine_line()}",
             f"- the command: `bsbr-export calibrate {a.model} --data DIR --out OUT --stage2 --minutes {a.minutes:g}"
             f"{(' ' + a.extra_args) if a.extra_args else ''}`; DIR: the {files} `train` files of the model's "
             f"corpus_manifest.json from this machine's stdlib ({d['documents']} documents, {d['tokens_train']:,} "
             f"training and {d['tokens_heldout']:,} held-out tokens); {stopped}",
             f"- measured on {len(wins)} held-out windows of 1024 tokens of heldout_ids.npy (files of the "
             "`heldout` split, which neither the model nor the calibration saw); perplexity against the "
             "original's on the same windows; chunk 2 / chunk 7: top-1 agreement inside those chunks", "",
             *tables(rows, long)]
    lines += [f"The main command on the calibrated checkpoint (`bsbr-export OUT --out DIR --engine onnx`): parity "
              f"{parity}, {t_main:.0f} s.", "", f"Whole script: {time.time() - t0:.0f} s."]
    atomic_write_text(a.out, "\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
