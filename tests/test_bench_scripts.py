"""The decode-by-rows benchmark script's measuring children, on the bundled model (no timing is
judged here: the script's numbers come from its own runs, docs/results/decode-batch.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_decode_batch.py"


@pytest.fixture(scope="module")
def exports(bundled_dir, tmp_path_factory):
    from bsbr_export.convert import convert
    from bsbr_export.export import ExportSpec, export_onnx
    from bsbr_export.kvcache import GRAPH_FILE, export_kvcache

    d = tmp_path_factory.mktemp("bench_scripts")
    export_onnx(convert(bundled_dir, chunk_size=32), d / "bsbr", ExportSpec(max_seq_len=320))
    export_kvcache(bundled_dir, d / "kv")
    return d / "bsbr", d / "kv" / GRAPH_FILE


def _case(case: dict) -> dict:
    r = subprocess.run([sys.executable, str(SCRIPT), "--case", json.dumps(case)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["bsbr", "kv-ort"])
def test_decode_case_reports_every_number(exports, backend):
    """One case per backend: 33 steps across a chunk close (chunk 32) for 3 rows at context 40."""
    path = exports[0] if backend == "bsbr" else exports[1]
    r = _case({"backend": backend, "batch": 3, "context": 40, "path": str(path), "threads": 1, "steps": 33,
               "warmup": 1})
    assert r["median_ms"] > 0 and r["mean_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
    assert r["state_bytes_per_row"] > 0
    assert ("empty_cache_ms" in r) == (backend == "kv-ort")


def test_memory_case_and_report(exports, tmp_path):
    """The memory child holds 200 + 56 tokens per row; the report judges the 16-row target."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_decode_batch as bdb

    one = _case({"path": str(exports[0]), "rows": 1, "threads": 1})
    assert one["rss_gib"] > 0 and one["state_bytes_per_row"] > 0 and one["kv_cache_bytes_per_row"] > 0
    md = bdb.memory_markdown({1: one, 16: dict(one, rss_gib=one["rss_gib"] * 1.3)}, type("A", (), {"max_seq_len": 320}))
    assert "1.30x" in md and "MISSED" in md
    res = {"bsbr/1/256": {"median_ms": 10.0, "mean_ms": 10.0, "tokens_per_s": 100.0, "state_bytes_per_row": 1,
                          "peak_rss_gib": 1.0},
           "bsbr/16/256": {"median_ms": 19.0, "mean_ms": 19.0, "tokens_per_s": 842.0, "state_bytes_per_row": 1,
                           "peak_rss_gib": 1.0}}
    targets = {d: (v, cmp, thr) for d, v, cmp, thr in bdb.targets(res)}
    assert targets["@ 256: BSBR 16-row step / 1-row step"][0] == pytest.approx(1.9)
    assert targets["batch 1 @ 8192: KV-cache step / BSBR step"][0] is None  # not measured: n/a, not a pass
