"""ONNX export, ONNX Runtime inference and parity (the main command on the bundled model)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bsbr_export.check import check_parity, grid_lengths
from bsbr_export.cli import main
from bsbr_export.convert import convert
from bsbr_export.errors import InputError, ModelLoadError
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.ops.onnx_graph import DOMAIN, function_name
from bsbr_export.generate import generate
from bsbr_export.runtime import ORTRunner, ORTStepper, TorchRunner, TorchStepper
from conftest import assert_close, assert_ort_decode_matches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp16_run(bundled_dir, tmp_path_factory):
    """The full pipeline with --engine fp16 on the bundled model, graphs only (no TensorRT here)."""
    out = tmp_path_factory.mktemp("run") / "fp16"
    res = CliRunner().invoke(main, [str(bundled_dir), "--engine", "fp16", "--onnx-only", "--out", str(out)])
    return res, out


@pytest.fixture(scope="module")
def tiny_export(tiny_hf_dir, tmp_path_factory):
    """Tiny model with a chunk of 24 and the plain retrieval at g = 1."""
    model = convert(tiny_hf_dir, chunk_size=24, retrieval="plain", retrieval_scale=1.0)
    out = tmp_path_factory.mktemp("tiny_onnx")
    export_onnx(model, out, ExportSpec(max_seq_len=200))
    return model, out


def test_function_graph_structure(tiny_export):
    model, out = tiny_export
    m = onnx.load(out / "model.onnx", load_external_data=False)
    assert m.opset_import[0].version >= 18
    name = function_name(False, model.cfg.lookback)  # the default conversion's local window
    assert [(f.domain, f.name) for f in m.functions] == [(DOMAIN, name)]
    def walk(nodes):  # the short-prompt If holds each layer's fused op in its else branch
        for n in nodes:
            yield n
            for a in n.attribute:
                if a.type == a.GRAPH:
                    yield from walk(a.g.node)

    nodes = [n for n in walk(m.graph.node) if n.op_type == name]
    assert len(nodes) == 2 and all(n.domain == DOMAIN for n in nodes)
    attrs = {a.name: a for a in nodes[0].attribute}
    assert attrs["chunk_size"].i == 24 and attrs["plugin_namespace"].s == b"bsbr"
    assert (out / "weights.onnx.data").is_file()  # weights as external data, one file for every graph
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


@pytest.mark.parametrize("inline", [False, True])
def test_tiny_parity_with_retrieval_on(tiny_hf_dir, tmp_path, inline):
    """Random ids, a non-power-of-two chunk and retrieval at full scale: every grid point."""
    model = convert(tiny_hf_dir, chunk_size=24, retrieval="plain", retrieval_scale=1.0,
                    compression=None if inline else 2)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=200, inline=inline), decode=False)
    if inline:
        m = onnx.load(tmp_path / "model.onnx", load_external_data=False)
        assert not m.functions and all(n.domain == "" for n in m.graph.node)
    with ORTRunner(tmp_path / "model.onnx") as r:
        rep = check_parity(TorchRunner(model), r, chunk=24, max_len=200, vocab=101)
    assert rep["passed"], rep
    assert rep["lengths"] == [1, 23, 24, 25, 51, 96, 200]


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed: the command would build the engine")
@pytest.mark.parametrize("engine", ["fp16", "fp32"])
def test_main_command_without_tensorrt_fails_before_any_work(bundled_dir, tmp_path, engine):
    """--engine fp16|fp32 without TensorRT: one error line at step 1, nothing converted or written."""
    out = tmp_path / "o"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", str(bundled_dir), "--engine", engine,
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err[0] == "[1] checking options and memory" and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[-1].startswith(f"error: --engine {engine} builds a TensorRT engine: TensorRT not installed")
    assert "--engine onnx or int8" in err[-1] and "--onnx-only" in err[-1]
    assert not any(line.startswith("[2]") for line in err)  # stopped before converting
    assert not out.exists() and not list(tmp_path.glob(".o.partial.*"))
    assert took < 60, f"took {took:.0f} s"


def test_main_command_fp16_onnx_only(fp16_run):
    res, out = fp16_run
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["chunk_size"] == 128
    assert manifest["engine_status"] == "not built (--onnx-only)"
    for name in ("model.onnx", "weights.onnx.data", "decode.onnx", "model_fp16.onnx", "bsbr/model.safetensors"):
        assert name in manifest["files"], name
        assert (out / name).is_file()
    # Time and peak memory of every stage, for sizing machines.
    stages = manifest["stages"]
    recorded = ["reference"] if manifest["parity_reference"]["mode"] == "disk" else []
    assert list(stages) == ["convert", "export", "export_fp16", "fidelity", *recorded, "parity_fp32", "parity_fp16"]
    assert manifest["fidelity"]["windows"] == 4  # against the original GPT-2, on the held-out ids
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 50 * 2**20 for s in stages.values())


def test_bundled_fp32_parity_every_grid_point(fp16_run):
    _, out = fp16_run
    rep = json.loads((out / "parity_onnx_fp32.json").read_text())
    assert rep["passed"]
    assert rep["lengths"] == grid_lengths(128, 1024) == [1, 127, 128, 129, 259, 512, 1024]
    assert {(c["source"], c["batch"]) for c in rep["cases"]} == {(s, b) for s in ("heldout", "random") for b in (1, 3)}
    assert max(c["max_abs"] for c in rep["cases"]) <= 1e-4


def test_bundled_fp16_graph_parity(fp16_run):
    """fp16 ONNX vs torch fp32, tolerance 3x the measured torch-fp16 distance per case."""
    _, out = fp16_run
    rep = json.loads((out / "parity_onnx_fp16.json").read_text())
    assert rep["passed"]
    for c in rep["cases"]:
        assert c["baseline_max_abs"] > 0 and c["max_abs"] <= 3 * c["baseline_max_abs"] + 1e-4
    m = onnx.load(out / "model_fp16.onnx", load_external_data=False)
    types = {i.data_type for i in m.graph.initializer if i.name.startswith("h.")}
    assert types == {onnx.TensorProto.FLOAT16}


def test_bundled_inlined_graph_parity(bundled_dir, heldout_ids, tmp_path):
    from bsbr_export.pipeline import parity_onnx

    model = convert(bundled_dir)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=1024, inline=True), decode=False)
    rep = parity_onnx(model, tmp_path / "model.onnx", 1024, heldout_ids)
    assert rep["passed"], [c for c in rep["cases"] if not c["passed"]]


def test_greedy_generation_torch_equals_ort(fp16_run, bundled_dir, heldout_ids):
    _, out = fp16_run
    model = convert(bundled_dir)
    prompt = heldout_ids[5000:5300][None]
    a = generate(TorchStepper(model, 364), prompt, 64)
    b = generate(ORTStepper(out, max_len=364), prompt, 64)
    assert a.shape == (1, 64) and a.tolist() == b.tolist()


def test_ort_decode_crosses_chunk_boundaries(tiny_export):
    """Teacher-forced decode through many chunk closings matches the full forward."""
    model, out = tiny_export
    check_ort_decode(model, out, np.random.default_rng(0).integers(0, 101, size=(2, 130)), prompt=30)


def check_ort_decode(model, onnx_dir, ids, prompt: int):
    """Prefill ``prompt`` tokens, then teacher-forced decode of the rest: ORT vs torch full forward."""
    with torch.no_grad():
        full = model(torch.from_numpy(ids))
    assert_ort_decode_matches(full, onnx_dir, ids, prompt)


def test_polygraphy_tools_accept_the_graph(tiny_export):
    _, out = tiny_export
    poly = shutil.which("polygraphy") or pytest.skip("polygraphy not installed")
    r = subprocess.run([poly, "inspect", "model", str(out / "model.onnx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "input_ids" in r.stdout
    r = subprocess.run([poly, "run", str(out / "model.onnx"), "--onnxrt", "--val-range", "input_ids:[0,100]",
                        "--input-shapes", "input_ids:[2,37]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout + r.stderr


# ----------------------------------------------------------------------------- bad input

def test_sequence_longer_than_export_is_refused_before_ort(tiny_export):
    _, out = tiny_export
    with ORTRunner(out / "model.onnx") as r:
        with pytest.raises(InputError, match="exceeds the export's maximum of 200"):
            r.infer({"input_ids": np.zeros((1, 201), dtype=np.int64)})


@pytest.mark.parametrize("feeds,msg", [
    ({"input_ids": np.zeros((1, 5), dtype=np.float32)}, "must be int64"),
    ({"input_ids": np.zeros((5,), dtype=np.int64)}, "rank 1"),
    ({"input_ids": np.zeros((1, 2, 3), dtype=np.int64)}, "rank 3"),
    ({"input_ids": np.full((1, 3), 101, dtype=np.int64)}, r"must lie in \[0, 101\)"),
    ({"ids": np.zeros((1, 3), dtype=np.int64)}, "expected exactly the feed 'input_ids'"),
])
def test_bad_feeds(tiny_export, feeds, msg):
    _, out = tiny_export
    with ORTRunner(out / "model.onnx") as r:
        with pytest.raises(InputError, match=msg):
            r.infer(feeds)


def test_unreadable_onnx(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        with ORTRunner(tmp_path / "model.onnx"):
            pass


@pytest.mark.parametrize("args,code,msg", [
    # Option ranges are click's: a usage error (exit 2) that names the option.
    (["--max-seq-len", "0"], 2, "Invalid value for '--max-seq-len': 0 is not in the range x>=1."),
    (["--threads", "0"], 2, "Invalid value for '--threads': 0 is not in the range x>=1."),
    (["--chunk-size", "-4"], 1, "chunk size must be a positive integer"),  # the configuration's own check
])
def test_main_command_bad_options(tiny_hf_dir, tmp_path, args, code, msg):
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == code and msg in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_export_command_bad_max_seq_len(tiny_hf_dir, tmp_path):
    res = CliRunner().invoke(main, ["export", str(tiny_hf_dir), "--out", str(tmp_path / "o"), "--max-seq-len", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--max-seq-len': -1 is not in the range x>=1." in res.output
    assert not (tmp_path / "o").exists()


def test_main_command_partial_model_dir(tiny_hf_dir, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d)
    res = CliRunner().invoke(main, [str(d), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "partial model directory" in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["partial"]


def test_main_command_refuses_existing_output(tiny_hf_dir, tmp_path):
    (tmp_path / "o").mkdir()
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "already exists (use --force" in res.output


def test_interrupted_export_leaves_nothing_valid(tiny_hf_dir, tmp_path, monkeypatch):
    import bsbr_export.export as ex

    real = ex._save
    calls = []

    def dying_save(m, path, *rest, **kw):
        calls.append(path.name)
        if path.name == "decode.onnx":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        real(m, path, *rest, **kw)

    monkeypatch.setattr(ex, "_save", dying_save)
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(tmp_path / "o"), "--chunk-size", "24"])
    assert res.exit_code == 1 and "Aborted" in res.output  # click's answer to Ctrl-C
    assert calls == ["model.onnx", "extend.onnx", "decode.onnx"]
    # no output dir, no partial leftovers (the output lock file stays, never removed)
    assert [p.name for p in tmp_path.iterdir()] in ([], [".o.lock"])


def test_standard_attention_graph_equals_hf(tiny_hf_dir, tiny_hf, tmp_path):
    """The benchmark's standard-attention graph computes HF GPT-2 exactly."""
    model = convert(tiny_hf_dir, chunk_size=24)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=256, attention="full", state_outputs=False), decode=False)
    ids = np.random.default_rng(1).integers(0, 101, size=(2, 150))
    with ORTRunner(tmp_path / "model.onnx") as r:
        out = r.infer({"input_ids": ids})["logits"]
    with torch.no_grad():
        ref = tiny_hf(torch.from_numpy(ids)).logits
    assert_close(torch.from_numpy(out), ref, 1e-4, "full attention vs HF")


@pytest.mark.parametrize("compression,fmap", [(None, "elu1"), (2, "relu")])
def test_normalised_retrieval_exports(tiny_hf_dir, tmp_path, compression, fmap):
    """The normalised variant: prefill grid parity and decode through chunk closings."""
    model = convert(tiny_hf_dir, chunk_size=24, compression=compression, retrieval="normalised",
                    feature_map=fmap, retrieval_scale=1.0)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=200))
    m = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    assert [f.name for f in m.functions] == [function_name(True, model.cfg.lookback)]
    with ORTRunner(tmp_path / "model.onnx") as r:
        rep = check_parity(TorchRunner(model), r, chunk=24, max_len=200, vocab=101)
    assert rep["passed"], [c for c in rep["cases"] if not c["passed"]]
    check_ort_decode(model, tmp_path, np.random.default_rng(2).integers(0, 101, size=(2, 100)), prompt=24)
