"""The same application on Ray Serve: replicas, each with its own runtime (engine, scheduler,
metrics), requests routed by Ray's HTTP proxy. Ray is imported only here, and only when called.

One command (Ray's own CLI; ``pip install 'bsbr-export[ray]'``):

    serve run bsbr_export.serve.ray_app:build export_dir=out/gpt2-pystdlib num_replicas=2 max_batch=16

Arguments (all ``key=value``): export_dir (required), num_replicas [1], max_batch [8],
max_queue [64], threads [1], precision [fp32], prefill_chunk [256], model_name [the directory's
name], num_cpus per replica [threads]. On a cluster: ``ray start --head`` on one node, ``ray
start --address=HEAD:6379`` on each other node (same Python environment and the export at the
same path on every node), then the command above with ``--address=ray://HEAD:10001`` or run on
the head node; Ray places the replicas on the nodes. Each replica answers /v1/completions,
/v1/models, /health and /metrics (the replica's own counters) exactly as ``bsbr-export serve``.

Keys and limits as ``bsbr-export serve`` (the same app factory, the same ``security.Guard``):
api_key=KEY (several separated by commas), api_key_file=FILE or $BSBR_API_KEY on the driver;
max_body_bytes, max_prompt_tokens, max_tokens_cap, max_prompts, max_tokens_in_flight,
request_timeout_s, receive_timeout_s, send_timeout_s, stream_buffer, log_content=1. Ray's proxy listens on 127.0.0.1 unless
told otherwise; give a key before exposing it.
"""

from __future__ import annotations

from .app import ServeConfig, create_app

INT_ARGS = ("num_replicas", "max_batch", "max_queue", "threads", "prefill_chunk", "max_body_bytes",
            "max_prompt_tokens", "max_tokens_cap", "max_prompts", "max_tokens_in_flight", "stream_buffer")
FLOAT_ARGS = ("num_cpus", "drain_s", "request_timeout_s", "receive_timeout_s", "header_timeout_s", "send_timeout_s")


def deployment(config: ServeConfig, num_replicas: int = 1, num_cpus: float | None = None):
    """A Ray Serve deployment (not yet bound) serving ``create_app(config)`` in every replica."""
    from ray import serve

    def build_app():  # runs in each replica: its own app, engine and scheduler
        return create_app(config)

    cpus = num_cpus if num_cpus is not None else float(config.threads or 1)

    @serve.deployment(name="bsbr", num_replicas=num_replicas, ray_actor_options={"num_cpus": cpus},
                      max_ongoing_requests=max(1, config.max_batch + config.max_queue))
    @serve.ingress(build_app)
    class BSBRServe:
        pass

    return BSBRServe


def config_from_args(args: dict) -> tuple[ServeConfig, int, float | None]:
    """``serve run`` arguments (strings) -> (ServeConfig, num_replicas, num_cpus)."""
    from ..errors import InputError

    args = dict(args)
    if "export_dir" not in args:
        raise InputError("export_dir=DIR is required")
    known = {"export_dir", "precision", "model_name", "api_key", "api_key_file", "log_content", "chat_template", *INT_ARGS, *FLOAT_ARGS}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        ints = {k: int(args.pop(k)) for k in INT_ARGS if k in args}
        floats = {k: float(args.pop(k)) for k in FLOAT_ARGS if k in args}
    except ValueError as e:
        raise InputError(f"a numeric argument is not a number: {e}") from None
    from .security import collect_keys

    keys = collect_keys(str(args.pop("api_key", "")).split(","), args.pop("api_key_file", None))
    log_content = str(args.pop("log_content", "0")).lower() in ("1", "true", "yes")
    replicas, cpus = ints.pop("num_replicas", 1), floats.pop("num_cpus", None)
    config = ServeConfig(str(args.pop("export_dir")), threads=ints.pop("threads", 1), api_keys=keys,
                         log_content=log_content, **ints, **floats, **args)
    return config, replicas, cpus


def build(args: dict):
    """Ray Serve application builder (``serve run bsbr_export.serve.ray_app:build key=value ...``)."""
    from ..runtime.api import check_export

    config, replicas, cpus = config_from_args(args)
    check_export(config.export_dir, config.precision)  # fail here, in one line, not in every replica
    return deployment(config, replicas, cpus).bind()
