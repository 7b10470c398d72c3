"""The prefix cache under the loads it is for, through ``bsbr-export serve`` with and without it.

Two scenarios, each on a fresh server (``--prefix-cache 1GiB``, then ``--prefix-cache 0``):

* **shared system prompt**: one ``--system``-token prompt (4,096 by default) followed by a
  short question (20-40 tokens), ``--questions`` requests one after the other. Time to first
  token (TTFT) of the first request (cold) and the median of the others (which share the system
  prompt); target: the shared-prefix TTFT <= 0.1x the cold one.
* **agent loop**: ``--conversations`` conversations at once, ``--turns`` turns each; a turn
  sends the conversation so far as text (earlier turns and replies) plus ``--turn-tokens`` new
  tokens, and appends the reply (``--new-tokens``, greedy). Client-side, as real clients do,
  the conversation is text re-tokenized every turn. Measured: prompt tokens the server computed
  (its ``bsbr_prompt_tokens`` counter) against the tokens the turns add (new text + replies),
  TTFT per turn (median of turns 2..), tokens/s of the whole loop, the cache's bytes; target:
  computed <= 1.2x added.

    python scripts/bench_prefix.py --export DIR [--out docs/results/prefix-cache.md]

DIR is an export with a tokenizer (``bsbr-export export``; a GPT-2-small-shaped random model
takes the bundled tokenizer, as ``scripts/bench_serve.py`` does). Token text comes from the
bundled model's held-out ids. Every request loop is bounded and talks only to the server it
started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bsbr_export.bench.serving import BUNDLED, MODEL, ServerProcess
from bsbr_export.util import machine_info, machine_line, markdown_table

TIMEOUT = 900.0


def ask(url: str, prompt, new: int) -> dict:
    """One streaming request: TTFT (its first token's event: ``logprobs`` 0 makes every token an
    event, also one whose text is held back or empty), the reply's text, the cached tokens."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    t0, ttft, text, usage = time.perf_counter(), None, "", {}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices", []):
                if ttft is None and (ch.get("text") or ch.get("logprobs")):
                    ttft = time.perf_counter() - t0
                text += ch.get("text") or ""
            usage = ev.get("usage") or usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "text": text,
            "seconds": time.perf_counter() - t0, "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def shared_prompt(url: str, tok, ids: np.ndarray, system: int, questions: int, new: int) -> dict:
    rng = np.random.default_rng(1)
    sys_text = tok.decode(ids[:system].tolist())
    rows = []
    for q in range(questions):
        a = int(rng.integers(system, len(ids) - 64))
        question = tok.decode(ids[a:a + int(rng.integers(20, 40))].tolist())
        rows.append(ask(url, sys_text + question, new))
    later = [r["ttft"] for r in rows[1:]]
    return {"cold_ttft_s": rows[0]["ttft"], "shared_ttft_s": statistics.median(later),
            "ratio": statistics.median(later) / rows[0]["ttft"], "cached_tokens": [r["cached"] for r in rows],
            "prompt_tokens": len(tok.encode(sys_text))}


