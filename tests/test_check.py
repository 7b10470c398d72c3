"""The memory-bounded parity checker gives the old checker's statistics.

The old checker held both [batch, T, vocab] tensors and their float64 copies; the new one
reduces row by row and slice by slice. Both are compared on the same logits, on the
bundled model's grid (ONNX Runtime against torch), to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export import check as C


def old_compare_logits(ref: np.ndarray, out: np.ndarray) -> dict:
    """The checker's formulas before the memory-bounded rewrite, verbatim: whole tensors in float64."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(out64 - ref64)

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref64), log_softmax(out64)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    a, b = ref64.reshape(-1, ref.shape[-1]), out64.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / (np.abs(ref64) + 1e-6)).max()),
            "cosine_min": float(cos.min()), "top1": float((ref.argmax(-1) == out.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def assert_same(new: dict, old: dict, tol: float = 1e-6):
    assert set(new) == set(old)
    for k in old:
        assert abs(new[k] - old[k]) <= tol * max(1.0, abs(old[k])), (k, new[k], old[k])


def test_streaming_equals_old_on_random_logits(monkeypatch):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 37, 211)).astype(np.float32) * 5
    out = (ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3).astype(np.float32)
    monkeypatch.setattr(C, "SLICE_BYTES", 8 * 211 * 5)  # 5 positions per slice: many partial slices
    assert C.slice_rows(211) == 5
    assert_same(C.compare_logits(ref, out), old_compare_logits(ref, out))


@pytest.fixture(scope="module")
def bundled_export(bundled_dir, tmp_path_factory):
    from bsbr_export.convert import convert
    from bsbr_export.export import ExportSpec, export_onnx

    model = convert(bundled_dir)
    d = tmp_path_factory.mktemp("bundled_export")
    export_onnx(model, d, ExportSpec(max_seq_len=model.cfg.n_positions), decode=False)
    return model, d / "model.onnx"


@pytest.mark.slow
def test_new_checker_matches_old_on_bundled_grid(bundled_export, heldout_ids, monkeypatch):
    from bsbr_export.runtime import ORTRunner, TorchRunner

    model, onnx_path = bundled_export
    cfg = model.cfg
    monkeypatch.setattr(C, "SLICE_BYTES", 8 * cfg.vocab_size * 100)  # several slices per row at T = 1024
    ref_runner = TorchRunner(model)
    with ORTRunner(onnx_path) as cand:
        for si, source in enumerate(("heldout", "random")):
            for b in C.BATCHES:
                for n in C.grid_lengths(cfg.chunk_size, cfg.n_positions):
                    ids = C.make_inputs(source, b, n, cfg.vocab_size, heldout_ids, seed=1000 * si + 10 * b + n)
                    out = C.candidate_logits(cand, ids, cfg.vocab_size)
                    assert np.array_equal(out, cand.infer({"input_ids": ids})["logits"])
                    ref = np.concatenate([ref_runner.infer({"input_ids": ids[r:r + 1]})["logits"]
                                          for r in range(b)])
                    old = old_compare_logits(ref, out)
                    assert_same(C.compare_logits(ref, out), old)
                    # The checker's own path (reference row by row against the candidate's batch).
                    new, _ = C.compare_case(ref_runner, cand, ids, cfg.vocab_size)
                    assert_same(new, old)


