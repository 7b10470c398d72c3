"""The serving benchmark's report (``serving.py`` runs it): bench_serve.md with its tables, the
targets judged on the run, and bench_serve.png. It reads a result dict only, so a committed
bench_serve.json renders again without a server."""

from __future__ import annotations

import json
from pathlib import Path

from ..util import atomic_write_text, machine_line, markdown_table
from .sections import table

LONG = 8192  # the long context: the prompt of the long-prompt test and the memory table's context
TARGET_STREAMS = 16  # the batching target and the latencies beside it are stated at this many streams
# name -> (comparison, threshold, unit): the serving benchmark's acceptance thresholds.
THRESHOLDS = {"continuous batching": (">=", 4.0, "x")}


def _level(result: dict, length: int, n: int, mode: str):
    return next((r for r in result["levels"] if r["prompt_tokens"] == length and r["streams"] == n
                 and r["mode"] == mode), None)


def targets(result: dict) -> list[dict]:
    """The batching target (tokens/s batched over one request at a time at ``TARGET_STREAMS``
    streams, the shortest prompt measured: the decode-bound load) as pass, miss or n/a, and the
    TTFT and per-token latencies of that batched level, reported without a threshold."""
    lengths = sorted({r["prompt_tokens"] for r in result["levels"]})
    length = lengths[0] if lengths else None
    n = TARGET_STREAMS
    at = f"{n} streams, {length}-token prompts"
    out = []
    for name, (op, thr, unit) in THRESHOLDS.items():
        value = None if length is None else _ratio(result, length, n)
        status = "n/a" if value is None else "pass" if (value >= thr if op == ">=" else value <= thr) else "miss"
        out.append({"name": name, "description": f"tokens/s batched / one request at a time at {at}",
                    "measured": value, "comparison": op, "threshold": thr, "unit": unit, "status": status})
    row = None if length is None else _level(result, length, n, "batched")
    for key, what in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
                      ("tpot_p50_ms", "inter-token latency p50"), ("tpot_p99_ms", "inter-token latency p99")):
        value = None if row is None else row[key]
        out.append({"name": what, "description": f"{what}, batched, at {at}", "measured": value,
                    "comparison": None, "threshold": None, "unit": " ms", "status": "n/a" if value is None
                    else "reported"})
    return out


def targets_table(result: dict) -> str:
    """The targets section: each target against its threshold, the latencies beside it."""
    rows = []
    for t in targets(result):
        fmt = "{:.2f}" if t["unit"] == "x" else "{:.1f}"
        rows.append([t["description"], "—" if t["measured"] is None else fmt.format(t["measured"]) + t["unit"],
                     "—" if t["threshold"] is None else f"{t['comparison']} {t['threshold']:.2f}{t['unit']}",
                     t["status"]])
    na = (f" n/a: the run has no {TARGET_STREAMS}-stream level (or no one-at-a-time baseline) at its shortest "
          f"prompt." if any(t["status"] == "n/a" for t in targets(result)) else "")
    return ("### Targets\n\n" + table(["target", "measured", "required", "result"], rows)
            + "\n\nLatencies are measured at the client and reported without a threshold." + na)


