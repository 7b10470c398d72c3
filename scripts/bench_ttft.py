"""Time to first token of a short prompt: BSBR's extend graph against HF's own ONNX export.

What a user of ``load(DIR)`` or ``serve DIR`` waits for before the first token of a fresh
prompt: ``Engine.extend`` of the prompt into an empty row, then the argmax of its logits.
The baseline is what the user would run instead: HF ``GPT2LMHeadModel`` exported by
``torch.onnx.export(..., dynamo=True)`` (``bsbr_export.bench.hf_export``), its prefill of the
same prompt in ONNX Runtime with the same threads, then the same argmax. They run alternating
call by call in each of two fresh processes that make them in opposite orders (median of
2 x ``--runs``), on a GPT-2-small-shaped model with
random weights (``scripts/make_random_gpt2.py``) exported for ``--max-seq-len`` tokens.

    python scripts/bench_ttft.py WORKDIR [--lengths 1,32,128] [--max-seq-len 8192] [--runs 9]

WORKDIR keeps the random model, the BSBR export and the HF export between runs. Writes
docs/results/ttft.md (``--out``) with the CPU flags and the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import prepare as prepare_bsbr  # noqa: E402


def prepare(work: Path, max_len: int, log) -> tuple[Path, Path]:
    """The random GPT-2 small and its BSBR export (``bench_decode_batch.prepare``), and its HF ONNX
    export, made once in ``work``."""
    bsbr = Path(prepare_bsbr(work, max_len, ["bsbr"], None, log)["bsbr"])
    base = work / "hf-onnx"
    if not (base / "model.onnx").is_file():
        from bsbr_export.bench.hf_export import export_hf_onnx

        log(f"exporting HF GPT-2 with torch.onnx (dynamo) to {base}")
        export_hf_onnx(work / "hf", base)
    return bsbr, base / "model.onnx"


NAMES = ("bsbr", "separate", "hf")


def timed_calls(bsbr: Path, hf_onnx: Path, lengths, runs: int, threads: int, prepack, reverse: bool) -> dict:
    """{T: {name: [ms of each timed call]}} for the three in one process, made in the order of
    ``NAMES`` (``reverse``: the opposite order; a session made first can run ~10% slower), each
    round starting at the next one."""
    from bsbr_export.bench.profile import QUIET
    from bsbr_export.runtime.engine import Engine
    from bsbr_export.runtime.runners import session_from_onnx

    # The engine as load(DIR) makes it (the prompt and per-token graphs in one session), and with
    # the two in sessions of their own (``join=False``: the prompt graph then runs unpacked); three
    # sessions timed in turn, so none spins (``QUIET``).
    make = {"bsbr": lambda: Engine(bsbr, threads=threads, prepack=prepack, session_options=QUIET),
            "separate": lambda: Engine(bsbr, threads=threads, prepack=prepack, join=False, session_options=QUIET),
            "hf": lambda: session_from_onnx(hf_onnx, threads, config=QUIET)}
    names = list(NAMES[::-1] if reverse else NAMES)
    made = {n: make[n]() for n in names}
    rng = np.random.default_rng(0)
    out = {}
    for T in lengths:
        ids = rng.integers(0, made["bsbr"].vocab_size, T)

        def first(eng):
            return lambda: int(eng.extend(eng.new_state(1), [0], [ids])[0].argmax())

        def hf_first():
            return int(made["hf"].run(["logits"], {"input_ids": ids[None]})[0][0, -1].argmax())

        fns = {"bsbr": first(made["bsbr"]), "separate": first(made["separate"]), "hf": hf_first}
        times = {name: [] for name in fns}
        for i in range(runs + 2):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name]()
                if i >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        out[T] = times
    return out


def measure(bsbr: Path, hf_onnx: Path, lengths, runs: int, threads: int, prepack) -> list[dict]:
    """``timed_calls`` in both construction orders (``bench.jobs.in_both_orders``), rounds pooled."""
    from bsbr_export.bench.jobs import in_both_orders

    both = in_both_orders(timed_calls, bsbr, hf_onnx, lengths, runs, threads, prepack)
    rows = []
    for T in lengths:
        times = {n: both[0][T][n] + both[1][T][n] for n in NAMES}
        rows.append({"T": T} | {k: float(np.median(v)) for k, v in times.items()}
                    | {"paired": float(np.median(np.array(times["bsbr"]) / np.array(times["hf"])))})
        print(f"T={T}: BSBR {rows[-1]['bsbr']:.1f} ms (separate sessions {rows[-1]['separate']:.1f}), HF export "
              f"{rows[-1]['hf']:.1f} ms ({rows[-1]['bsbr'] / rows[-1]['hf']:.2f}x)", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("work", type=Path, help="working directory (models and exports, kept between runs)")
    ap.add_argument("--lengths", default="1,32,128", help="prompt lengths [1,32,128]")
    ap.add_argument("--max-seq-len", type=int, default=8192, help="the BSBR export's maximum length [8192]")
    ap.add_argument("--runs", type=int, default=9, help="timed calls per backend and length [9]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--prepack", choices=["decode", "all", "none"], default="decode",
                    help="the Engine's prepack setting: ORT prepacking for the prompt and per-token graphs (the "
                         "default), for every graph, or none [decode]")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ttft.md"), help="Markdown fragment to write")
    a = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        ap.error(f"--lengths must be integers separated by commas, got {a.lengths!r}")
    if min(lengths) < 1 or max(lengths) > 1024 or a.runs < 1 or a.threads < 1 or a.max_seq_len < max(lengths):
        ap.error("lengths must lie in [1, 1024] (the HF model's positions) and within --max-seq-len; "
                 "--runs and --threads >= 1")
    bsbr, hf_onnx = prepare(a.work, a.max_seq_len, lambda m: print(m, flush=True))
    rows = measure(bsbr, hf_onnx, lengths, a.runs, a.threads, {"all": True, "none": False}.get(a.prepack, "decode"))
    import onnxruntime as ort

    from bsbr_export.util import machine_line, markdown_table

    cmd = " ".join(["python scripts/bench_ttft.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"## Time to first token of a fresh prompt: BSBR extend (prepack {a.prepack}) against the HF export's "
             f"prefill", "",
             f"`{cmd}`: GPT-2 small shape, random weights, fp32, BSBR exported for {a.max_seq_len} tokens; BSBR: "
             f"`Engine.extend` into an empty row + argmax (what `load(DIR)` and `serve` do first: the prompt and "
             f"per-token graphs in one ORT session); BSBR, separate sessions: the same with `Engine(join=False)`, "
             f"the prompt graph in a session of its own; HF: HF GPT-2 "
             f"exported by `torch.onnx.export(dynamo=True)`, its prefill + argmax; the three alternating call by call, "
             f"each round starting at the next, in each of two fresh processes that make them in opposite orders (a "
             f"session made first can run ~10% slower), rounds pooled: median of {2 * a.runs}, ORT thread "
             f"spinning off in every session (the idle sessions' threads would spin through the running one's "
             f"calls); Engine prepack `{a.prepack}`; onnxruntime {ort.__version__}, {a.threads} threads; "
             f"{machine_line()}.", "",
             markdown_table(["prompt tokens", "BSBR ms", "BSBR, separate sessions ms", "HF export ms", "BSBR / HF",
                             "BSBR / HF, median of the rounds' ratios", "separate / HF"],
                            [[r["T"], f"{r['bsbr']:.1f}", f"{r['separate']:.1f}", f"{r['hf']:.1f}",
                              f"{r['bsbr'] / r['hf']:.2f}x", f"{r['paired']:.2f}x", f"{r['separate'] / r['hf']:.2f}x"]
                             for r in rows]),
             "", "A round times each graph once, one after the other; the ratio of a round's two times cancels "
                 "what drifts between rounds (the machine's other load)."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
