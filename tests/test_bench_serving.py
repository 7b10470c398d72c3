"""The serving benchmark's report on a small synthetic result (no server runs), and where the
benchmark lives: beside the other benchmarks, never imported by the server package."""

from __future__ import annotations

import subprocess
import sys

from bsbr_export.bench.serving_report import TARGET_STREAMS, THRESHOLDS, targets, write_report


def _level(length, streams, mode, tokens_per_s, ttft=100.0, tpot=10.0):
    return {"prompt_tokens": length, "streams": streams, "mode": mode, "max_batch": streams if mode == "batched" else 1,
            "requests": streams, "tokens": 16 * streams, "failed": 0, "wall_s": 1.0, "tokens_per_s": tokens_per_s,
            "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft, "tpot_p50_ms": tpot, "tpot_p99_ms": 3 * tpot,
            "peak_rss_bytes": 2**28, "exit_code": 0}


def _result(levels):
    return {"command": "python scripts/bench_serve.py", "model": "synthetic", "machine": {}, "threads": 1,
            "new_tokens": 16, "requests_per_stream": 1, "max_seq_len": 512, "levels": levels, "long_prompt": [],
            "engine_costs": [], "memory": [], "note": "synthetic.", "seconds": 60.0}


def test_batching_target_judged_at_16_streams_with_latencies_reported(tmp_path):
    n = TARGET_STREAMS
    op, thr, unit = THRESHOLDS["continuous batching"]
    levels = [_level(128, 1, "batched", 10.0),
              _level(128, n, "batched", 50.0, ttft=180.0, tpot=20.0), _level(128, n, "one at a time", 10.0),
              _level(2048, n, "batched", 12.0), _level(2048, n, "one at a time", 10.0)]
    ts = {t["name"]: t for t in targets(_result(levels))}
    batching = ts["continuous batching"]
    assert batching["measured"] == 5.0 and (op, thr, unit) == (">=", 4.0, "x") and batching["status"] == "pass"
    assert f"{n} streams, 128-token prompts" in batching["description"]  # the shortest prompt: decode-bound
    assert [ts[k]["measured"] for k in ("TTFT p50", "TTFT p99", "inter-token latency p50",
                                        "inter-token latency p99")] == [180.0, 360.0, 20.0, 60.0]
    assert all(ts[k]["status"] == "reported" for k in ts if k != "continuous batching")
    levels[2] = _level(128, n, "one at a time", 25.0)
    assert {t["name"]: t for t in targets(_result(levels))}["continuous batching"]["status"] == "miss"  # 2.0x

    write_report(_result(levels), tmp_path)
    md = (tmp_path / "bench_serve.md").read_text()
    assert "(tokens/s ratio; target >= 4 at 16 streams)" in md
    section = md[md.index("### Targets"):]
    assert "| target | measured | required | result |" in section
    assert f"| tokens/s batched / one request at a time at {n} streams, 128-token prompts | 2.00x | >= 4.00x | miss |" \
        in section
    assert f"| TTFT p50, batched, at {n} streams, 128-token prompts | 180.0 ms | — | reported |" in section
    assert "n/a:" not in section


def test_batching_target_is_na_without_16_streams_or_baseline():
    ts = targets(_result([_level(128, 1, "batched", 10.0), _level(128, 4, "batched", 30.0),
                          _level(128, 4, "one at a time", 10.0)]))
    assert [t["status"] for t in ts] == ["n/a"] * 5 and all(t["measured"] is None for t in ts)
    ts = targets(_result([_level(128, TARGET_STREAMS, "batched", 30.0)]))
    assert ts[0]["status"] == "n/a" and ts[1]["status"] == "reported"
    assert targets(_result([]))[0]["status"] == "n/a"


def test_the_server_package_carries_no_load_generator():
    code = ("import sys, bsbr_export.serve, bsbr_export.serve.app; "
            "print(sorted(m for m in sys.modules if m.startswith('bsbr_export.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
