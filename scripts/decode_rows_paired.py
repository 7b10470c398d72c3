"""A decode step of many rows against a step of one row, timed in pairs in one process.

``bench_decode_batch.py`` times each batch in a process of its own; on a shared machine the same
one-row step then differs between processes by more than the target's margin (GPT-2 small,
context 256 against 8192, same work: 25.1 against 20.4 ms in one run). Here one engine holds a
state of 1 row and a state of ``--rows`` rows, both filled with random values of ``--context``
tokens (``bench_decode_batch.filled_state``) and banks reserved for the whole run; each
round steps every case once, back to back, round i starting at the i-th case. The whole run is
made twice, in two fresh processes that make the sessions in opposite orders, and their rounds
pooled (``measure_balanced``: the session made first in a process can run ~10% slower). Reported:
the median step of each, the mean (chunk closes included: any 128 consecutive steps hold one close
per row), and the median and mean of the rounds' ratios. With ``--floor``, each round also runs the dense floor
(the same GPT-2 with attention removed: every dense weight read once per step, what no decode
can undercut) on one token of 1 row and of ``--rows`` rows, so the floor's own ratio of rows
stands beside BSBR's.

With ``--long N`` a 1-row state of N tokens joins the rounds (per-token time against context), and
with ``--kv`` GPT-2 with a KV cache (``bench_decode_batch``'s kv-ort export) at 1 and ``--rows``
rows, on an empty cache and (with ``--long``) at N tokens, so that every decode target is judged on
steps of one process, taken in turn (the targets table).

    python scripts/decode_rows_paired.py WORK [--rows 16] [--context 256] [--steps 128] [--threads 2]
        [--floor] [--kv] [--long 8192] [--out docs/results/decode-rows-paired.md]

WORK: ``bench_decode_batch.py``'s working directory (the random GPT-2 small and its BSBR export,
made there when missing).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_batch import filled_state, kv_fill, kv_step, prepare  # noqa: E402

from bsbr_export.bench.profile import QUIET  # noqa: E402  several sessions stepped in turn (see ``measure``)


def floor_graph(work: Path) -> Path:
    """The dense floor of ``work``'s random GPT-2 (attention removed, no state), exported once."""
    from bsbr_export.bench.profile import export_prefill

    out = work / "floor" / "model.onnx"
    return out if out.is_file() else export_prefill(work / "hf", out.parent, 1024, "none")


def stats(one, many) -> dict:
    one, many = np.array(one), np.array(many)
    return {"one_median": float(np.median(one)), "one_mean": float(one.mean()), "many_median": float(np.median(many)),
            "many_mean": float(many.mean()), "ratio_median": float(np.median(many / one)),
            "ratio_of_means": float(many.mean() / one.mean())}




def kv_stepper(path: str, rows: int, context: int | None, threads: int, rng):
    """One step of GPT-2 with a KV cache (``kvcache.KVCacheDecoder``) over ``rows`` rows whose caches
    hold ``context`` random tokens and grow by one per step; ``context=None``: every step on an
    empty cache (the decoder's one-token step without past)."""
    from bsbr_export.kvcache import KVCacheDecoder

    m = KVCacheDecoder(path, threads=threads, session_options=QUIET)
    if context:
        kv_fill(m, rows, context, rng)
    tok = np.ones(rows, np.int64)

    def step():
        nonlocal tok
        if not context:
            m.start(rows)
        tok = kv_step(m, tok).argmax(-1).astype(np.int64)
    return step


def measure(path: str, rows: int, context: int, steps: int, warmup: int, threads: int, floor=None,
            kv: str | None = None, long: int | None = None, reverse: bool = False) -> dict:
    """Median and mean step of every case, stepped in turn round after round in this process
    (round i starts at the i-th case, so that each case takes every place in a round alike).

    Cases: BSBR's 1-row and ``rows``-row states of ``context`` tokens; with ``floor``, the dense
    floor's step of 1 and ``rows`` rows; with ``long``, BSBR's 1-row state of ``long`` tokens;
    with ``kv`` (a KV-cache graph), its 1-row and ``rows``-row steps at ``context``, its
    empty-cache step, and (with ``long``) its 1-row step at ``long``. ``reverse``: the sessions
    are made in the opposite order (KV caches, floor, BSBR: see ``measure_balanced``)."""
    from bsbr_export.runtime.engine import Engine

    # Several sessions stepped in turn: with ORT's thread spinning on, each one's idle threads spin through
    # the others' runs (a step then costs about twice as much), so with more than one session none spins.
    quiet = QUIET if (floor or kv) else None
    rng = np.random.default_rng(0)
    room = lambda c: c + warmup + steps  # noqa: E731
    made, tok = {}, {}

    def make_bsbr():
        eng = Engine(path, threads=threads, session_options=quiet)
        for B, c in ((1, context), (rows, context)) + (((1, long),) if long else ()):
            st, key = filled_state(eng, B, c, rng, room(c)), ("bsbr", B, c)
            tok[key] = np.ones(B, np.int64)

            def step(key=key, st=st):
                tok[key] = eng.decode(st, tok[key]).argmax(-1).astype(np.int64)
            made[key] = step

    def make_floor():
        from bsbr_export.runtime import session_from_onnx

        sess = session_from_onnx(str(floor), threads, ["CPUExecutionProvider"], config=QUIET)
        for B in (1, rows):
            made[("floor", B, 1)] = lambda B=B: sess.run(["logits"], {"input_ids": np.ones((B, 1), np.int64)})

    def make_kv():
        for B, c in ((1, context), (rows, context), (1, None)) + (((1, long),) if long else ()):
            made[("kv", B, c)] = kv_stepper(kv, B, c, threads, rng)

    makers = [make_bsbr] + [make_floor] * bool(floor) + [make_kv] * bool(kv)
    for make in reversed(makers) if reverse else makers:
        make()
    keys = sorted(made, key=lambda k: ("bsbr", "floor", "kv").index(k[0]))  # the report's order
    times = {k: [] for k in keys}
    for i in range(warmup + steps):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            t0 = time.perf_counter()
            made[k]()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return summary({k: np.array(t) for k, t in times.items()}, rows, context)


