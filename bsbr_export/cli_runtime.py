"""The command-line commands that run an export: ``generate`` and ``serve`` (the base install
suffices), and the one-line error exit every command shares. ``cli`` adds them to its group;
like ``cli``, this module only parses and calls one function of a stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import BSBRExportError


def fail(msg: str, code: int = 1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class Choice(click.Choice):
    """``click.Choice`` that names the nearest choice when a value is mistyped
    (``--engine onxx``: "... did you mean 'onnx'?")."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            import difflib

            near = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            if near:
                e.message = f"{e.message.rstrip('.')}; did you mean {near[0]!r}?"
            raise


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, name: str, zero: bool = False) -> int:
    """'4GiB', '512MiB', '1.5GB', '1000000' -> bytes (and '0' with ``zero``); a one-line error otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[unit] < (0 if zero else 1):
        fail(f"{name} must be a size such as 4GiB, 512MiB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--prompts-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file of prompts, one per line, generated as one batch (instead of PROMPT).")
@click.option("--backend", type=Choice(["torch", "onnx"]), default="onnx", show_default=True,
              help="onnx: the torch-free runtime over the exported graphs. torch: the PyTorch model in bsbr/.")
@click.option("--precision", type=Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Graphs to run (onnx backend): fp16 needs the _fp16 graphs (--engine fp16), int8 the _int8 "
                   "graphs (--engine int8).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample among the most likely tokens of total mass p.")
@click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of each prompt's sampler.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text ends before it.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the end-of-text token.")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider (repeatable, in order) [CUDA when present, then CPU].")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
def generate(model_dir, prompt, prompts_file, backend, precision, max_new_tokens, temperature, top_k, top_p,
             repetition_penalty, seed, stop, ignore_eos, providers, threads):
    """Generate text from an output directory of the main command, printing tokens as they come.

    \b
    One prompt:      bsbr-export generate DIR "def parse("
    A batch:         bsbr-export generate DIR --prompts-file prompts.txt   (one prompt per line)
    """
    if (prompt is None) == (prompts_file is None):
        fail("give either PROMPT or --prompts-file")
    try:
        if prompts_file is not None:
            prompts = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line]
            if not prompts:
                fail(f"{prompts_file}: no prompts (one per line)")
        else:
            prompts = [prompt]
        if backend == "torch":
            from .runtime.steppers import torch_runtime

            rt = torch_runtime(model_dir)
        else:
            from .runtime import load

            rt = load(model_dir, precision=precision, providers=list(providers) or None, threads=threads)
        stop_tokens = None if ignore_eos or rt.eos_token_id is None else [rt.eos_token_id]
        events = rt.stream_batch(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=list(stop),
                                 stop_tokens=stop_tokens)
        if len(prompts) == 1:
            click.echo(prompts[0], nl=False)
        for ev in events:
            if len(prompts) == 1:
                click.echo(ev.piece, nl=False)
                sys.stdout.flush()
            elif ev.done is not None:  # a batch: each completion as its row finishes
                click.echo(f"[{ev.row}] ({ev.done.finish_reason}) {prompts[ev.row]}{ev.done.text}")
        if len(prompts) == 1:
            click.echo()
    except ModuleNotFoundError as e:
        fail(f"{e.name} is not installed: --backend torch needs the export extra "
             f"(pip install 'bsbr-export[export]')")
    except (BSBRExportError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 = any free port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows of the running decode batch (sequences generated at once).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a row beyond the free rows; more get 429 with Retry-After.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--precision", type=Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Graphs to serve: fp16 needs --engine fp16's graphs, int8 --engine int8's.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens fed per scheduler step, between decode steps of running streams.")
@click.option("--model-name", default=None, help="Model id clients send [the directory's name].")
@click.option("--drain", "drain_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds in-flight requests may finish after SIGTERM before they are cancelled.")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider (repeatable).")
@click.option("--api-key", "api_keys", multiple=True,
              help="Key clients send as 'Authorization: Bearer KEY' (repeatable; also --api-key-file, $BSBR_API_KEY).")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="File of API keys, one a line.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body; more gets 413 before it is read.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Longest prompt, in tokens.")
@click.option("--max-tokens-cap", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--max-prompts", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most prompts in one request.")
@click.option("--max-tokens-in-flight", type=click.IntRange(min=1), default=131072, show_default=True,
              help="Prompt + max_tokens of all requests in flight; more gets 429.")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds one request may run; it is then cancelled (408).")
@click.option("--receive-timeout", "receive_timeout_s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds a request body may take to arrive (slow clients get 408).")
@click.option("--header-timeout", "header_timeout_s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds a request's headers may take to arrive; the connection is then closed.")
@click.option("--send-timeout", "send_timeout_s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds a streaming client may read nothing; it is then dropped (row freed).")
@click.option("--log-content", is_flag=True, help="Log prompt and completion text (off: counts only).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS certificate (PEM).")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key (PEM).")
@click.option("--state-memory", default=None, metavar="SIZE",
              help="Memory for the decode state of all rows, e.g. 4GiB or 512MiB: the rows' buffers and each "
                   "request's bank of closed chunks, reserved when it is admitted (a request that does not fit "
                   "waits in the queue; one that could never fit gets 400) [half the memory free at start].")
@click.option("--prepack", type=Choice(["decode", "all", "none"]), default="decode", show_default=True,
              help="ONNX Runtime weight prepacking: for the prompt and per-token graphs (one session, one packed "
                   "copy of the dense weights: prompts and batched decode at full speed), for the chunk close too, "
                   "or none (least memory).")
@click.option("--prefix-cache", default="1GiB", metavar="SIZE", show_default=True,
              help="Memory for prompt states kept for reuse: a request whose prompt starts with a cached prefix "
                   "(a repeated prompt, a conversation's earlier turns, a shared system prompt) computes only the "
                   "rest; least recently used states go first. 0 turns it off.")
@click.option("--chat-template", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Jinja chat template for /v1/chat/completions [chat_template of the export's tokenizer_config.json; "
                   "without either, chat requests get 400].")
def serve(model_dir, host, port, max_batch, max_queue, threads, precision, prefill_chunk, model_name, drain_s,
          providers, api_keys, api_key_file, insecure, max_body_bytes, max_prompt_tokens, max_tokens_cap, max_prompts,
          max_tokens_in_flight, request_timeout_s, receive_timeout_s, header_timeout_s, send_timeout_s, log_content,
          ssl_certfile, ssl_keyfile, state_memory, prepack, prefix_cache, chat_template):
    """OpenAI-compatible completions and chat server over an export, with continuous batching.

    \b
    bsbr-export serve DIR --port 8000 --max-batch 16
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "DIR-NAME", "prompt": "def parse(", "max_tokens": 32, "temperature": 0}'
    Endpoints: POST /v1/completions (n and best_of too), /v1/chat/completions, /tokenize,
    /detokenize; GET /v1/models, /health, /metrics. Needs the serve extra.
    With an API key every endpoint but /health needs 'Authorization: Bearer KEY'; a non-loopback
    --host without a key is refused unless --insecure.
    """
    try:
        from .serve.app import ServeConfig, run as run_server
        from .serve.security import check_exposure, collect_keys
    except ModuleNotFoundError as e:
        fail(f"{e.name} is not installed: serve needs the serve extra (pip install 'bsbr-export[serve]')")
    try:
        keys = collect_keys(api_keys, api_key_file)
        check_exposure(host, keys, insecure)  # before anything is loaded or bound
        config = ServeConfig(str(model_dir), precision=precision, threads=threads, max_batch=max_batch,
                             max_queue=max_queue, prefill_chunk=prefill_chunk, model_name=model_name, drain_s=drain_s,
                             providers=list(providers) or None, api_keys=keys, max_body_bytes=max_body_bytes,
                             max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap,
                             max_prompts=max_prompts, max_tokens_in_flight=max_tokens_in_flight,
                             request_timeout_s=request_timeout_s, receive_timeout_s=receive_timeout_s,
                             header_timeout_s=header_timeout_s, send_timeout_s=send_timeout_s, log_content=log_content,
                             state_memory=None if state_memory is None else parse_size(state_memory, "--state-memory"),
                             prepack={"all": True, "none": False}.get(prepack, "decode"),
                             prefix_cache=parse_size(prefix_cache, "--prefix-cache", zero=True),
                             chat_template=None if chat_template is None else str(chat_template))
        from .runtime.api import check_export

        check_export(model_dir, precision)
        from .serve.scheduler import check_state_memory

        check_state_memory(model_dir, max_batch, config.state_memory)
        from .serve.chat import load_template

        load_template(config)  # a bad template fails here, in one line
        run_server(config, host=host, port=port, insecure=insecure, ssl_certfile=ssl_certfile,
                   ssl_keyfile=ssl_keyfile)
    except (BSBRExportError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