def agent_loop(url: str, tok, ids: np.ndarray, conversations: int, turns: int, turn_tokens: int, new: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    before = metric(url, "bsbr_prompt_tokens_total")
    history, added, ttft = [""] * conversations, [0] * conversations, [[] for _ in range(conversations)]
    t0 = time.perf_counter()
    generated = 0

    def turn(c: int, t: int) -> dict:
        a = (c * turns + t) * turn_tokens % (len(ids) - turn_tokens)
        piece = tok.decode(ids[a:a + turn_tokens].tolist())
        res = ask(url, history[c] + piece, new)
        res["piece"] = piece
        return res

    with ThreadPoolExecutor(conversations) as pool:
        for t in range(turns):
            results = list(pool.map(lambda c: turn(c, t), range(conversations)))
            for c, res in enumerate(results):
                before_len = len(tok.encode(history[c])) if history[c] else 0
                history[c] += res["piece"] + res["text"]
                added[c] += len(tok.encode(history[c])) - before_len
                ttft[c].append(res["ttft"])
                generated += new
    seconds = time.perf_counter() - t0
    computed = metric(url, "bsbr_prompt_tokens_total") - before
    later = [x for per in ttft for x in per[1:]]
    return {"computed_prompt_tokens": int(computed), "added_tokens": int(sum(added)),
            "ratio": computed / max(1, sum(added)), "median_ttft_s": statistics.median(later),
            "first_turn_ttft_s": statistics.median(per[0] for per in ttft), "tokens_per_s": generated / seconds,
            "seconds": seconds, "cache_bytes": int(metric(url, "bsbr_prefix_cache_bytes"))}


def run(a) -> dict:
    from bsbr_export.runtime.text import Tokenizer

    tok = Tokenizer.from_dir(a.export)
    ids = np.load(BUNDLED / "heldout_ids.npy").astype(np.int64)
    out = {"command": "python scripts/bench_prefix.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
           "export": str(a.export), "modes": {}}
    for mode, size in (("cache", a.cache_size), ("no cache", "0")):
        srv = ServerProcess(a.export, max_batch=max(a.conversations, 1), threads=a.threads, prefix_cache=size)
        try:
            print(f"[bench_prefix] {mode}: shared system prompt", flush=True)
            shared = shared_prompt(srv.url, tok, ids, a.system, a.questions, a.new_tokens)
            print(f"[bench_prefix] {mode}: agent loop", flush=True)
            loop = agent_loop(srv.url, tok, ids, a.conversations, a.turns, a.turn_tokens, a.new_tokens)
            out["modes"][mode] = {"shared": shared, "loop": loop, "peak_rss": srv.peak_rss()}
        finally:
            srv.stop()
        print(f"[bench_prefix] {mode}: {json.dumps(out['modes'][mode])}", flush=True)
    return out


def report(res: dict, a) -> str:
    on, off = res["modes"]["cache"], res["modes"]["no cache"]
    s_on, s_off, l_on, l_off = on["shared"], off["shared"], on["loop"], off["loop"]
    lines = [f"## Prefix cache: shared prompts and multi-turn conversations ({Path(a.export).name})", "",
             f"`{res['command']}`; {machine_line(res['machine'])}; {a.threads} ORT thread(s) per server; "
             "one run; each mode on a fresh server.", "",
             f"**Shared system prompt** ({s_on['prompt_tokens']} tokens, then a 20-40-token question; "
             f"{a.questions} requests one after the other, {a.new_tokens} new tokens each):", "",
             markdown_table(["server", "first request TTFT (s)", "later requests TTFT, median (s)",
                             "later / first", "cached tokens per request"],
                            [["--prefix-cache " + a.cache_size, f"{s_on['cold_ttft_s']:.2f}",
                              f"{s_on['shared_ttft_s']:.3f}", f"{s_on['ratio']:.3f}x",
                              ", ".join(map(str, s_on["cached_tokens"]))],
                             ["--prefix-cache 0", f"{s_off['cold_ttft_s']:.2f}", f"{s_off['shared_ttft_s']:.3f}",
                              f"{s_off['ratio']:.3f}x", ", ".join(map(str, s_off["cached_tokens"]))]]),
             f"Target: a request sharing the prefix reaches its first token in <= 0.1x the cold time: "
             f"**{s_on['ratio']:.3f}x, {'met' if s_on['ratio'] <= 0.1 else 'NOT met'}**.", "",
             f"**Agent loop** ({a.conversations} conversations at once, {a.turns} turns each; a turn adds "
             f"{a.turn_tokens} tokens of text to the conversation and a {a.new_tokens}-token reply; the client "
             "resends the whole conversation as text every turn):", "",
             markdown_table(["server", "prompt tokens computed", "tokens the turns added", "computed / added",
                             "TTFT turn 1 (s)", "TTFT turns 2.., median (s)", "tokens/s", "cache bytes",
                             "server peak RSS (MiB)"],
                            [[name, m["loop"]["computed_prompt_tokens"], m["loop"]["added_tokens"],
                              f"{m['loop']['ratio']:.2f}x", f"{m['loop']['first_turn_ttft_s']:.2f}",
                              f"{m['loop']['median_ttft_s']:.2f}", f"{m['loop']['tokens_per_s']:.1f}",
                              f"{m['loop']['cache_bytes'] / 2**20:.1f} MiB", f"{m['peak_rss'] / 2**20:.0f}"]
                             for name, m in (("--prefix-cache " + a.cache_size, on), ("--prefix-cache 0", off))]),
             f"Target: prompt tokens computed <= 1.2x the tokens the turns add: **{l_on['ratio']:.2f}x, "
             f"{'met' if l_on['ratio'] <= 1.2 else 'NOT met'}** (without the cache: {l_off['ratio']:.2f}x); "
             f"tokens/s {l_on['tokens_per_s'] / l_off['tokens_per_s']:.2f}x the server without the cache.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="an export directory with a tokenizer")
    ap.add_argument("--out", type=Path, default=None, help="Markdown fragment to write (e.g. docs/results/prefix-cache.md)")
    ap.add_argument("--json", type=Path, default=None, help="raw results as JSON")
    ap.add_argument("--cache-size", default="1GiB")
    ap.add_argument("--system", type=int, default=4096)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    res = run(a)
    text = report(res, a)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