def summary(cases: dict, rows: int, context: int) -> dict:
    """``measure``'s result from each case's step times (rounds aligned across cases)."""
    out = stats(cases[("bsbr", 1, context)], cases[("bsbr", rows, context)])
    if ("floor", 1, 1) in cases:
        out["floor"] = stats(cases[("floor", 1, 1)], cases[("floor", rows, 1)])
    return out | {"cases": cases}


def measure_balanced(*args, **kw) -> dict:
    """``measure`` in both construction orders (``bench.jobs.in_both_orders``), rounds pooled."""
    from bsbr_export.bench.jobs import in_both_orders

    runs = in_both_orders(measure, *args, **kw)
    cases = {k: np.concatenate([r["cases"][k] for r in runs]) for k in runs[0]["cases"]}
    return summary(cases, args[1], args[2])


def targets(r: dict, rows: int, context: int, long: int | None) -> list[list[str]]:
    """Issue targets judged on the paired steps: [target, measured, need, status, bound] rows. The
    bound: the same comparison with the dense floor's step in BSBR's place (what a decoder that
    reads GPT-2's dense weights once per step, and nothing else, would measure), where the floor ran."""
    t = r["cases"]
    med = lambda k: float(np.median(t[k]))  # noqa: E731
    ratio = lambda a, b: float(np.median(t[a] / t[b]))  # noqa: E731  median of the rounds' ratios
    one, many, f1, fm = ("bsbr", 1, context), ("bsbr", rows, context), ("floor", 1, 1), ("floor", rows, 1)
    floor = f1 in t
    out = [(f"{rows}-row step / 1-row step @ {context}", ratio(many, one), "<=", 2.0, floor and ratio(fm, f1))]
    if ("kv", 1, context) in t:
        kv1, kvm, kv0 = ("kv", 1, context), ("kv", rows, context), ("kv", 1, None)
        out += [(f"batch 1 @ {context}: BSBR step / KV-cache step", ratio(one, kv1), "<=", 1.0, floor and ratio(f1, kv1)),
                (f"batch 1 @ {context}: BSBR step / KV-cache empty-cache step", ratio(one, kv0), "<=", 1.15,
                 floor and ratio(f1, kv0)),
                (f"{rows} rows @ {context}: BSBR tokens/s / KV-cache tokens/s", med(kvm) / med(many), ">=", 1.5,
                 floor and med(kvm) / med(fm))]
    if long:
        out.append((f"batch 1: BSBR step @ {long} / @ {context} (means, closes included)",
                    float(t[("bsbr", 1, long)].mean() / t[one].mean()), "<=", 1.05, None))
        if ("kv", 1, long) in t:
            out.append((f"batch 1 @ {long}: KV-cache step / BSBR step", ratio(("kv", 1, long), ("bsbr", 1, long)),
                        ">=", 5.0, floor and ratio(("kv", 1, long), f1)))
    ok = {"<=": lambda m, n: m <= n, ">=": lambda m, n: m >= n}
    return [[name, f"{m:.3f}", f"{op} {need}", "met" if ok[op](m, need) else "MISSED",
             "" if not bound else f"{bound:.3f}" + ("" if ok[op](bound, need) else " (out of reach here)")]
            for name, m, op, need, bound in out]


