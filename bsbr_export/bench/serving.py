"""Serving benchmark: ``bsbr-export serve`` under load, each load level in its own server process
(the load generator and the run; the report, its targets and plot: ``serving_report.py``).

    python scripts/bench_serve.py [--export DIR] [--out docs/serve] [--quick]

For each prompt length (128 and 2,048 tokens) and each number of concurrent streams (1, 4, 16,
32), a fresh server (``--max-batch`` = the number of streams) takes that many streaming
clients, each sending ``--requests`` requests one after the other (token-id prompts, 128 new
tokens each, ``ignore_eos``, ``logprobs: 0`` so that every token is its own SSE event). Measured
at the client: tokens/s over the level's wall time, time to first token (TTFT) and the gaps
between consecutive tokens of a stream (per-token latency), p50 and p99; and the server
process's peak RSS (VmHWM). The baseline is the same load on a server with ``--max-batch 1``
(one request at a time, the others queued). The long-prompt test runs streams while an
8,192-token prompt arrives and reports the longest gap between two tokens of a running
stream, with the prompt fed in pieces (``--prefill-chunk 256``) and whole (no interleaving).
The memory table sets the state a sequence carries at 8,192 tokens (``StateSpec.bytes_at``)
and what the engine allocates per row beside a GPT-2 KV cache (``kv_cache_bytes``).

Every request loop is bounded (count, client timeouts, a deadline per level) and talks only to
the server it started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .serving_report import LONG, write_report

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "gpt2-pystdlib"
MODEL = "bench"
LEVEL_DEADLINE_S = 1800.0
REQUEST_TIMEOUT_S = 900.0  # a queued stream gets no byte until it has a row


# --------------------------------------------------------------------------- one server process

class ServerProcess:
    """``bsbr-export serve`` in a child process on 127.0.0.1 (an ephemeral port). Its log
    (stderr) is read all along by a thread, which keeps the last lines (``log``): an unread pipe
    fills (64 KiB) and then blocks the server on its next log line."""

    def __init__(self, export_dir, max_batch: int, threads: int, prefill_chunk: int = 256, max_queue: int = 512,
                 prefix_cache: str = "0"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads),
               "--prefill-chunk", str(prefill_chunk), "--model-name", MODEL, "--drain", "5",
               "--prefix-cache", prefix_cache]  # off unless asked: the batching figures compute every prompt
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._reader = threading.Thread(target=self._drain, name="bench-server-log", daemon=True)
        self._reader.start()
        import httpx

        end = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                if self.proc.poll() is None:
                    self.stop()
                self._reader.join(5)
                raise RuntimeError(f"server did not start: {''.join(self.log)[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


# --------------------------------------------------------------------------- clients

async def stream_one(client, url: str, ids: list[int], new: int) -> dict:
    """One streaming request: send time, the arrival time of every token, finish."""
    body = {"model": MODEL, "prompt": ids, "max_tokens": new, "temperature": 0, "stream": True, "logprobs": 0,
            "ignore_eos": True}
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"t0": t0, "times": [], "status": r.status_code}
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("logprobs"):
                    times.append(time.perf_counter())
    return {"t0": t0, "times": times, "status": 200}


async def run_load(url: str, prompts: list[list[int]], streams: int, requests: int, new: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        await stream_one(client, url, prompts[0][:16], 4)  # warm-up (sessions, first allocations)

        async def stream(k):
            return [await stream_one(client, url, prompts[(k * requests + q) % len(prompts)], new)
                    for q in range(requests)]

        t0 = time.perf_counter()
        out = await asyncio.wait_for(asyncio.gather(*(stream(k) for k in range(streams))), LEVEL_DEADLINE_S)
        wall = time.perf_counter() - t0
    reqs = [r for s in out for r in s]
    ttft = [r["times"][0] - r["t0"] for r in reqs if r["times"]]
    gaps = [b - a for r in reqs for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in reqs)
    bad = sum(r["status"] != 200 for r in reqs)
    return {"streams": streams, "requests": len(reqs), "failed": bad, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, **_pcts("ttft", ttft), **_pcts("tpot", gaps)}


def _pcts(name: str, xs: list[float]) -> dict:
    if not xs:
        return {f"{name}_p50_ms": None, f"{name}_p99_ms": None}
    return {f"{name}_p50_ms": float(np.percentile(xs, 50)) * 1e3, f"{name}_p99_ms": float(np.percentile(xs, 99)) * 1e3}


async def long_prompt_gap(url: str, prompts, long_ids, streams: int) -> dict:
    """Streams running while a ``LONG``-token prompt arrives: the longest gap between two tokens
    of a running stream from the long request's send to its first token."""
    import httpx

    records = [[] for _ in range(streams)]

    async def runner(k, client):
        body = {"model": MODEL, "prompt": prompts[k], "max_tokens": 2048, "temperature": 0, "stream": True,
                "logprobs": 0, "ignore_eos": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    records[k].append(time.perf_counter())

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=streams + 4)) as c:
        await stream_one(c, url, prompts[0][:16], 4)
        tasks = [asyncio.create_task(runner(k, c)) for k in range(streams)]
        await asyncio.sleep(2.0)
        long = await asyncio.wait_for(stream_one(c, url, long_ids, 4), LEVEL_DEADLINE_S)
        await asyncio.sleep(0.3)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not long["times"]:  # the long request failed (refused, or its stream ended without a token)
        return {"streams": streams, "long_prompt_tokens": len(long_ids), "long_ttft_s": None, "max_gap_ms": None,
                "tokens_during_prefill": None, "median_gap_before_ms": None,
                "error": f"the long request failed (HTTP {long['status']}, no token)"}
    t_send, t_first = long["t0"], long["times"][0]
    gaps, before = [], []
    for rec in records:  # every gap between two tokens of a running stream that overlaps the prefill
        gaps += [b - a for a, b in zip(rec, rec[1:]) if b >= t_send and a <= t_first]
        before += [b - a for a, b in zip(rec, rec[1:]) if b < t_send]
    return {"streams": streams, "long_prompt_tokens": len(long_ids), "long_ttft_s": t_first - t_send,
            "max_gap_ms": max(gaps) * 1e3 if gaps else None,
            "tokens_during_prefill": sum(len([t for t in rec if t_send <= t <= t_first]) for rec in records),
            "median_gap_before_ms": float(np.median(before)) * 1e3 if before else None}


