"""The serve application on Ray Serve: a local Ray instance, one replica, requests through Ray's
HTTP proxy on 127.0.0.1 (the ``openai`` client and raw HTTP). Skips without Ray."""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bsbr-export[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from bsbr_export.errors import InputError
from bsbr_export.serve.ray_app import build, config_from_args

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
    with pytest.raises(InputError, match="export_dir"):
        config_from_args({})
    with pytest.raises(InputError, match="unknown argument"):
        config_from_args({"export_dir": "x", "replicas": "2"})
    config, replicas, cpus = config_from_args({"export_dir": "x", "num_replicas": "3", "max_batch": "16"})
    assert (config.max_batch, replicas, cpus, config.threads) == (16, 3, None, 1)
    assert json.dumps(config.served_name)