def step_arguments(doc: str, steps: int, warmup: int, max_len: int) -> argparse.ArgumentParser:
    """The options this script and ``decode_profile.py`` share: the work directory, the two states
    (1 row and ``--rows``, ``--context`` tokens), the steps and the export."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="bench_decode_batch.py's working directory")
    ap.add_argument("--rows", type=int, default=16, help="rows of the many-row state [16]")
    ap.add_argument("--context", type=int, default=256, help="tokens each row holds at the start [256]")
    ap.add_argument("--steps", type=int, default=steps, help=f"timed rounds [{steps}]")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first [{warmup}]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--max-len", type=int, default=max_len, help=f"the BSBR export's maximum length [{max_len}]")
    return ap


def main(argv=None) -> None:
    ap = step_arguments(__doc__, 128, 3, 8192)
    ap.add_argument("--conversion", default=None, help="conversion options of the export (bench_decode_batch's)")
    ap.add_argument("--floor", action="store_true",
                    help="also the dense floor's one-token step of 1 and --rows rows, in the same rounds")
    ap.add_argument("--kv", action="store_true",
                    help="also GPT-2 with a KV cache (bench_decode_batch's kv-ort export) in the same rounds: 1 and "
                         "--rows rows at --context, its empty-cache step, and 1 row at --long; and the targets table")
    ap.add_argument("--long", type=int, default=None, help="also BSBR's (and with --kv the KV cache's) 1-row step "
                                                          "at this context, in the same rounds")
    ap.add_argument("--out", type=Path, default=Path("docs/results/decode-rows-paired.md"), help="Markdown to write")
    a = ap.parse_args(argv)
    if a.rows < 2 or a.context < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        ap.error("--rows must be >= 2; --context, --steps and --threads >= 1; --warmup >= 0")
    if max(a.context, a.long or 0) + a.warmup + a.steps > a.max_len:
        ap.error(f"--context (and --long) + --warmup + --steps must fit the export's {a.max_len} tokens")
    if a.long is not None and a.long <= a.context:
        ap.error(f"--long must be more than --context ({a.context}), got {a.long}")
    paths = prepare(a.work, a.max_len, ["bsbr"] + ["kv-ort"] * a.kv, None, lambda m: print(m, flush=True),
                    a.conversion or "")
    r = measure_balanced(str(paths["bsbr"]), a.rows, a.context, a.steps, a.warmup, a.threads,
                         floor_graph(a.work) if a.floor else None, paths["kv-ort"] if a.kv else None, a.long)
    rows = [["median step", f"{r['one_median']:.1f}", f"{r['many_median']:.1f}",
             f"{r['ratio_median']:.2f}x (median of the rounds' ratios)"],
            ["mean step (closes included)", f"{r['one_mean']:.1f}", f"{r['many_mean']:.1f}",
             f"{r['ratio_of_means']:.2f}x (ratio of the means)"]]
    if a.floor:
        f = r["floor"]
        rows += [["dense floor, median step", f"{f['one_median']:.1f}", f"{f['many_median']:.1f}",
                  f"{f['ratio_median']:.2f}x (median of the rounds' ratios)"],
                 ["BSBR step / dense floor step (medians)", f"{r['one_median'] / f['one_median']:.2f}x",
                  f"{r['many_median'] / f['many_median']:.2f}x", ""]]
    import onnxruntime as ort

    from bsbr_export.util import atomic_write_text, machine_line, markdown_table

    cmd = shlex.join(["python", "scripts/decode_rows_paired.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        ("## Decode targets: BSBR, the dense floor and a KV cache, timed in pairs" if a.kv else
         f"## Decode: a step of {a.rows} rows against a step of one row, timed in pairs")
        + (f" (conversion {a.conversion})" if a.conversion else ""), "",  # its own heading: RESULTS.md's anchors
        f"`{cmd}`: GPT-2 small shape, random weights, fp32, the BSBR export of `bench_decode_batch.py` (its "
        f"conversion: {a.conversion or 'the default'}); one engine, a 1-row and a {a.rows}-row state of "
        f"{a.context} tokens each, stepped in turn, {a.steps} rounds after {a.warmup}, in each of two fresh processes "
        f"that make the sessions in opposite orders, the rounds pooled"
        + (" (with the dense floor's step of 1 and of the same rows: the same GPT-2 exported with "
           "attention removed, one token per row; ORT thread spinning off in every session, whose idle threads would "
           "otherwise spin through the others' runs)" if a.floor else "")
        + f"; onnxruntime {ort.__version__}, {a.threads} threads; {machine_line()}.", "",
        markdown_table(["", "1 row ms", f"{a.rows} rows ms", f"{a.rows} rows / 1 row"], rows), ""])
    if a.kv or a.long:
        name = {"bsbr": "BSBR", "floor": "dense floor", "kv": "KV cache"}
        each = [[name[b], str(B), "empty" if c is None else ("" if b == "floor" else str(c)),
                 f"{np.median(t):.1f}", f"{t.mean():.1f}", f"{B / t.mean() * 1e3:.1f}"]
                for (b, B, c), t in r["cases"].items()]
        text += "\n".join([
            "Every case of the same rounds (the KV cache: GPT-2 exported with past by `kvcache.py`, positions "
            "clamped at 1023 as in `bench_decode_batch.py`, its cache growing by one token per step; "
            "ORT thread spinning off in every session):", "",
            markdown_table(["case", "rows", "context", "ms/step (median)", "ms/step (mean)", "tokens/s"], each), "",
            "Targets (issue: decode at the dense floor), judged on these paired steps:", "",
            markdown_table(["target", "measured", "need", "status", "the dense floor in BSBR's place"],
                           targets(r, a.rows, a.context, a.long)), ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
