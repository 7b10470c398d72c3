"""The command line: convert works offline on the bundled model, errors are one line."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from bsbr_export.cli import main
from bsbr_export.convert import load_bsbr


def test_convert_bundled_model(bundled_dir, tmp_path):
    out = tmp_path / "converted"
    res = CliRunner().invoke(main, ["convert", str(bundled_dir), "--out", str(out), "--chunk-size", "64"])
    assert res.exit_code == 0, res.output
    assert load_bsbr(out).cfg.chunk_size == 64
    assert (out / "tokenizer.json").is_file()
    # An existing output is refused without --force, replaced with it.
    res = CliRunner().invoke(main, ["convert", str(bundled_dir), "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output
    res = CliRunner().invoke(main, ["convert", str(bundled_dir), "--out", str(out), "--force"])
    assert res.exit_code == 0 and load_bsbr(out).cfg.chunk_size == 128


def test_bad_chunk_size_is_one_line(tiny_hf_dir, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--chunk-size", "0"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["error: chunk size must be a positive integer, got 0"]
    assert not (tmp_path / "x").exists()


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "convert" in res.stdout and "--engine" in res.stdout


def test_hub_name_without_hub_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["gpt2", "--engine", "fp16", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: 'gpt2' is not a local directory and cannot be fetched from the HuggingFace hub")
    assert "models/gpt2-pystdlib" in lines[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, near", [
    (["MODEL", "--engine", "onxx", "--out", "o"], "'onnx'"),
    (["MODEL", "--out", "o", "--local-window", "lookbak"], "'lookback'"),
    (["convert", "MODEL", "--out", "o", "--retrieval", "normalized"], "'normalised'"),
    (["serve", "DIR", "--precision", "fp61"], "'fp16'"),
    (["generate", "DIR", "p", "--backend", "onx"], "'onnx'"),
])
def test_mistyped_choice_suggests_the_nearest(args, near):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].endswith(f"did you mean {near}?"), res.output


def test_choice_far_from_every_option_gets_no_suggestion():
    res = CliRunner().invoke(main, ["MODEL", "--engine", "zzz", "--out", "o"])
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert "'zzz' is not one of 'onnx', 'fp32', 'fp16', 'int8'" in last and "did you mean" not in last


@pytest.mark.parametrize("args, msg", [
    (["--runs", "0"], "Invalid value for '--runs': 0 is not in the range x>=1."),
    (["--threads", "-1"], "Invalid value for '--threads': -1 is not in the range x>=0."),
    (["--chunk-size", "0"], "Invalid value for '--chunk-size': 0 is not in the range x>=1."),
    (["--profile-len", "0"], "Invalid value for '--profile-len': 0 is not in the range x>=1."),
    (["--lengths", "16,a"], "Invalid value for '--lengths': must be comma-separated integers, got '16,a'"),
    (["--lengths", "16,0"], "Invalid value for '--lengths': must be positive integers, got '16,0'"),
    (["--lengths", ","], "Invalid value for '--lengths': must be positive integers, got ','"),
    (["--decode-contexts", "0,16"], "Invalid value for '--decode-contexts': must be positive integers, got '0,16'"),
    (["--throughput", "8by256"], "Invalid value for '--throughput': must read BATCHxT, e.g. 8x256, got '8by256'"),
    (["--throughput", "0x256"], "Invalid value for '--throughput': batch and T must be positive, got '0x256'"),
])
def test_bench_bad_option_is_a_usage_error(args, msg, tmp_path, monkeypatch):
    import bsbr_export.bench as driver

    monkeypatch.setattr(driver, "run_bench", lambda *a, **kw: pytest.fail("bench ran"))
    res = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output, res.output


def test_bench_options_reach_the_spec_and_the_recorded_command(tmp_path, monkeypatch):
    import bsbr_export.bench as driver

    seen = {}

    def fake(spec, out, command=None, **kw):
        seen.update(spec=spec, command=command)
        return {"targets": [], "seconds": 0.0}

    monkeypatch.setattr(driver, "run_bench", fake)
    res = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path / "b"), "--lengths", "16, 32,",
                                    "--decode-contexts", "0", "--throughput", "2X24", "--runs", "3",
                                    "--threads", "2", "--chunk-size", "8", "--profile-len", "32"])
    assert res.exit_code == 0, res.output
    s = seen["spec"]
    assert (s.lengths, s.decode_contexts, s.throughput, s.runs, s.threads, s.chunk_size, s.profile_len) == (
        (16, 32), (), (2, 24), 3, 2, 8, 32)
    assert seen["command"] == (f"bsbr-export bench --quick --out {tmp_path / 'b'} --lengths 16,32 "
                               "--decode-contexts 0 --throughput 2x24 --runs 3 --threads 2 --chunk-size 8 "
                               "--profile-len 32")
    res = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path / "b"), "--decode-contexts", "16,48"])
    assert res.exit_code == 0 and seen["spec"].decode_contexts == (16, 48), res.output