def _ratio(result, length, n):
    rows = {r["mode"]: r for r in result["levels"] if r["prompt_tokens"] == length and r["streams"] == n}
    if "batched" in rows and "one at a time" in rows:
        return rows["batched"]["tokens_per_s"] / rows["one at a time"]["tokens_per_s"]
    return None


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_serve.json", json.dumps(result, indent=1) + "\n")
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
    rows = [[r["prompt_tokens"], r["streams"], r["mode"], r["max_batch"], r["requests"], r["tokens"],
             f(r["tokens_per_s"]), f(r["ttft_p50_ms"], 0), f(r["ttft_p99_ms"], 0), f(r["tpot_p50_ms"]),
             f(r["tpot_p99_ms"]), f(r["peak_rss_bytes"] / 2**20, 0), r["failed"]] for r in result["levels"]]
    md = ["# Serving benchmark (`bsbr-export serve`)", "",
          "Made by:", "", f"    {result['command']}", "",
          f"Machine: {machine_line(result['machine'])}. {result['note']}", "",
          f"Each row: a fresh server process (`--threads {result['threads']}`, `--max-batch` as listed) over "
          f"`{result.get('model', 'gpt2-pystdlib')}` exported with chunk 128 and `max_seq_len` "
          f"{result['max_seq_len']}; "
          f"that many streaming clients, {result['requests_per_stream']} request(s) each one after the other, "
          f"{result['new_tokens']} new tokens per request (greedy, `ignore_eos`). Tokens/s: all tokens over the "
          f"level's wall time. TTFT and per-token gaps measured at the client (p50/p99). RSS: the server's peak.",
          "", markdown_table(["prompt", "streams", "mode", "max-batch", "requests", "tokens", "tokens/s",
                              "TTFT p50 ms", "TTFT p99 ms", "per-token p50 ms", "per-token p99 ms",
                              "peak RSS MiB", "failed"], rows)]
    ratios = [[length, n, f(_ratio(result, length, n), 2)] for length in sorted({r["prompt_tokens"] for r in
              result["levels"]}) for n in sorted({r["streams"] for r in result["levels"]}) if n > 1
              and _ratio(result, length, n) is not None]
    if ratios:
        op, thr, _ = THRESHOLDS["continuous batching"]
        md += [f"Continuous batching over one request at a time (tokens/s ratio; target {op} {thr:g} at "
               f"{TARGET_STREAMS} streams):", "",
               markdown_table(["prompt", "streams", "batched / one at a time"], ratios)]
    if result["long_prompt"]:
        md += [f"A {LONG}-token prompt arriving while {result['long_prompt'][0]['streams']} streams decode "
               f"(`--max-batch 5`): the longest gap between two tokens of a running stream from its arrival to "
               f"its first token, with the prompt fed in pieces and whole.", "",
               markdown_table(["prefill chunk", "long prompt TTFT s", "longest gap of running streams ms",
                               "tokens of running streams meanwhile", "median gap before ms"],
                              [[r["prefill_chunk"], f(r["long_ttft_s"], 2), f(r["max_gap_ms"], 0),
                                "-" if r["tokens_during_prefill"] is None else r["tokens_during_prefill"],
                                f(r["median_gap_before_ms"])]
                               for r in result["long_prompt"]])]
    if result.get("engine_costs"):
        md += ["What the engine spends per scheduler step, by rows in the batch (this process, same threads): a "
               "decode step, the chunk closes of a step in which every row ends its chunk (each closing row is closed on "
               "its own, so a batch pays one close per row per chunk of 128 steps, whatever the rows' phases), and one "
               "row's 128-token prefill inside the batch. Capacity: the most bank slots a row can hold.", "",
               markdown_table(["batch", "capacity", "decode step ms", "chunk close ms",
                               "one row prefill 128 ms", "close amortised per step ms"],
                              [[r["batch"], r["capacity"], f(r["decode_ms"], 2), f(r["close_ms"], 1),
                                f(r["prefill_one_row_128_ms"], 1), f(r["close_ms"] / 128, 2)]
                               for r in result["engine_costs"]])]
    mem = result["memory"]
    md += [f"Memory per active sequence at {LONG} tokens of context (float32): the BSBR state "
           f"(`StateSpec.bytes_at`), what the engine allocates per row of the batch in an export that holds "
           f"{LONG} tokens (its K/V/S buffers and its bank as the engine grows it with the chunks the row "
           f"closes), and a standard "
           f"GPT-2 KV cache (`kv_cache_bytes`).", "",
           markdown_table(["model", "layers x width", "chunk", "BSBR state MiB", "engine per row MiB (capacity)",
                           "GPT-2 KV cache MiB", "KV / state"],
                          [[m["model"], f"{m['layers']} x {m['embd']}", m["chunk"],
                            f(m["bsbr_state_bytes"] / 2**20, 2),
                            f"{m['engine_row_bytes'] / 2**20:.2f} ({m['engine_capacity']} chunks)",
                            f(m["kv_cache_bytes"] / 2**20, 2), f(m["kv_cache_bytes"] / m["bsbr_state_bytes"], 1)]
                           for m in mem])]
    md += [targets_table(result), ""]
    md += [f"Total time: {result['seconds'] / 60:.1f} min. Plot: `bench_serve.png`.", ""]
    atomic_write_text(out / "bench_serve.md", "\n".join(md))
    plot(result, out / "bench_serve.png")


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lengths = sorted({r["prompt_tokens"] for r in result["levels"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for length in lengths:
        for mode, style in (("batched", "-o"), ("one at a time", "--s")):
            rs = sorted((r for r in result["levels"] if r["prompt_tokens"] == length
                         and (r["mode"] == mode or r["streams"] == 1)), key=lambda r: r["streams"])
            if len(rs) < 2 and mode != "batched":
                continue
            xs = [r["streams"] for r in rs]
            axes[0].plot(xs, [r["tokens_per_s"] for r in rs], style, label=f"prompt {length}, {mode}")
            axes[1].plot(xs, [r["tpot_p50_ms"] for r in rs], style, label=f"prompt {length}, {mode}")
    for ax, title in zip(axes, ("tokens/s", "per-token latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bsbr-export serve, {result.get('model', 'gpt2-pystdlib')}, 2 shared CPU cores (noisy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
