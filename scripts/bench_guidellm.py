"""guidellm against ``bsbr-export serve``: its completions and chat formats at N concurrent streams
on the bundled model, and the report (TTFT, inter-token latency, tokens/s) as a Markdown fragment.

guidellm lives in a virtual environment of its own (it pins its own torch and transformers):

    python -m venv /tmp/gl-venv && /tmp/gl-venv/bin/pip install guidellm
    python scripts/bench_guidellm.py --guidellm /tmp/gl-venv/bin/guidellm

What it does: exports the bundled model (chunk 128, ``max_seq_len`` 1024; needs the export
extra) unless ``--export`` is given, starts ``bsbr-export serve`` on it (with the chat template
of tests/data, so the chat format has one), runs ``guidellm run`` once per format (synthetic
prompts of ``--prompt-tokens`` tokens, ``--output-tokens`` new tokens, ``--streams`` concurrent
streams, ``--requests`` requests; guidellm's tokenizer is the bundled model's directory, as the
hub is not reached), reads guidellm's JSON, and writes ``--out``. Exit status 1 when any request
errored or did not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bsbr_export.util import machine_line, markdown_table  # noqa: E402

BUNDLED = ROOT / "models" / "gpt2-pystdlib"
TEMPLATE = ROOT / "tests" / "data" / "chat_template.jinja"
MODEL = "gpt2-pystdlib"
SEED = 42  # guidellm's data seed of the first round; round r uses SEED + r (new prompts: no prefix-cache hits)
FORMATS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short(x) -> str:
    """A path or command word as the docs show it (relative to the repository)."""
    return str(x).replace(str(ROOT) + "/", "")


def start_server(export: Path, port: int, args, log: Path) -> tuple[subprocess.Popen, list[str]]:
    cmd = ["bsbr-export", "serve", str(export), "--port", str(port), "--max-batch", str(args.max_batch),
           "--model-name", MODEL, "--chat-template", str(TEMPLATE)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.prefix_cache is not None:
        cmd += ["--prefix-cache", args.prefix_cache]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:  # a file, not a pipe: the server never blocks on its log
        proc = subprocess.Popen([sys.executable, "-m", "bsbr_export.cli", *cmd[1:]], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    import urllib.request

    end = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise SystemExit(f"the server did not start; its log: {log}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, cmd
        except OSError:
            time.sleep(0.2)


def guidellm_command(args, port: int, fmt: str, out: Path, seed: int) -> list[str]:
    return [args.guidellm, "run",
            "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model={MODEL},"
                         f"request_format={FORMATS[fmt]}",
            "--profile", f"kind=concurrent,streams={args.streams}",
            "--constraint", f"kind=max_requests,count={args.requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={BUNDLED}",
            "--seed", f"kind=static,value={seed}", "--output", f"kind=json,path={out}",
            "--disable-console-interactive"]


def summary(report: dict) -> dict:
    """The figures of guidellm's JSON report (its first benchmark)."""
    b = report["benchmarks"][0]
    m = b["metrics"]

    def dist(name, part="successful"):
        d = m[name][part]
        return {"mean": d["mean"], "p50": d["median"], "p99": d["percentiles"]["p99"]}

    return {"requests": m["request_totals"], "duration_s": b["duration"],
            "ttft_ms": dist("time_to_first_token_ms"), "itl_ms": dist("inter_token_latency_ms"),
            "tpot_ms": dist("time_per_output_token_ms"), "latency_s": dist("request_latency"),
            "requests_per_s": m["requests_per_second"]["successful"]["mean"],
            "output_tokens_per_s": m["output_tokens_per_second"]["total"]["mean"],
            "total_tokens_per_s": m["tokens_per_second"]["total"]["mean"],
            "prompt_tokens": m["prompt_token_count"]["successful"]["median"],
            "output_tokens": m["output_token_count"]["successful"]["median"]}


