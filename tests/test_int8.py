"""The int8 CPU engine: ``--engine int8`` on the bundled model, its files, its gate, and the runtime.

One main-command run on the bundled model (``bundled_int8_run`` in conftest.py, --max-seq-len
140: lengths 1, L-1, L, L+1 and 140, none but L a multiple of the chunk) is shared by the tests
here and in test_fidelity.py; gate failures run on the tiny random model of the other tests.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from bsbr_export.check import grid_lengths
from bsbr_export.cli import main
from bsbr_export.errors import ConfigError, InputError
from bsbr_export.quantize import MAX_KL, MIN_TOP1
from conftest import BUNDLED_INT8_MAX_LEN

MAX_LEN = BUNDLED_INT8_MAX_LEN
GRAPHS = ("model", "extend", "decode", "close")


@pytest.fixture(scope="module")
def int8_dir(bundled_int8_run):
    output, out = bundled_int8_run
    assert "parity onnx_int8" in output and "pass" in output
    return out


def _records(path):
    """(name, data type, location, offset, length) of a graph's external tensors."""
    m = onnx.load(str(path), load_external_data=False)
    out = []
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            out.append((t.name, t.data_type, d["location"], int(d["offset"]), int(d["length"])))
    return m, out


def test_int8_graphs_share_one_int8_weights_file(int8_dir):
    """Every int8 tensor lies in weights_int8.onnx.data, once (one offset per name, no overlap,
    the file no larger than its tensors plus alignment); fp32 tensors are read from the fp32
    export's weights.onnx.data at the fp32 graphs' own offsets, not copied."""
    fp32 = {}
    for g in GRAPHS:
        for name, _, loc, off, n in _records(int8_dir / f"{g}.onnx")[1]:
            assert loc == "weights.onnx.data"
            fp32[name] = (off, n)
    seen, int8_names = {}, set()
    for g in GRAPHS:
        m, recs = _records(int8_dir / f"{g}_int8.onnx")
        assert json.loads({p.key: p.value for p in m.metadata_props}["bsbr_export"])["precision"] == "int8"
        for name, dtype, loc, off, n in recs:
            assert loc in ("weights_int8.onnx.data", "weights.onnx.data"), (g, name, loc)
            if dtype == TensorProto.INT8:
                assert loc == "weights_int8.onnx.data", name
                int8_names.add(name)
            if loc == "weights.onnx.data":
                assert fp32.get(name) == (off, n), f"{name}: not the fp32 export's bytes"
            else:
                assert name not in fp32, f"{name}: copied into the int8 file"
                assert seen.setdefault(name, (off, n)) == (off, n), f"{name} stored twice"
        if g == "model":
            n_layer = json.loads({p.key: p.value for p in m.metadata_props}["bsbr_export"])["config"]["n_layer"]
            ops = [n.op_type for n in m.graph.node]
            assert ops.count("MatMulIntegerToFloat") == 4 * n_layer + 1  # QKV, c_proj, c_fc, mlp c_proj; LM head
    # Four dense layers per block and the LM head, each with its scale.
    assert len(int8_names) == 4 * n_layer + 1 and "wte.weight.T.int8" in int8_names
    spans = sorted(seen.values())
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, "overlapping tensors"
    size = (int8_dir / "weights_int8.onnx.data").stat().st_size
    assert size == spans[-1][0] + spans[-1][1]
    assert size < sum(n for _, n in spans) + 64 * len(spans)
    assert not any((int8_dir / f).exists() for f in ("model_int8.onnx.data", "weights_fp16.onnx.data"))


def test_int8_gate_passes_with_its_thresholds_recorded(int8_dir, bundled_dir):
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    entry = manifest["parity"]["onnx_int8"]
    assert manifest["engine"] == "int8" and entry["passed"] is True
    assert entry["thresholds"]["min_top1"] == MIN_TOP1 == 0.97 and entry["thresholds"]["max_kl_mean_nats"] == MAX_KL
    report = json.loads((int8_dir / "parity_onnx_int8.json").read_text())
    cfg = json.loads((int8_dir / "bsbr" / "config.json").read_text())
    assert report["lengths"] == grid_lengths(cfg["chunk_size"], MAX_LEN)
    assert set(report["sources"]) == {"heldout", "random"}
    for s in report["sources"].values():
        assert s["top1"] >= MIN_TOP1 and 0 < s["kl_mean"] <= MAX_KL  # int8 is not the fp32 graph: KL > 0
        assert s["positions"] == sum(b * n for b in report["batches"] for n in report["lengths"])
    assert len(report["cases"]) == 2 * len(report["batches"]) * len(report["lengths"])
    md = (int8_dir / "parity_onnx_int8.md").read_text()
    assert "top-1 agreement >= 97%" in md and "<= 0.02 nats" in md and "**pass**" in md
    assert {"parity_onnx_int8.json", "model_int8.onnx", "weights_int8.onnx.data"} <= set(manifest["files"])


