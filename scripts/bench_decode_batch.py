"""Decode step cost by rows x context: BSBR's engine against GPT-2 with a KV cache in ONNX Runtime.

For each backend, batch (rows decoding together) and context (tokens each row already holds),
in a process of its own: ``--steps`` decode steps after ``--warmup``, each row fed its argmax;
ms per step (median, and mean over the steps, chunk closes included: any 128 consecutive
positions hold one close per row) and tokens/s (rows / mean step). GPT-2 small shape, random
weights (``scripts/make_random_gpt2.py``), fp32 unless named, ``--threads`` ORT threads.

  bsbr          the runtime's engine (``runtime.engine.Engine``) over ``bsbr-export export``'s graphs,
                its state set to random values of a state holding ``context`` tokens
  bsbr-int8     the same with ``--int8`` graphs (int8 dense weights)
  kv-ort        GPT-2 with a KV cache as this project exports it in Optimum's layout (``kvcache.py``)
  optimum       GPT-2 exported by ``optimum-cli export onnx --task text-generation-with-past`` (run in
                a virtual environment of its own, ``--optimum-python``), run by the same IOBinding
                decoder; its cache filled with random keys/values of ``context`` tokens
  optimum-int8  that graph through ``onnxruntime.quantization.quantize_dynamic`` (int8 weights)

The KV-cache graphs have GPT-2's 1024 learned positions: beyond them their position ids are
clamped to 1023, which changes no cost. Their empty-cache step (one token, no past) is reported
beside them. Writes ``--out`` (JSON) and ``--md`` (Markdown with the CPU flags and the command).

    python scripts/bench_decode_batch.py WORK [--batches 1,4,16,32] [--contexts 256,2048,8192]
        [--backends bsbr,kv-ort,optimum,bsbr-int8,optimum-int8] [--steps 128] [--optimum-python PY]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bsbr_export.util import machine_line

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("bsbr", "kv-ort", "optimum", "bsbr-int8", "optimum-int8")


# --------------------------------------------------------------------------- preparing the models

def stale_format(graph: Path) -> bool:
    """Whether an export kept in a work directory has another state format than this runtime reads."""
    from bsbr_export.ops.state import FORMAT
    from bsbr_export.runtime.engine import read_metadata

    return read_metadata(graph).get("state", {}).get("format") != FORMAT


def prepare(work: Path, max_len: int, backends, optimum_python: str | None, log, conversion: str = "") -> dict:
    """Every model a backend needs, made once in ``work``: {backend: path or a reason string}.
    ``conversion``: conversion options of the BSBR export (e.g. "--local-window lookback")."""
    hf, paths = work / "hf", {}
    if not (hf / "config.json").is_file():
        log(f"writing the random GPT-2 small to {hf}")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_gpt2.py"), str(hf)], check=True)
    for b, flag in (("bsbr", []), ("bsbr-int8", ["--int8"])):
        tag = "".join(f"-{w.lstrip('-')}" for w in conversion.split())
        d = work / f"bsbr-{max_len}{tag}"
        graph = d / ("decode_int8.onnx" if flag else "decode.onnx")
        if b in backends and (not graph.is_file() or stale_format(graph)):
            log(f"exporting BSBR {' '.join(flag) or 'fp32'} to {d}")
            subprocess.run([sys.executable, "-m", "bsbr_export.cli", "export", str(hf), "--out", str(d),
                            "--max-seq-len", str(max_len), *flag, *conversion.split()], check=True)
        paths[b] = str(d)
    if "kv-ort" in backends:
        from bsbr_export.kvcache import GRAPH_FILE, export_kvcache

        if not (work / "kv" / GRAPH_FILE).is_file():
            log("exporting GPT-2 with a KV cache (kvcache.py)")
            export_kvcache(hf, work / "kv")
        paths["kv-ort"] = str(work / "kv" / GRAPH_FILE)
    opt = work / "optimum" / "model.onnx"
    if {"optimum", "optimum-int8"} & set(backends):
        if not opt.is_file():
            py = optimum_python or "python"
            cli = str(Path(py).parent / "optimum-cli") if optimum_python else "optimum-cli"
            log(f"exporting with {cli} (text-generation-with-past)")
            r = subprocess.run([cli, "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past",
                                str(opt.parent)], capture_output=True, text=True)
            if r.returncode != 0 or not opt.is_file():
                reason = f"optimum export failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}"
                paths.update(optimum=reason, **{"optimum-int8": reason})
        if opt.is_file():
            paths["optimum"] = str(opt)
            q = opt.parent / "model_int8.onnx"
            if "optimum-int8" in backends and not q.is_file():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                log("quantize_dynamic of the Optimum decoder (int8 weights)")
                quantize_dynamic(str(opt), str(q), weight_type=QuantType.QInt8, use_external_data_format=True)
            paths["optimum-int8"] = str(q)
    return paths


# --------------------------------------------------------------------------- one case (child process)

def random_bsbr_state(spec, batch: int, context: int, rng) -> dict:
    """Stacked random state (batch, layer, ...) of rows holding ``context`` tokens (normalisers positive),
    their banks at the chunks the engine keeps (``StateSpec.banked``)."""
    held = spec.banked(context)
    st = {n: rng.standard_normal([batch] + spec.shape(n, 1, max(held, 1))[1:], dtype=np.float32) * 0.1
          for n in ("state_k", "state_v", "state_S", "state_bank_h", "state_bank_F")}
    if spec.normalised:
        for n in ("state_S", "state_bank_F"):
            st[n][..., -1] = np.abs(st[n][..., -1]) + 1.0
    return st


def filled_state(eng, batch: int, context: int, rng, room: int):
    """A state of ``batch`` rows of ``eng`` holding random values of ``context`` tokens
    (``random_bsbr_state``), each row's bank reserved for ``room`` tokens, as a server reserves
    it at admission."""
    st = eng.new_state(batch)
    st.set_rows(slice(None), random_bsbr_state(eng.spec, batch, context, rng), context)
    for r in range(batch):
        eng.reserve(st, r, room)
    return st


def kv_fill(m, rows: int, context: int, rng) -> None:
    """``m`` (a ``KVCacheDecoder``) holds ``rows`` caches of ``context`` random tokens."""
    m.fill([tuple(rng.standard_normal((rows, m.n_head, context, m.head_dim), dtype=np.float32) for _ in range(2))
            for _ in range(m.n_layer)])


def kv_step(m, tok) -> np.ndarray:
    """One token per row on ``m``'s caches -> logits (rows, V). Positions clamp at 1023, GPT-2's
    table (the same cost: a position is a row of the table whatever its value)."""
    pos = np.full((len(tok), 1), min(m.length, 1023), np.int64)
    return m.step(tok[:, None], position_ids=pos)[:, -1]


def run_case(case: dict) -> dict:
    backend, B, ctx, threads = case["backend"], case["batch"], case["context"], case["threads"]
    rng = np.random.default_rng(0)
    extra = {}
    if backend.startswith("bsbr"):
        from bsbr_export.runtime.engine import Engine

        eng = Engine(case["path"], precision="int8" if backend.endswith("int8") else "fp32", threads=threads)
        st = filled_state(eng, B, ctx, rng, ctx + case["warmup"] + case["steps"])
        step = lambda tok: eng.decode(st, tok)  # noqa: E731
        state_bytes = st.nbytes() / B
    else:
        from bsbr_export.kvcache import KVCacheDecoder

        m = KVCacheDecoder(case["path"], threads=threads)

        def empty(tok):
            m.start(B)
            return kv_step(m, tok)

        tok = np.ones(B, np.int64)
        for _ in range(case["warmup"]):
            empty(tok)
        extra["empty_cache_ms"] = float(np.median([_timed(empty, tok)[1] for _ in range(case["steps"] // 4 + 1)]))
        kv_fill(m, B, ctx, rng)
        step = lambda tok: kv_step(m, tok)  # noqa: E731
        state_bytes = m.cache_bytes() / B
    tok, times = np.ones(B, np.int64), []
    for i in range(case["warmup"] + case["steps"]):
        logits, dt = _timed(step, tok)
        tok = logits.argmax(-1).astype(np.int64)
        if i >= case["warmup"]:
            times.append(dt)
    t = np.array(times)
    return {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()), "tokens_per_s": B / (t.mean() / 1e3),
            "state_bytes_per_row": int(state_bytes), "peak_rss_gib": _peak_rss() / 2**30} | extra


def run_memory_case(case: dict) -> dict:
    """Resident memory of a runtime over the BSBR export holding ``rows`` sequences of ~200 prompt
    + 56 generated tokens (``Engine.prefill`` and ``decode``, as ``load(DIR).generate`` runs them)."""
    from bsbr_export.ops.state import kv_cache_bytes
    from bsbr_export.runtime.engine import Engine

    eng = Engine(case["path"], threads=case["threads"])
    B, rng = case["rows"], np.random.default_rng(0)
    st = eng.new_state(B)
    ids = [rng.integers(0, eng.vocab_size, 200) for _ in range(B)]
    for r in range(B):
        eng.reserve(st, r, 256)
    logits = eng.prefill(st, list(range(B)), ids)
    for _ in range(56):
        logits = eng.decode(st, logits.argmax(-1))
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    sp = eng.spec
    return {"rss_gib": rss / 2**30, "peak_rss_gib": _peak_rss() / 2**30, "state_bytes_per_row": st.nbytes() / B,
            "kv_cache_bytes_per_row": kv_cache_bytes(sp.layer, sp.embd, 256)}


def _timed(fn, arg):
    t0 = time.perf_counter()
    out = fn(arg)
    return out, (time.perf_counter() - t0) * 1e3


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# --------------------------------------------------------------------------- report

def targets(res: dict) -> list[tuple[str, float | None, str, float]]:
    """(description, measured, comparison, threshold) of the decode targets, from the fp32 rows."""
    def get(b, B, ctx, key="mean_ms"):
        r = res.get(f"{b}/{B}/{ctx}")
        return None if not r or "error" in r else r[key]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    return [("batch 1 @ 256: BSBR step / KV-cache step", ratio(get("bsbr", 1, 256), get("kv-ort", 1, 256)), "<=", 1.0),
            ("batch 1 @ 256: BSBR step / KV-cache empty-cache step",
             ratio(get("bsbr", 1, 256), get("kv-ort", 1, 256, "empty_cache_ms")), "<=", 1.15),
            ("16 rows @ 256: BSBR tokens/s / KV-cache tokens/s",
             ratio(get("bsbr", 16, 256, "tokens_per_s"), get("kv-ort", 16, 256, "tokens_per_s")), ">=", 1.5),
            ("@ 256: BSBR 16-row step / 1-row step", ratio(get("bsbr", 16, 256), get("bsbr", 1, 256)), "<=", 2.0),
            ("batch 1 @ 8192: KV-cache step / BSBR step", ratio(get("kv-ort", 1, 8192), get("bsbr", 1, 8192)), ">=", 5.0),
            ("batch 1: BSBR per-token time @ 8192 / @ 256 (closes included)",
             ratio(get("bsbr", 1, 8192), get("bsbr", 1, 256)), "<=", 1.05)]


def markdown(res: dict, args, cmds: list) -> str:
    import onnxruntime as ort

    lines = [f"## {args.title or 'Decode by rows x context: BSBR engine against GPT-2 with a KV cache (ONNX Runtime)'}", "",
             "Made by, in turn (each adds the cases it lacks to one JSON):", "",
             *[f"    {c}" for c in cmds], "",
             f"GPT-2 small shape, random weights, {args.threads} threads, {args.steps} timed steps (KV "
             f"cache: {args.kv_steps}) after {args.warmup} warm-up (BSBR's mean: chunk closes included), each case in "
             f"its own process; onnxruntime "
             f"{ort.__version__}; {machine_line()}. KV-cache graphs clamp position ids at 1023 (same cost).",
             "", "| backend | rows | context | ms/step (median) | ms/step (mean) | tokens/s | empty-cache ms "
             "| state per row MiB | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
    order = lambda k: (BACKENDS.index(k.split("/")[0]), int(k.split("/")[2]), int(k.split("/")[1]))  # noqa: E731
    for key, r in sorted(res.items(), key=lambda kv: order(kv[0])):
        b, B, ctx = key.split("/")
        if "error" in r:
            lines.append(f"| {b} | {B} | {ctx} | {r['error']} |||||")
            continue
        e = f"{r['empty_cache_ms']:.1f}" if "empty_cache_ms" in r else ""
        lines.append(f"| {b} | {B} | {ctx} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{e} | {r['state_bytes_per_row'] / 2**20:.1f} | {r['peak_rss_gib']:.2f} |")
    lines += ["", "Targets (decode at the dense floor), across this table's processes (a process's step differs "
              "from another's by more than some targets' margins on a shared machine: `decode_rows_paired.py --kv "
              "--long 8192` judges them on steps of one process, taken in turn):", "", "| target | measured | need | status |",
              "|---|---|---|---|"]
    for desc, v, cmp, thr in targets(res):
        ok = None if v is None else (v <= thr if cmp == "<=" else v >= thr)
        lines.append(f"| {desc} | {'n/a' if v is None else f'{v:.2f}'} | {cmp} {thr} | "
                     f"{'n/a' if ok is None else 'met' if ok else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def memory_markdown(mem: dict, args) -> str:
    cmd = shlex.join(["python", "scripts/bench_decode_batch.py", *sys.argv[1:]])
    lines = ["## Runtime memory by rows: 1 and 16 sequences of ~200 + 56 tokens (GPT-2 small shape)", "",
             f"`{cmd}`: one process per row count over the BSBR export ({args.max_seq_len} tokens): "
             f"`Engine.prefill` of 200-token prompts (each row's bank reserved for 256 tokens, as a server "
             f"does), then 56 decode steps; RSS after, and the process's peak; {machine_line()}.", "",
             "| rows | RSS GiB | peak RSS GiB | BSBR state per row MiB | KV cache per row at 256 MiB |",
             "|---|---|---|---|---|"]
    for rows, m in mem.items():
        lines.append(f"| {rows} | {m['error']} ||||" if "error" in m else
                     f"| {rows} | {m['rss_gib']:.2f} | {m['peak_rss_gib']:.2f} | {m['state_bytes_per_row'] / 2**20:.1f} | "
                     f"{m['kv_cache_bytes_per_row'] / 2**20:.1f} |")
    if all("error" not in m for m in mem.values()):
        ratio = mem[16]["rss_gib"] / mem[1]["rss_gib"]
        lines += ["", f"16 rows / 1 row, RSS: {ratio:.2f}x (target <= 1.25x: {'met' if ratio <= 1.25 else 'MISSED'}); "
                      f"peak: {mem[16]['peak_rss_gib'] / mem[1]['peak_rss_gib']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("work", type=Path, nargs="?", help="working directory (models and exports, kept between runs)")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--contexts", default="256,2048,8192")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    ap.add_argument("--steps", type=int, default=128, help="timed steps per case [128: one chunk close per row]")
    ap.add_argument("--kv-steps", type=int, default=16, help="timed steps of the KV-cache backends [16]")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=8448, help="the BSBR export's length [8448: 8192 + steps]")
    ap.add_argument("--optimum-python", default=None, help="python of a virtual environment with optimum-onnx")
    ap.add_argument("--conversion", default="", help="conversion options of the BSBR export, e.g. "
                    "\"--local-window lookback --retrieval-weights gate\" [the default conversion]")
    ap.add_argument("--out", type=Path, default=Path("docs/results/decode-batch.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/decode-batch.md"))
    ap.add_argument("--memory-md", type=Path, default=Path("docs/results/decode-memory.md"))
    ap.add_argument("--redo", action="store_true", help="measure again the cases --out already holds")
    ap.add_argument("--title", default=None, help="the section's heading [Decode by rows x context: ...]")
    ap.add_argument("--report", action="store_true", help="only write --md again from --out's JSON")
    ap.add_argument("--memory", action="store_true",
                    help="instead: resident memory of 1 and 16 rows of ~200 + 56 tokens over the BSBR export "
                         "(one process each), the state bytes per row and a KV cache's")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # a child: one case as JSON
    a = ap.parse_args(argv)
    if a.case:
        case = json.loads(a.case)
        print(json.dumps(run_memory_case(case) if "rows" in case else run_case(case)))
        return
    if a.work is None and not a.report:
        ap.error("WORK is required")
    try:
        batches, contexts = ([int(x) for x in v.split(",")] for v in (a.batches, a.contexts))
    except ValueError:
        ap.error("--batches and --contexts are comma-separated integers")
    backends = a.backends.split(",")
    if bad := [b for b in backends if b not in BACKENDS]:
        ap.error(f"unknown backends {bad}; choose from {', '.join(BACKENDS)}")
    if min(batches + contexts) < 1 or a.steps < 1 or max(contexts) + a.steps + a.warmup > a.max_seq_len:
        ap.error("batches and contexts >= 1, --steps >= 1, and context + steps + warmup within --max-seq-len")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.memory:
        paths = prepare(a.work, a.max_seq_len, ["bsbr"], None, log, a.conversion)
        mem = {}
        for rows in (1, 16):
            case = {"path": paths["bsbr"], "rows": rows, "threads": a.threads}
            r = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
            mem[rows] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {
                "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
            log(f"{rows} rows: {mem[rows]}")
        a.memory_md.write_text(memory_markdown(mem, a))
        log(f"wrote {a.memory_md}")
        return
    if a.report:  # the Markdown again from the JSON, nothing measured
        res = json.loads(a.out.read_text())
        cmd = shlex.join(["python", "scripts/bench_decode_batch.py", *(argv if argv is not None else sys.argv[1:])])
        a.md.write_text(markdown({k: v for k, v in res.items() if k != "_commands"}, a,
                                 res.get("_commands", []) + [cmd + "  # the Markdown only"]))
        return
    paths = prepare(a.work, a.max_seq_len, backends, a.optimum_python, log, a.conversion)
    res = json.loads(a.out.read_text()) if a.out.is_file() else {}
    cmd = shlex.join(["python", "scripts/bench_decode_batch.py", *(argv if argv is not None else sys.argv[1:])])
    cmds = res.pop("_commands", []) + [cmd]  # every invocation that wrote into this --out
    for b in backends:
        for ctx in contexts:
            for B in batches:
                key = f"{b}/{B}/{ctx}"
                if key in res and "error" not in res[key] and not a.redo:
                    continue  # measured by an earlier invocation into the same --out
                if not Path(str(paths.get(b, ""))).exists():
                    res[key] = {"error": paths.get(b, "not prepared")}
                    continue
                kv = not b.startswith("bsbr")
                need = 2 * 2 * 12 * 768 * 4 * B * (ctx + a.steps) if kv else 0  # past + present caches
                if need > 0.8 * _available():
                    res[key] = {"error": f"skipped: its KV cache needs ~{need / 2**30:.0f} GiB"}
                    continue
                case = {"backend": b, "batch": B, "context": ctx, "path": paths[b], "threads": a.threads,
                        "steps": a.kv_steps if kv else a.steps, "warmup": a.warmup}
                r = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                   text=True)
                res[key] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {
                    "error": f"exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1][:150]}"}
                log(f"{key}: {res[key]}")
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(res | {"_commands": cmds}, indent=1))  # every case as it lands
    a.out.write_text(json.dumps(res | {"_commands": cmds}, indent=1))
    a.md.write_text(markdown(res, a, cmds))
    log(f"wrote {a.out} and {a.md}")


if __name__ == "__main__":
    main()