def fragment(results: dict, args, server_cmd: list[str], commands: dict, export_cmd: str, version: str,
             load: tuple) -> str:
    rows = []
    for (fmt, run), s in results.items():
        r = s["requests"]
        rows.append([f"{fmt} (`{FORMATS[fmt]}`)", str(run + 1), f"{r['successful']} / {r['errored']} / {r['incomplete']}",
                     f"{s['prompt_tokens']:.0f} / {s['output_tokens']:.0f}", f"{s['duration_s']:.1f}",
                     f"{s['ttft_ms']['mean']:.0f} / {s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}",
                     f"{s['itl_ms']['mean']:.1f} / {s['itl_ms']['p50']:.1f} / {s['itl_ms']['p99']:.1f}",
                     f"{s['tpot_ms']['p50']:.1f}", f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.0f}",
                     f"{s['total_tokens_per_s']:.0f}"])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shell = lambda cmd: " ".join(_short(c) if " " not in str(c) else repr(_short(c)) for c in cmd)  # noqa: E731
    lines = [
        "## guidellm against `bsbr-export serve`", "",
        f"{date}; guidellm {version}; machine: {machine_line()}.", "",
        f"`bsbr-export serve` on the bundled model (`models/gpt2-pystdlib`, 4 layers x 256, exported with chunk "
        f"128 and `max_seq_len` {args.max_len}), `--max-batch {args.max_batch}`"
        + (f", `--threads {args.threads}`" if args.threads else "") + ", the chat template of "
        "`tests/data/chat_template.jinja`. guidellm, in its own virtual environment, at "
        f"{args.streams} concurrent streams, {args.requests} requests per run, {args.rounds} run(s) per format "
        "(the formats alternate, the order reversed every round, one server for all, "
        + ("its prefix cache on as by default" if args.prefix_cache is None else f"`--prefix-cache {args.prefix_cache}`")
        + "; each round has prompts of its own, so no prompt is served whole from a cache), synthetic prompts of "
        f"{args.prompt_tokens} tokens (counted by the bundled model's tokenizer; chat prompts are a few "
        f"tokens longer once the template wraps them) and {args.output_tokens} new tokens each (guidellm sends "
        "`ignore_eos`, `stream: true` and `stream_options: {include_usage, continuous_usage_stats}`). "
        "TTFT, inter-token latency (ITL) and time per output token (TPOT) are guidellm's, measured at the "
        "client over the successful requests; tokens/s are the server's throughput over the run.", "",
        markdown_table(["format", "run", "requests ok / errored / incomplete", "prompt / output tokens (median)",
                        "duration s", "TTFT ms mean / p50 / p99", "ITL ms mean / p50 / p99", "TPOT ms p50",
                        "requests/s", "output tokens/s", "total tokens/s"], rows).rstrip(), "",
        "Made by:", "", f"    {shell([sys.executable.rsplit('/', 1)[-1], *map(str, sys.argv)])}", "",
        "which ran:", "", f"    {export_cmd}", f"    {shell(server_cmd)}",
        *(f"    HF_HUB_OFFLINE=1 {shell(c)}" for c in commands.values()), "",
        f"guidellm runs on the same machine as the server. Load average (1 min) at the start / end: "
        f"{load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores (other jobs share them): compare rows within "
        "one run, and expect run-to-run differences of tens of percent.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guidellm", default="/tmp/gl-venv/bin/guidellm", help="guidellm executable (its own venv)")
    ap.add_argument("--export", type=Path, default=None, help="an export directory [the bundled model, exported]")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-guidellm"), help="scratch directory")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "guidellm.md")
    ap.add_argument("--formats", default="completions,chat", help="comma-separated: completions, chat")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=80, help="requests per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per format (alternating formats)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024, help="max_seq_len of the export made when no --export")
    ap.add_argument("--threads", type=int, default=None, help="server's ONNX Runtime threads [all cores]")
    ap.add_argument("--prefix-cache", default=None, help="server's --prefix-cache SIZE [its default]")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if any(f not in FORMATS for f in formats):
        ap.error(f"--formats: choose from {', '.join(FORMATS)}")
    if not Path(args.guidellm).is_file():
        ap.error(f"--guidellm {args.guidellm}: no such file (python -m venv DIR && DIR/bin/pip install guidellm)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.export is None:
        from bsbr_export.bench.serving import make_export

        export = make_export(args.work, args.max_len)
        export_cmd = (f"python -c 'from pathlib import Path; from bsbr_export.bench.serving import make_export; "
                      f"make_export(Path(\"{args.work}\"), {args.max_len})'")
    else:
        export, export_cmd = args.export, f"(export given: {args.export})"
    version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    port, load0 = _free_port(), os.getloadavg()[0]
    proc, server_cmd = start_server(export, port, args, args.work / "server.log")
    results, commands, env = {}, {}, {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        order = [(fmt, run) for run in range(args.rounds) for fmt in (formats if run % 2 == 0 else formats[::-1])]
        for fmt, run in order:
            out = args.work / f"guidellm-{fmt}-{run + 1}.json"
            out.unlink(missing_ok=True)
            cmd = commands[fmt, run] = guidellm_command(args, port, fmt, out, SEED + run)
            print(f"[guidellm] {fmt}: {' '.join(cmd)}", flush=True)
            log_path = args.work / f"guidellm-{fmt}-{run + 1}.log"
            with open(log_path, "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=args.work, env=env,
                                    timeout=1800).returncode
            if rc != 0 or not out.is_file():
                raise SystemExit(f"guidellm failed ({rc}); its log: {log_path}")
            results[fmt, run] = summary(json.loads(out.read_text()))
            print(f"[guidellm] {fmt} run {run + 1}: {json.dumps(results[fmt, run])}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    text = fragment(results, args, server_cmd, commands, export_cmd, version, (load0, os.getloadavg()[0]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    flat = {f"{f} {run + 1}": x for (f, run), x in results.items()}
    (args.work / "summary.json").write_text(json.dumps(flat, indent=1))
    print(text)
    bad = {f"{f} {run + 1}": s["requests"] for (f, run), s in results.items()
           if s["requests"]["errored"] or s["requests"]["incomplete"]}
    if bad:
        print(f"requests errored or incomplete: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