# --------------------------------------------------------------------------- memory

def memory_rows(export_dir) -> list[dict]:
    """Per-sequence memory at ``LONG`` tokens: the BSBR state, what the engine holds for a row
    of that many tokens (its K/V/S/xa buffers and its bank as the engine grows it:
    ``engine.row_bytes``), and a GPT-2 KV cache; for the benchmarked model and, when it is
    another shape, a GPT-2-small-shaped one with the same BSBR options."""
    from ..ops import state as S
    from ..runtime.engine import _Spec, read_metadata, row_bytes

    spec = _Spec(read_metadata(Path(export_dir) / "extend.onnx")["config"])
    small = replace(spec, layer=12, head=12, embd=768, head_dim=64,
                    state_dim=64 // (spec.head_dim // spec.state_dim), state_cols=64 + spec.normalised)
    models = [("benchmarked model", spec)] + ([("GPT-2 small shape", small)] if small != spec else [])
    rows = []
    for name, sp in models:
        cap = sp.bank_slots(LONG)
        rows.append({"model": name, "layers": sp.layer, "embd": sp.embd, "chunk": sp.chunk,
                     "bsbr_state_bytes": sp.bytes_at(LONG), "engine_row_bytes": row_bytes(sp, LONG, cap),
                     "engine_capacity": cap, "kv_cache_bytes": S.kv_cache_bytes(sp.layer, sp.embd, LONG)})
    return rows


def engine_costs(export_dir, threads: int, batches=(1, 4, 16, 32)) -> list[dict]:
    """What one scheduler iteration costs in the engine, in this process: a decode step (median of
    20), the chunk closes of a step in which every row ends a chunk (``decode`` closes each
    closing row on its own: a step at the chunk's last position, less a plain step), and a
    128-token prefill of one row inside the batch (the sub-batch path)."""
    from ..runtime.engine import Engine

    eng = Engine(export_dir, threads=threads)
    return [_row_costs(eng, b) for b in batches]


def _row_costs(eng, b: int) -> dict:
    from ..util import median_ms

    st = eng.new_state(b)
    eng.extend(st, list(range(b)), [np.arange(1, 9)] * b)
    tok = np.ones(b, np.int64)

    def step(pos):
        st.positions[:] = pos
        eng.decode(st, tok)

    def prefill_row():
        eng.reset_rows(st, [0])
        eng.extend(st, [0], [np.arange(1, 129)])

    decode = median_ms(lambda: step(8), runs=20, warmup=2)
    closing = median_ms(lambda: step(eng.chunk - 1), runs=5, warmup=1)
    return {"batch": b, "capacity": eng.capacity, "decode_ms": decode, "close_ms": max(0.0, closing - decode),
            "prefill_one_row_128_ms": median_ms(prefill_row, runs=3, warmup=1)}


# --------------------------------------------------------------------------- driver

def make_export(work: Path, max_len: int, source: Path = BUNDLED) -> Path:
    """An HF GPT-2 directory (chunk 128) exported for ``max_len`` tokens (needs the export extra)."""
    from ..convert import convert, save_bsbr
    from ..export import ExportSpec, export_onnx

    from ..ops.state import FORMAT
    from ..runtime.engine import read_metadata

    d = work / f"export-{Path(source).name}-{max_len}"
    if (d / "extend.onnx").is_file() and read_metadata(d / "extend.onnx").get("state", {}).get("format") != FORMAT:
        shutil.rmtree(d)  # an export of an older state format: the engine refuses it
    if not (d / "extend.onnx").is_file():
        model = convert(source)
        save_bsbr(model, d / "bsbr", tokenizer_from=source if (Path(source) / "tokenizer.json").is_file() else BUNDLED)
        export_onnx(model, d, ExportSpec(max_seq_len=max_len))
    return d


def prompts_of(length: int, count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    heldout = BUNDLED / "heldout_ids.npy"
    rng = np.random.default_rng(seed)
    if heldout.is_file():
        ids = np.load(heldout).astype(np.int64)
        if len(ids) > length + 1:
            return [ids[s:s + length].tolist() for s in rng.integers(0, len(ids) - length, count)]
    return rng.integers(1, vocab, (count, length)).tolist()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Serving benchmark of bsbr-export serve (see the module docstring).")
    ap.add_argument("--export", type=Path, default=None, help="An export directory [the bundled model, exported]")
    ap.add_argument("--model", type=Path, default=BUNDLED,
                    help="HF GPT-2 directory to export when --export is not given (e.g. the output of "
                         "scripts/make_random_gpt2.py for GPT-2 size) [the bundled model]")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "serve")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--prompt-lengths", default="128,2048")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=2, help="Requests per stream, one after the other.")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each server.")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-long", action="store_true")
    ap.add_argument("--quick", action="store_true", help="Smoke run: 1,4 streams, 128-token prompts, 16 new tokens.")
    a = ap.parse_args(argv)
    command = "python scripts/bench_serve.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if a.quick:
        a.streams, a.prompt_lengths, a.new_tokens, a.requests, a.no_long = "1,4", "128", 16, 1, True
    streams = [int(x) for x in a.streams.split(",")]
    lengths = [int(x) for x in a.prompt_lengths.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    # The sweep's export holds what the sweep needs (its state capacity, so its per-row buffers and
    # chunk-closing cost, follow max_seq_len); the long-prompt test has its own, for LONG tokens.
    export_dir = a.export or make_export(a.work, -(-(max(lengths) + a.new_tokens) // 256) * 256, a.model)
    long_dir = a.export or (export_dir if a.no_long else make_export(a.work, LONG + 256, a.model))
    from ..runtime.engine import read_metadata
    from ..util import machine_info

    vocab = int(read_metadata(Path(export_dir) / "extend.onnx")["config"]["vocab_size"])
    result = {"command": command, "model": Path(a.model).name if a.export is None else Path(a.export).name,
              "machine": machine_info(), "threads": a.threads, "new_tokens": a.new_tokens,
              "requests_per_stream": a.requests, "export": str(export_dir), "long_export": str(long_dir),
              "max_seq_len": int(read_metadata(Path(export_dir) / "extend.onnx")["max_seq_len"]),
              "levels": [], "long_prompt": [], "engine_costs": [], "memory": memory_rows(long_dir),
              "note": f"load average {os.getloadavg()[0]:.2f} at the start (what else ran on the machine); timings on "
                      f"shared cores vary from run to run: compare within one run."}
    t_all = time.monotonic()
    for length in lengths:
        prompts = prompts_of(length, 64, vocab, seed=length)
        for n in streams:
            for mode, max_batch in (("batched", n), ("one at a time", 1)):
                if mode != "batched" and a.no_baseline:
                    continue
                srv = ServerProcess(export_dir, max_batch, a.threads)
                try:
                    row = asyncio.run(run_load(srv.url, prompts, n, a.requests, a.new_tokens))
                    row.update(mode=mode, prompt_tokens=length, max_batch=max_batch, peak_rss_bytes=srv.peak_rss())
                finally:
                    row_rc = srv.stop()
                row["exit_code"] = row_rc
                result["levels"].append(row)
                print(f"[bench-serve] prompt {length} streams {n:2d} {mode:13s}: {row['tokens_per_s']:7.1f} tok/s "
                      f"TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, per token p50 "
                      f"{row['tpot_p50_ms']:.1f} p99 {row['tpot_p99_ms']:.1f} ms, RSS {row['peak_rss_bytes'] / 2**20:.0f} "
                      f"MiB, failed {row['failed']}", flush=True)
                if n == 1:
                    break  # one stream: the baseline is the same server
    if not a.no_long:
        long_ids = prompts_of(LONG, 1, vocab, seed=LONG)[0]
        for chunk in (256, LONG):
            srv = ServerProcess(long_dir, 5, a.threads, prefill_chunk=chunk)
            try:
                row = asyncio.run(long_prompt_gap(srv.url, prompts_of(128, 4, vocab, 1), long_ids, 4))
                row.update(prefill_chunk=chunk, peak_rss_bytes=srv.peak_rss())
            finally:
                srv.stop()
            result["long_prompt"].append(row)
            print(f"[bench-serve] long prompt, prefill chunk {chunk}: " + (row.get("error") or
                  f"max gap {row['max_gap_ms']:.0f} ms, TTFT {row['long_ttft_s']:.1f} s"), flush=True)
    for d in dict.fromkeys((export_dir, long_dir)):
        result["engine_costs"] += [dict(r, export=str(d)) for r in engine_costs(d, a.threads)]
    result["seconds"] = time.monotonic() - t_all
    write_report(result, a.out)
    return result


if __name__ == "__main__":
    main()
