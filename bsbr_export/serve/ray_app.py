"""The same application on Ray Serve: replicas, each with its own runtime (engine, scheduler,
metrics), requests routed by Ray's HTTP proxy. Ray is imported only here, and only when called.

One command (Ray's own CLI; ``pip install 'bsbr-export[ray]'``):

    serve run bsbr_export.serve.ray_app:build export_dir=out/gpt2-pystdlib num_replicas=2 max_batch=16

Arguments (all ``key=value``, read into ``RayArgs``, which Ray validates before calling the
builder: a misspelt key or a bad number is refused with the field's name): export_dir
(required), num_replicas [1], max_batch [8], max_queue [64], threads [1], precision [fp32],
prefill_chunk [256], model_name [the directory's name], num_cpus per replica [threads]. On a cluster: ``ray start --head`` on one node, ``ray
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

from pydantic import BaseModel, ConfigDict, Field

from .app import ServeConfig, create_app


class RayArgs(BaseModel):
    """``serve run ... key=value`` arguments. Ray Serve reads them into this model (the builder's
    annotation) before calling ``build``; numbers and flags arrive as strings and are parsed here.
    An option left unset takes ``ServeConfig``'s default."""

    model_config = ConfigDict(extra="forbid")

    export_dir: str
    num_replicas: int = Field(1, ge=1)
    num_cpus: float | None = Field(None, gt=0)  # per replica [threads]
    threads: int = 1
    precision: str | None = None
    model_name: str | None = None
    api_key: str = ""  # several separated by commas
    api_key_file: str | None = None
    log_content: bool = False
    chat_template: str | None = None
    max_batch: int | None = None
    max_queue: int | None = None
    prefill_chunk: int | None = None
    max_body_bytes: int | None = None
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    max_prompts: int | None = None
    max_tokens_in_flight: int | None = None
    stream_buffer: int | None = None
    drain_s: float | None = None
    request_timeout_s: float | None = None
    receive_timeout_s: float | None = None
    header_timeout_s: float | None = None
    send_timeout_s: float | None = None


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


def config_from_args(args: RayArgs | dict) -> tuple[ServeConfig, int, float | None]:
    """``serve run`` arguments (a ``RayArgs``, or a dict validated into one) -> (ServeConfig,
    num_replicas, num_cpus). A bad dict raises pydantic's ValidationError naming the field."""
    from .security import collect_keys

    if not isinstance(args, RayArgs):
        args = RayArgs.model_validate(args)
    fields = args.model_dump(exclude_none=True, exclude={"export_dir", "num_replicas", "num_cpus", "api_key",
                                                          "api_key_file"})
    keys = collect_keys(args.api_key.split(","), args.api_key_file)
    return ServeConfig(args.export_dir, api_keys=keys, **fields), args.num_replicas, args.num_cpus


def build(args: RayArgs):
    """Ray Serve application builder (``serve run bsbr_export.serve.ray_app:build key=value ...``);
    called directly, it takes a dict too."""
    from ..runtime.api import check_export

    config, replicas, cpus = config_from_args(args)
    check_export(config.export_dir, config.precision)  # fail here, in one line, not in every replica
    return deployment(config, replicas, cpus).bind()
