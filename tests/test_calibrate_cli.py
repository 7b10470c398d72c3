"""``bsbr-export calibrate``: bad data fails in one line before any model loads, a tiny run writes a
loadable checkpoint with calibration.json, an interrupted run resumes where its checkpoint left it,
and training moves the conversion's parameters without raising the held-out loss."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bsbr_export import calibrate_data, calibrate_run
from bsbr_export.calibrate_run import CHECKPOINT, Settings, prepare
from bsbr_export.cli import main
from bsbr_export.convert import convert, load_bsbr, save_bsbr

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A small run on the bundled model: 64-token windows, chunks of 16, a few steps.
TINY = ["--seq-len", "64", "--chunk-size", "16", "--heldout-windows", "2", "--eval-every", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for name in ("textwrap.py", "colorsys.py", "bisect.py", "keyword.py"):
        (d / name).write_text((STDLIB / name).read_text(encoding="utf-8"))
    (d / ".hidden.txt").write_bytes(b"\xff\xfe not utf-8, but hidden")
    (d / "empty.txt").write_text("")
    (d / "sub").mkdir()
    (d / "sub" / "blob.bin").write_bytes(b"\x00\x01\xff")
    return d


def invoke(args):
    return CliRunner().invoke(main, ["calibrate", *map(str, args)])


def one_line_error(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def bad_data(tmp: Path) -> dict:
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    (tmp / "notext.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    (tmp / "numtext.jsonl").write_text('{"text": 3}\n')
    (tmp / "short.txt").write_text("def f(x):\n    return x\n")
    (tmp / "emptydir").mkdir()
    (tmp / "emptydir" / ".hidden").write_text("hidden text does not count")
    return {
        "missing": ([tmp / "nope.txt"], "--data {t}/nope.txt: no such file or directory"),
        "empty file": ([tmp / "empty.txt"], "{t}/empty.txt: empty file"),
        "no text": ([tmp / "emptydir"], "no text in --data {t}/emptydir"),
        "not utf-8": ([tmp / "latin1.txt"], "{t}/latin1.txt: not UTF-8 text (byte 3 cannot be decoded)"),
        "bad json": ([tmp / "bad.jsonl"], "{t}/bad.jsonl line 2: not JSON"),
        "no text field": ([tmp / "notext.jsonl"], '{t}/notext.jsonl line 3: no string "text" field'),
        "text not a string": ([tmp / "numtext.jsonl"], '{t}/numtext.jsonl line 1: no string "text" field'),
        "too short": ([tmp / "short.txt"], "--data holds 10 tokens (1 document, an end-of-text token after each); "
                                          "--seq-len 64 needs at least 129"),
    }


@pytest.mark.parametrize("case", ["missing", "empty file", "no text", "not utf-8", "bad json", "no text field",
                                  "text not a string", "too short"])
def test_bad_data_is_one_line_before_any_model_loads(case, bundled_dir, tmp_path, monkeypatch):
    def no_run(*a, **kw):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(calibrate_run, "run", no_run)
    paths, msg = bad_data(tmp_path)[case]
    out = tmp_path / "out"
    args = [bundled_dir, "--out", out, *TINY]
    for p in paths:
        args += ["--data", p]
    line = one_line_error(invoke(args))
    assert line.startswith("error: " + msg.format(t=tmp_path)), line
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_directories_skip_hidden_empty_and_binary_files(data_dir, bundled_dir):
    c = calibrate_data.load([data_dir], bundled_dir, 64, 8192)
    assert [Path(f).name for f in c.files] == ["bisect.py", "colorsys.py", "keyword.py", "textwrap.py"]
    assert c.skipped == {"empty": 1, "binary": 1} and c.documents == 4
    # whole documents held out, about a tenth and at least one window; the split is seeded
    assert 65 <= len(c.heldout) < len(c.train) and not c.cut_document
    assert calibrate_data.load([data_dir], bundled_dir, 64, 8192).fingerprint() == c.fingerprint()
    # each step draws fresh windows from the training text
    g = torch.Generator().manual_seed(0)
    a, b = c.sample(g, 2), c.sample(g, 2)
    assert a.shape == (2, 64) and not torch.equal(a, b)
    assert all(w.shape == (1, 65) for w in c.windows())


def test_one_document_is_cut_to_hold_out_a_window(bundled_dir, tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"text": (STDLIB / "bisect.py").read_text()}) + "\n")
    c = calibrate_data.load([f], bundled_dir, 64, 8192)
    assert c.documents == 1 and c.cut_document
    assert len(c.heldout) >= 65 and len(c.train) >= 64


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, float):
        yield x


@pytest.fixture(scope="module")
def tiny_run(bundled_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "out"
    res = invoke([bundled_dir, "--data", data_dir, "--out", out, "--max-steps", "4", *TINY])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_a_tiny_run_writes_a_loadable_checkpoint_with_its_record(tiny_run, bundled_dir):
    out, output = tiny_run
    m = load_bsbr(out)
    assert m.cfg.chunk_size == 16 and (out / "tokenizer.json").is_file()
    assert not out.with_name("out.partial").exists()
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["source"]["original"] == str(bundled_dir.resolve()) and rec["source"]["kind"] == "hf"
    d = rec["data"]
    assert (d["files"], d["documents"], d["seq_len"], d["heldout_windows"]) == (4, 4, 64, 2)
    assert d["tokens_train"] > 0 and d["tokens_heldout"] >= 65
    [stage] = rec["stages"]
    assert stage["name"] == "attention transfer" and stage["loss"] == "weights transfer loss"
    assert stage["steps"] == 4 and [e["step"] for e in stage["evaluations"]] == [0, 1, 2, 3, 4]
    for key in ("before", "after"):
        assert set(rec["heldout"][key]) == {"top1", "kl_mean_nats", "ppl", "ppl_original"}
    nums = list(_numbers(rec))
    assert nums and all(math.isfinite(v) for v in nums)
    assert "stage 1 (attention transfer) step 4: train" in output and "ETA" in output
    with torch.no_grad():
        assert torch.isfinite(m(torch.arange(40)[None])).all()


def test_training_moves_the_conversion_and_the_heldout_loss_does_not_rise(tiny_run, bundled_dir):
    out, _ = tiny_run
    # No --feature-map nor --retrieval-weights: the conversion calibrated has the hedgehog map and
    # decay weights, which training moves too.
    start = convert(bundled_dir, chunk_size=16, feature_map="hedgehog", retrieval_weights="decay").state_dict()
    after = load_bsbr(out).state_dict()
    assert (load_bsbr(out).cfg.feature_map, load_bsbr(out).cfg.retrieval_weights) == ("hedgehog", "decay")
    moved = [k for k in after if not torch.equal(after[k], start[k])]
    assert moved and all(any(s in k for s in ("meta_q", "meta_k", "attn.g", "attn.fm.", "attn.decay"))
                         for k in moved), moved
    assert any("attn.fm." in k for k in moved)
    stage = json.loads((out / "calibration.json").read_text())["stages"][0]
    assert stage["best_heldout_loss"] < stage["initial_heldout_loss"]
    assert stage["best_heldout_loss"] == min(e["heldout"] for e in stage["evaluations"])


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_run, bundled_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [bundled_dir, "--data", data_dir, "--out", out, "--max-steps", "4", *TINY]
    real, calls = calibrate_data.Corpus.sample, []

    def sample(self, gen, batch=1, length=None):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during step 3: the checkpoint of step 2's evaluation stays
            raise KeyboardInterrupt
        return real(self, gen, batch, length)

    monkeypatch.setattr(calibrate_data.Corpus, "sample", sample)
    res = invoke(args)
    partial = tmp_path / "out.partial"
    assert res.exit_code == 130 and not out.exists() and (partial / CHECKPOINT).is_file()
    assert res.output.strip().splitlines()[-1] == (
        f"error: interrupted; the last checkpoint is in {partial}: run the same command again to resume")
    monkeypatch.setattr(calibrate_data.Corpus, "sample", real)

    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert f"resuming from {partial / CHECKPOINT}: stage 1 step 2" in res.output
    resumed = res.output[res.output.index("resuming"):]
    assert "step 1:" not in resumed and "step 3:" in resumed
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["resumed"] == 1 and rec["stages"][0]["steps"] == 4
    assert [e["step"] for e in rec["stages"][0]["evaluations"]] == [0, 1, 2, 3, 4]
    assert not partial.exists()
    # the parameters, Adam's state and the sampler's RNG came back: the same result as without a stop
    ref, got = load_bsbr(tiny_run[0]).state_dict(), load_bsbr(out).state_dict()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=0), k


def test_a_checkpoint_of_another_calibration_is_refused(bundled_dir, data_dir, tmp_path):
    plan = prepare(str(bundled_dir), [data_dir], tmp_path / "o", Settings(seq_len=64), options={"chunk_size": 16})
    other = prepare(str(bundled_dir), [data_dir], tmp_path / "o", Settings(seq_len=64), options={"chunk_size": 8})
    plan.work.mkdir()
    calibrate_run._save_checkpoint(plan.work, {"fingerprint": calibrate_run._fingerprint(plan)})
    assert calibrate_run.load_checkpoint(plan.work, calibrate_run._fingerprint(plan)) is not None
    with pytest.raises(calibrate_run.ConfigError, match="different calibration \\(config differ\\)"):
        calibrate_run.load_checkpoint(plan.work, calibrate_run._fingerprint(other))


def test_a_converted_model_needs_its_original(tiny_run, tiny_hf_dir, bundled_dir, data_dir, tmp_path):
    bare = save_bsbr(convert(tiny_hf_dir, chunk_size=16), tmp_path / "bare")
    line = one_line_error(invoke([bare, "--data", data_dir, "--out", tmp_path / "o"]))
    assert line == f"error: {bare} is a converted model that does not record its original GPT-2: pass --original " \
                   "(the HF GPT-2 it was converted from)"
    line = one_line_error(invoke([bare, "--data", data_dir, "--out", tmp_path / "o", "--original", bundled_dir]))
    assert "is not the model" in line and "vocab_size" in line
    # a calibrated output records its original, and takes no conversion options
    plan = prepare(str(tiny_run[0]), [data_dir], tmp_path / "o", Settings(seq_len=64))
    assert plan.kind == "bsbr" and plan.original == str(bundled_dir.resolve())
    line = one_line_error(invoke([tiny_run[0], "--data", data_dir, "--out", tmp_path / "o", "--chunk-size", "32"]))
    assert "already converted" in line
    line = one_line_error(invoke([bundled_dir, "--data", data_dir, "--out", tmp_path / "o", "--seq-len", "2048"]))
    assert line == "error: --seq-len 2048 is longer than the original's 1024 positions"
    assert not (tmp_path / "o").exists()


def test_help_explains_data_budget_and_resume():
    res = CliRunner().invoke(main, ["calibrate", "--help"])
    assert res.exit_code == 0
    for word in (".jsonl", "--minutes", "--max-steps", "Resume", "calibration.json", "--stage2", "--patience"):
        assert word in res.output, word


def test_the_main_command_exports_a_calibrated_model_as_it_is(tiny_run, bundled_dir, tmp_path):
    out, _ = tiny_run
    text = tmp_path / "eval.txt"
    text.write_text((STDLIB / "keyword.py").read_text())
    dest = tmp_path / "export"
    res = CliRunner().invoke(main, [str(out), "--out", str(dest), "--max-seq-len", "40", "--threads", "2",
                                    "--eval-text", str(text)])
    assert res.exit_code == 0, res.output
    assert "fidelity            converted vs original GPT-2" in res.output
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["original"] == str(bundled_dir.resolve()) and manifest["options"]["chunk_size"] == 16
    assert (dest / "bsbr" / "calibration.json").read_text() == (out / "calibration.json").read_text()
    got, want = load_bsbr(dest / "bsbr").state_dict(), load_bsbr(out).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    res = CliRunner().invoke(main, [str(out), "--out", str(tmp_path / "x"), "--chunk-size", "32"])
    assert res.exit_code == 1 and "already converted" in res.output.strip().splitlines()[-1]


def test_self_trains_on_text_sampled_from_the_original_and_resumes_without_sampling_again(
        bundled_dir, tmp_path, monkeypatch):
    out = tmp_path / "self"
    args = [bundled_dir, "--self", "--self-tokens", "256", "--out", out, "--max-steps", "3", *TINY]
    real, calls = calibrate_data.Corpus.sample, []

    def sample(self, gen, batch=1, length=None):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during step 2: the sampled documents stay beside the checkpoint
            raise KeyboardInterrupt
        return real(self, gen, batch, length)

    monkeypatch.setattr(calibrate_data.Corpus, "sample", sample)
    res = invoke(args)
    partial = tmp_path / "self.partial"
    assert res.exit_code == 130 and (partial / calibrate_run.SAMPLED).is_file(), res.output
    assert "sampling 7 documents of 64 tokens from the original (3 held out)" in res.output
    monkeypatch.setattr(calibrate_data.Corpus, "sample", real)
    sampled_ids = __import__("numpy").load(partial / calibrate_run.SAMPLED)
    assert sampled_ids.shape == (7, 63)

    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert "sampling" in res.output and "sampled 7/7" not in res.output  # read back, not sampled again
    assert "resuming from" in res.output and not partial.exists()
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["data"]["paths"][0].startswith("(sampled from the original: 7 documents of 64 tokens, seed 0)")
    assert rec["data"]["tokens_train"] == 256 and rec["data"]["tokens_heldout"] == 3 * 64
    assert rec["data"]["files"] == 0 and rec["stages"][0]["steps"] == 3
    assert math.isfinite(rec["heldout"]["after"]["kl_mean_nats"])
    load_bsbr(out)


@pytest.mark.parametrize("extra, msg", [
    (["--self", "--data", "README.md"], "give it or --data, not both"),
    ([], "no data: give --data PATH (your text) or --self"),
])
def test_self_and_data_are_one_or_the_other(bundled_dir, tmp_path, extra, msg):
    res = invoke([bundled_dir, "--out", tmp_path / "o", *TINY, *extra])
    assert msg in one_line_error(res) and not (tmp_path / "o").exists()


def test_the_main_command_calibrates_on_samples_of_the_original_before_the_export(tiny_hf_dir, tmp_path,
                                                                                   monkeypatch):
    # The budget counts the sampling too: few samples, so that a loaded machine still trains.
    monkeypatch.setattr(calibrate_run, "SELF_TOKENS", 2048)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(tiny_hf_dir), "--out", str(out), "--max-seq-len", "48", "--chunk-size", "16",
                                    "--calibrate", "self", "--calibrate-minutes", "0.3"])
    assert res.exit_code == 0, res.output
    assert "calibrating on text sampled from the original (budget 0.3 min)" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["calibration"]
    assert rec["data"]["paths"][0].startswith("(sampled from the original:") and rec["stages"][0]["steps"] >= 1
    assert json.loads((out / "bsbr" / "calibration.json").read_text()) == rec
    assert manifest["parity"]["onnx_fp32"]["passed"]  # the graphs are those of the calibrated model
    # No --feature-map given: the conversion calibrated is the hedgehog one, both stages ran.
    assert manifest["options"]["feature_map"] == "hedgehog" and rec["options"]["feature_map"] == "hedgehog"
    assert manifest["options"]["retrieval_weights"] == "decay"
    # The retrieval stops at the position table, so no long windows (they teach the retrieval beyond it).
    assert manifest["options"]["retrieval_until"] == 256 and rec["training"]["long_every"] == 0  # n_positions
    assert [s["stage"] for s in rec["stages"]] == [1, 2] and rec["training"]["lr"] == 1e-2
    assert any(line.startswith("  calibration ") and "samples of the original" in line
               for line in res.output.splitlines())
    assert not list(out.rglob("*.partial*")) and not (out / ".calibrate").exists()


def test_calibrate_self_needs_the_original_at_hand(tiny_hf_dir, tmp_path):
    conv = tmp_path / "conv"
    save_bsbr(convert(tiny_hf_dir, chunk_size=16), conv)  # records no original
    res = CliRunner().invoke(main, [str(conv), "--out", str(tmp_path / "o"), "--calibrate", "self"])
    assert "needs the original GPT-2" in one_line_error(res) and not (tmp_path / "o").exists()


def test_windows_the_conversion_computes_exactly_are_refused(bundled_dir, tmp_path):
    res = invoke([bundled_dir, "--self", "--seq-len", "64", "--out", tmp_path / "o"])  # chunk 128, look-back
    assert "lies within the 256 tokens the conversion computes exactly" in one_line_error(res)
    assert not (tmp_path / "o").exists()


def test_calibration_options_and_learning_rates(bundled_dir, tmp_path):
    """A calibrated conversion gets the hedgehog map and decay weights unless the user named them (or
    chose the plain retrieval); stage 1's learning rate follows the map unless given, stage 2 has its own."""
    def co(options):
        return calibrate_run.calibration_options(bundled_dir, options)

    hd = {"feature_map": "hedgehog", "retrieval_weights": "decay"}
    assert co({}) == hd
    assert co({"chunk_size": 64}) == {"chunk_size": 64, **hd}
    assert co({"feature_map": "elu1"}) == {**hd, "feature_map": "elu1"}
    assert co({"retrieval_weights": "gate"}) == {**hd, "retrieval_weights": "gate"}
    assert co({"retrieval_until": 4096}) == {**hd, "retrieval_until": 4096}
    assert co({"retrieval": "plain"}) == {"retrieval": "plain"}
    conv = tmp_path / "conv"  # an already converted model keeps what it was converted with
    save_bsbr(convert(bundled_dir, chunk_size=64), conv)
    assert calibrate_run.calibration_options(conv, {}) == {}
    s = Settings(self_tokens=4096)
    assert prepare(bundled_dir, (), tmp_path / "a", s, options=co({})).settings.lr == 1e-2
    assert prepare(bundled_dir, (), tmp_path / "b", s, options={"feature_map": "elu1"}).settings.lr == 1e-3
    given = prepare(bundled_dir, (), tmp_path / "c", Settings(self_tokens=4096, lr=5e-3, lr_kl=2e-4), options={})
    assert (given.settings.lr, given.settings.lr_kl) == (5e-3, 2e-4)
