"""The serve application on Ray Serve: a local Ray instance, one replica, requests through Ray's
HTTP proxy on 127.0.0.1 (the ``openai`` client and raw HTTP). Skips without Ray."""

from __future__ import annotations

import inspect
import json
import socket

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bsbr-export[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pydantic import ValidationError

from bsbr_export.serve.ray_app import RayArgs, build, config_from_args

pytestmark = pytest.mark.slow
MODEL = "pystdlib"


@pytest.fixture(scope="module")
def export_dir(bundled_dir, tmp_path_factory):
    from bsbr_export.convert import convert, save_bsbr
    from bsbr_export.export import ExportSpec, export_onnx

    d = tmp_path_factory.mktemp("ray_export")
    model = convert(bundled_dir, chunk_size=32)
    save_bsbr(model, d / "bsbr", tokenizer_from=bundled_dir)
    export_onnx(model, d, ExportSpec(max_seq_len=256))
    return d


@pytest.fixture(scope="module")
def ray_url(export_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2 ** 20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"export_dir": str(export_dir), "model_name": MODEL, "num_replicas": "1", "max_batch": "4"}),
                  name="bsbr", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_replica_answers_like_the_server(ray_url):
    c = openai.OpenAI(base_url=ray_url + "/v1", api_key="none", timeout=60, max_retries=0)
    assert [m.id for m in c.models.list().data] == [MODEL]
    whole = c.completions.create(model=MODEL, prompt="def parse(", max_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="def parse(", max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert text == whole.choices[0].text
    r = httpx.post(ray_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(ray_url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]  # GPT-2 has no template
    assert httpx.get(ray_url + "/health", timeout=60).json()["status"] == "ok"
    assert "bsbr_generated_tokens_total" in httpx.get(ray_url + "/metrics", timeout=60).text


def test_ray_arguments_are_checked():
    # A dict (a direct call) is validated into RayArgs: pydantic's error names the field.
    with pytest.raises(ValidationError, match=r"export_dir\n  Field required"):
        config_from_args({})
    with pytest.raises(ValidationError, match=r"replicas\n  Extra inputs are not permitted"):
        config_from_args({"export_dir": "x", "replicas": "2"})
    with pytest.raises(ValidationError, match=r"max_batch\n  Input should be a valid integer"):
        config_from_args({"export_dir": "x", "max_batch": "many"})
    with pytest.raises(ValidationError, match=r"num_replicas\n  Input should be greater than or equal to 1"):
        config_from_args({"export_dir": "x", "num_replicas": "0"})
    config, replicas, cpus = config_from_args({"export_dir": "x", "num_replicas": "3", "max_batch": "16"})
    assert (config.max_batch, replicas, cpus, config.threads) == (16, 3, None, 1)
    assert (config.precision, config.max_queue, config.log_content, config.api_keys) == ("fp32", 64, False, ())
    assert json.dumps(config.served_name)
    config, _, cpus = config_from_args(RayArgs(export_dir="x", num_cpus="0.5", log_content="1", api_key="a,b",
                                               request_timeout_s="12.5"))
    assert (cpus, config.log_content, config.api_keys, config.request_timeout_s) == (0.5, True, ("a", "b"), 12.5)


def test_serve_run_reads_its_key_value_strings_into_the_typed_arguments(export_dir, monkeypatch):
    """``serve run bsbr_export.serve.ray_app:build export_dir=... num_replicas=2``: Ray reads the
    strings into the builder's annotated model before calling it (the function ``serve run`` calls)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as serve_run_builder

    from bsbr_export.serve import ray_app

    assert inspect.signature(build).parameters["args"].annotation is RayArgs  # what Ray looks for
    seen = []
    real = ray_app.deployment
    monkeypatch.setattr(ray_app, "deployment", lambda *a: seen.append(a) or real(*a))
    app = serve_run_builder(build, {"export_dir": str(export_dir), "num_replicas": "2", "max_batch": "4",
                                    "log_content": "true"})
    assert isinstance(app, serve.Application)
    config, replicas, cpus = seen[0]
    assert (config.export_dir, replicas, cpus, config.max_batch, config.log_content) == (
        str(export_dir), 2, None, 4, True)
    with pytest.raises(ValidationError, match="replicas"):
        serve_run_builder(build, {"export_dir": str(export_dir), "replicas": "2"})