def _tiny_run(tmp_path, tiny_hf_dir, *extra):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--engine", "int8", "--out", str(out), "--threads", "2",
                                    "--max-seq-len", "40", "--chunk-size", "16", *extra])
    return out, res


def test_int8_gate_failure_is_one_line_and_leaves_nothing(tmp_path, tiny_hf_dir):
    out, res = _tiny_run(tmp_path, tiny_hf_dir, "--int8-min-top1", "1.0", "--int8-max-kl", "0")
    assert res.exit_code == 1
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "FAILS the int8 gate" in err[0] and "mean KL" in err[0], res.output
    assert not out.exists()
    assert not [p for p in tmp_path.glob(".out.*") if p.name != ".out.lock"], list(tmp_path.iterdir())  # no partial dir


@pytest.mark.parametrize("args, msg", [
    (["--int8-min-top1", "1.5"], "Invalid value for '--int8-min-top1': 1.5 is not in the range 0.0<=x<=1.0."),
    (["--int8-max-kl", "-0.1"], "Invalid value for '--int8-max-kl': -0.1 is not in the range x>=0.0."),
])
def test_int8_bad_thresholds_refused_before_any_work(tmp_path, tiny_hf_dir, args, msg):
    out, res = _tiny_run(tmp_path, tiny_hf_dir, *args)
    assert res.exit_code == 2 and msg in res.output and "converting" not in res.output, res.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_non_finite_kl_refused_by_the_pipeline(tmp_path, tiny_hf_dir):
    out, res = _tiny_run(tmp_path, tiny_hf_dir, "--int8-max-kl", "inf")
    assert res.exit_code == 1 and "maximum mean KL must be a finite number" in res.output, res.output
    assert not out.exists()


def test_runtime_generates_from_int8(int8_dir):
    from bsbr_export.runtime import load

    prompts = ["def parse(", "import os\nimport sys\n\nclass Loader:", "    return self._"]
    fp32 = load(int8_dir, precision="fp32", threads=2)
    rt = load(int8_dir, precision="int8", threads=2)
    assert rt.engine.precision == "int8"
    a = fp32.generate(prompts, max_new_tokens=24)
    b = rt.generate(prompts, max_new_tokens=24)
    assert [len(x) for x in b] == [24] * 3 and all(0 <= t < rt.vocab_size for x in b for t in x)
    # Greedy: the first token comes from the prompt's own logits, where the gate holds; later
    # tokens may part once a near tie flips, so most (not all) of each continuation agrees.
    assert all(x[0] == y[0] for x, y in zip(a, b))
    prefix = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b)]
    assert sum(prefix) >= 0.5 * 24 * len(prompts), prefix
    # The prompts' next-token distributions through the int8 extend graph against the fp32 one.
    ids = rt.encode(prompts)
    la = fp32.engine.extend(fp32.engine.new_state(3), [0, 1, 2], ids)
    lb = rt.engine.extend(rt.engine.new_state(3), [0, 1, 2], ids)
    assert not np.array_equal(la, lb)  # the int8 graphs ran, not the fp32 ones
    pa = np.exp(la - la.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    lq = lb - lb.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (pa * (np.log(pa + 1e-30) - lq)).sum(-1)
    assert (kl <= MAX_KL).all(), kl


def test_bad_precision_names_rejected_in_one_line(int8_dir, tmp_path):
    from bsbr_export.export import ExportSpec
    from bsbr_export.runtime import load
    from bsbr_export.runtime.api import check_export
    from bsbr_export.runtime.engine import Engine

    for bad in ("int4", "INT8", "fp8"):
        with pytest.raises(InputError) as e:
            load(int8_dir, precision=bad)
        assert "\n" not in str(e.value) and "fp32, fp16, int8" in str(e.value)
        with pytest.raises(InputError):
            Engine(int8_dir, precision=bad)
    res = CliRunner().invoke(main, ["generate", str(int8_dir), "def f(", "--precision", "int4"])
    assert res.exit_code == 2 and "'int4' is not one of" in res.output
    # A directory without the int8 graphs names the command that writes them.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in int8_dir.iterdir():
        if "int8" not in f.name and f.is_file():
            (bare / f.name).symlink_to(f)
    (bare / "bsbr").symlink_to(int8_dir / "bsbr")
    with pytest.raises(InputError, match=r"missing graph extend_int8.onnx.*--engine int8"):
        check_export(bare, "int8")
    with pytest.raises(ConfigError, match="fp16 or int8"):
        ExportSpec(fp16=True, int8=True)
    res = CliRunner().invoke(main, ["export", str(int8_dir / "bsbr"), "--out", str(tmp_path / "e"), "--fp16", "--int8"])
    assert res.exit_code == 1 and res.output.strip() == "error: an export is fp16 or int8, not both"
    assert not (tmp_path / "e").exists()