def test_peak_estimate_scales_and_refuses(tiny_hf_dir):
    import json

    from bsbr_export.convert import bsbr_config_from_hf
    from bsbr_export.errors import ConfigError
    from bsbr_export.pipeline import check_memory

    gpt2 = bsbr_config_from_hf(dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    est = C.peak_bytes(gpt2, 8192)
    # One [3, 8192, 50257] fp32 output is 4.6 GiB (the LM head writes straight into it); the
    # measured peak of the whole command with both models in memory was 10.76 GiB (the
    # --parity-reference memory path; recorded to disk it is now 7.67 GiB,
    # docs/results/gpt2-size-main-command.md): the estimate stays on the safe side, within 25%.
    assert 10.76 * 2**30 < est < 1.25 * 10.76 * 2**30
    assert est < 0.75 * 24 * 2**30  # a 24 GiB machine runs it
    # The length-dependent part (outputs, rows, activations) doubles with the length.
    assert C.peak_bytes(gpt2, 16384) - est > 0.9 * (est - C.peak_bytes(gpt2, 1))
    lines = []
    check_memory(gpt2, 1024, log=lines.append)
    assert "parity memory: about" in lines[0]
    with pytest.raises(ConfigError, match=r"--max-seq-len 1000000: .* needs about [0-9.]+ GiB"):
        check_memory(gpt2, 1_000_000, log=lines.append)
    assert json.dumps(C.n_params(gpt2))  # an int


def test_config_difference_names_first_key():
    from bsbr_export.config import BSBRConfig

    cfg = BSBRConfig(vocab_size=10, n_positions=64, n_embd=8, n_layer=1, n_head=2, chunk_size=16)
    meta = {"config": cfg.to_dict(), "max_seq_len": 64, "precision": "fp32"}
    assert C.config_difference(meta, cfg, "fp32") is None
    other = cfg.replace(chunk_size=32)
    assert C.config_difference(meta, other).startswith("chunk_size: the graph was exported with 16, the model has 32")
    assert "precision" in C.config_difference(meta, cfg, "fp16")
    assert "no bsbr_export metadata" in C.config_difference({}, cfg)
    assert "max_seq_len" in C.config_difference({**meta, "max_seq_len": 0}, cfg)


# --------------------------------------------------------------------------- one model at a time

def test_recorded_reference_gives_the_live_statistics(tiny_hf_dir, tmp_path):
    """The grid checked against torch's recorded logits (the model freed before the session
    exists) gives the same report as against the live model, baseline statistics included."""
    import gc
    import weakref

    from bsbr_export.convert import convert
    from bsbr_export.export import ExportSpec, export_onnx
    from bsbr_export.pipeline import parity_onnx, record_reference

    model = convert(tiny_hf_dir, chunk_size=16)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=64), decode=False)
    export_onnx(model, tmp_path, ExportSpec(max_seq_len=64, fp16=True), decode=False)
    text = np.random.default_rng(3).integers(0, model.cfg.vocab_size, 500)
    live = {p: parity_onnx(model, tmp_path / f"model{s}.onnx", 64, text, p) for p, s in (("fp32", ""),
                                                                                         ("fp16", "_fp16"))}
    rec = record_reference(model, tmp_path / "ref.f32", 64, text, fp16_baseline=True)
    lengths = C.grid_lengths(16, 64)
    assert rec.bytes == C.record_bytes(model.cfg, 64) == 2 * sum(C.BATCHES) * sum(lengths) * model.cfg.vocab_size * 4
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the record holds no reference to the model
    for p, s in (("fp32", ""), ("fp16", "_fp16")):
        recorded = parity_onnx(rec, tmp_path / f"model{s}.onnx", 64, text, p)
        assert recorded["passed"] and len(recorded["cases"]) == len(live[p]["cases"]) == 2 * 2 * len(lengths)
        for a, b in zip(recorded["cases"], live[p]["cases"]):
            assert a == b  # the same rows compared: identical numbers, baseline's included
    # A row that was not recorded is an error, not a silent answer.
    with pytest.raises(KeyError, match="no recorded reference row"):
        rec.infer({"input_ids": np.zeros((1, 5), dtype=np.int64)})
    with pytest.raises(ValueError, match="one row at a time"):
        rec.infer({"input_ids": np.zeros((2, 5), dtype=np.int64)})
    rec.remove()
    assert not (tmp_path / "ref.f32").exists()


def test_recorded_estimate_holds_the_weights_once(tmp_path, monkeypatch):
    from bsbr_export.convert import bsbr_config_from_hf
    from bsbr_export.pipeline import reference_mode

    large = bsbr_config_from_hf(dict(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20))
    W = 4 * C.n_params(large)
    together, once = C.peak_bytes(large, 1024), C.peak_bytes(large, 1024, recorded=True)
    assert together - once >= 0.95 * W  # the torch copy of the weights is no longer counted
    where = reference_mode(large, 1024, "onnx", tmp_path)
    assert where["mode"] == "disk" and where["record_bytes"] == C.record_bytes(large, 1024)
    # Without room on the disk for twice the record, auto keeps the reference in memory and
    # disk is refused in one line before any work.
    import shutil
    from collections import namedtuple

    from bsbr_export.errors import ConfigError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, int(1.5 * C.record_bytes(large, 1024))))
    assert reference_mode(large, 1024, "onnx", tmp_path)["mode"] == "memory"
    assert reference_mode(large, 1024, "onnx", tmp_path, "disk")["mode"] == "disk"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 1 << 20))
    with pytest.raises(ConfigError, match="--parity-reference disk: the reference logits need"):
        reference_mode(large, 1024, "onnx", tmp_path / "not" / "yet", "disk")


def test_main_command_with_the_reference_on_disk(tiny_hf_dir, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from bsbr_export.cli import main

    out = tmp_path / "o"
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(out), "--chunk-size", "16", "--max-seq-len", "64",
                                    "--engine", "fp16", "--onnx-only", "--parity-reference", "disk"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    where = man["parity_reference"]
    assert where["mode"] == "disk" and where["record_bytes"] > 0
    assert where["session"] == C.PARITY_SESSION  # glibc here: the threshold was set
    assert list(man["stages"]) == ["convert", "export", "export_fp16", "reference", "parity_fp32", "parity_fp16"]
    assert "--eval-text" in man["fidelity"]["skipped"]  # no held-out ids: no fidelity stage
    assert man["parity"]["onnx_fp32"]["passed"] and man["parity"]["onnx_fp16"]["passed"]
    assert not [p for p in out.rglob("*") if "reference" in p.name]  # the record is gone
    assert not any("reference" in f for f in man["files"])
    # A parity failure with the record on disk leaves nothing behind, the record included.
    monkeypatch.setitem(C.TOLERANCES, "fp32", 0.0)
    bad = tmp_path / "bad"
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(bad), "--chunk-size", "16", "--max-seq-len", "64",
                                    "--parity-reference", "disk"])
    assert res.exit_code != 0 and "fails parity" in res.output
    # (the output locks .o.lock and .bad.lock stay: a lock file is never removed, so two writers
    # can never hold two files)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["o"]
