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


def test_paired_decode_steps_every_case_and_judges_the_targets(exports):
    """decode_rows_paired: BSBR at 1 and 3 rows and at a longer context, the KV cache beside it
    (1 and 3 rows, empty, long) all stepped in the same rounds (across a chunk close, chunk 32); the
    targets table judges the paired steps (a synthetic set of times checks each comparison's side)."""
    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    import decode_rows_paired as drp

    r = drp.measure(str(exports[0]), 3, 40, 33, 1, 1, kv=str(exports[1]), long=200, reverse=True)
    cases = r["cases"]
    assert set(cases) == {("bsbr", 1, 40), ("bsbr", 3, 40), ("bsbr", 1, 200), ("kv", 1, 40), ("kv", 3, 40),
                          ("kv", 1, None), ("kv", 1, 200)}
    assert all(len(t) == 33 and (t > 0).all() for t in cases.values())
    assert r["one_median"] > 0 and r["ratio_median"] > 0
    ones = np.ones(5)
    fake = {"cases": {("bsbr", 1, 40): 10 * ones, ("bsbr", 3, 40): 25 * ones, ("bsbr", 1, 200): 10.2 * ones,
                      ("kv", 1, 40): 9 * ones, ("kv", 3, 40): 40 * ones, ("kv", 1, None): 9 * ones,
                      ("kv", 1, 200): 60 * ones}}
    got = {row[0].split(":")[0] + row[2]: (row[1], row[3]) for row in drp.targets(fake, 3, 40, 200)}
    assert all(row[4] == "" for row in drp.targets(fake, 3, 40, 200))  # no floor ran: no bound
    fake["cases"] |= {("floor", 1, 1): 8 * ones, ("floor", 3, 1): 15 * ones}
    bounds = [row[4] for row in drp.targets(fake, 3, 40, 200)]
    assert bounds == ["1.875", "0.889", "0.889", "2.667", "", "7.500"]
    fake["cases"][("kv", 1, 200)] = 30 * ones  # no decoder at the floor reaches 5x: out of reach
    assert drp.targets(fake, 3, 40, 200)[-1][4] == "3.750 (out of reach here)"
    assert got["3-row step / 1-row step @ 40<= 2.0"] == ("2.500", "MISSED")
    assert got["batch 1 @ 40<= 1.0"] == ("1.111", "MISSED")
    assert got["batch 1 @ 40<= 1.15"] == ("1.111", "met")
    assert got["3 rows @ 40>= 1.5"] == ("1.600", "met")
    assert got["batch 1<= 1.05"] == ("1.020", "met")
    assert got["batch 1 @ 200>= 5.0"] == ("5.882", "met")


def test_decode_profile_reads_the_state_bytes(exports, tmp_path):
    """decode_profile's op table averages the profiled runs (control flow left out) and counts the
    K/V window and S bytes the attention reads."""
    sys.path.insert(0, str(SCRIPT.parent))
    import decode_profile as dp
    from bsbr_export.runtime.engine import Engine

    runs = [{"op_types_ms": {"If": 9.0, "Gemm": 2.0, "MatMul": 1.0}}, {"op_types_ms": {"If": 9.0, "Gemm": 4.0}}]
    assert dp.mean_ops(runs) == {"Gemm": 3.0, "MatMul": 0.5}
    sp = Engine(str(exports[0]), threads=1).spec
    # The engine's own per-token profile (``Engine(profile=)``): node times at 1 and 3 rows.
    prof = dp.profile_engine(str(exports[0]), 3, 40, 3, 1, 1, str(tmp_path / "p"))
    assert prof["spec"] == sp and all(prof[B].get("Gemm", 0) > 0 and "If" not in prof[B] for B in (1, 3))
    one = sp.layer * (2 * sp.head * sp.window * sp.head_dim + sp.head * sp.state_dim * sp.state_cols) * 4
    assert dp.state_read_bytes(sp, 1) == one and dp.state_read_bytes(sp, 4) == 4 * one


def test_in_fresh_process_runs_elsewhere_and_returns():
    """bench.jobs.in_fresh_process: the function runs in another process and its result comes back."""
    import os

    from bsbr_export.bench.jobs import in_fresh_process

    assert in_fresh_process(os.getpid) != os.getpid()
    assert in_fresh_process(divmod, 17, 5) == (3, 2)
    from bsbr_export.bench.jobs import in_both_orders

    assert in_both_orders(sorted, [3, 1, 2]) == [[1, 2, 3], [3, 2, 1]]  # reverse=False, then True


def test_extend_pieces_reports_both_routes(exports):
    """bench_extend_pieces: a held row takes pieces; a short piece in a small state goes by
    per-token steps, a longer one (or one in a larger state) through the graph, and every time is
    measured; the route switch is restored after the graph column."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_extend_pieces as bep

    from bsbr_export.runtime import engine as eng_mod

    rows = bep.measure(str(exports[0]), [40], [1, 5], [1, 16], 1, 1)
    routes = {(r["rows"], r["piece"]): r["route"] for r in rows}
    assert routes == {(1, 1): "per-token steps", (1, 5): "extend graph", (16, 1): "per-token steps",
                      (16, 5): "extend graph"}
    assert all(r[k] > 0 for r in rows for k in ("extend_ms", "graph_ms", "step_ms"))
    assert eng_mod.STEP_PIECES == 3
