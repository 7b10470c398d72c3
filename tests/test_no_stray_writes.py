"""Commands write only where they are told: the main command, ``export``, ``serve`` (and
``bench --quick``, in tests/test_bench.py), each run from a temporary working directory with its output there, leave
every file of the repository (which holds the package itself, installed in place) as it was."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bsbr_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def snapshot(root: Path = ROOT) -> dict:
    """{relative path: (size, mtime)} of every file under ``root`` but caches and git's own."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP and not x.endswith(".egg-info")]
        for f in files:
            p = Path(d) / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    yield tmp_path
    assert changed(before, snapshot()) == [], "a command wrote into the repository"


def test_snapshot_sees_a_write(tmp_path):
    before = snapshot()
    probe = ROOT / "tests" / f".probe-{os.getpid()}"
    probe.write_text("x")
    try:
        assert changed(before, snapshot()) == [str(probe.relative_to(ROOT))]
    finally:
        probe.unlink()


def test_main_command_writes_under_out_only(in_tmp, bundled_dir):
    res = CliRunner().invoke(main, [str(bundled_dir), "--engine", "onnx", "--out", "out", "--max-seq-len", "140",
                                    "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "out" / "model.onnx").is_file()
    leftovers = sorted(p.name for p in in_tmp.iterdir() if p.name not in ("out", ".out.lock"))
    assert leftovers == []


def test_export_writes_under_out_only(in_tmp, bundled_dir):
    res = CliRunner().invoke(main, ["export", str(bundled_dir), "--out", "exp", "--max-seq-len", "140"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in in_tmp.iterdir() if not p.name.startswith(".")) == ["exp"]


def test_serve_writes_nothing(in_tmp, bundled_dir):
    import httpx

    res = CliRunner().invoke(main, ["export", str(bundled_dir), "--out", "exp", "--max-seq-len", "140"])
    assert res.exit_code == 0, res.output
    before = {p: p.stat().st_mtime_ns for p in in_tmp.rglob("*")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bsbr_export.cli", "serve", "exp", "--port", str(port),
                             "--threads", "1", "--max-batch", "2", "--drain", "5"], cwd=in_tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < end, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "exp", "prompt": "def f(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert {p: p.stat().st_mtime_ns for p in in_tmp.rglob("*")} == before  # not even in its export


# bench --quick: tests/test_bench.py::test_quick_bench_schema runs it under the same check.
