"""The benchmark's CI smoke test: ``bsbr-export bench --quick`` in a temp dir, then its JSON schema.

Every case must carry a median and a peak memory, or an explicit skip / parity-failed reason.
"""

import json
import math
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from bsbr_export.bench import BACKENDS, DECODE_BACKENDS, SCHEMA, THRESHOLDS, loglog_slope, schedule, BenchSpec
from bsbr_export.cli import main


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_bench_schema(tmp_path, monkeypatch):
    from test_no_stray_writes import changed, snapshot

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    before = snapshot()
    res = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out), "--fragment", str(out / "fragment.md")])
    assert res.exit_code == 0, res.output
    assert changed(before, snapshot()) == []  # the run wrote under --out (and where --fragment said) only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    # What it prints: no target lines (the smoke run judges none), no profile op that reads 0 ms.
    lines = res.output.splitlines()
    assert not [x for x in lines if x.startswith("  -  ") or "(need " in x], res.output[-3000:]
    assert lines[-1].startswith("quick run: targets not judged")
    tops = [x.split("top ops (ms): ")[1] for x in lines if x.startswith("  profile ") and "top ops (ms): " in x]
    assert tops and all(not op.endswith((" 0", " 0.00")) for top in tops for op in top.split(", ")), tops
    r = json.loads((out / "bench.json").read_text())
    assert r["schema"] == SCHEMA and r["complete"] is True and r["quick"] is True
    for key in ("command", "date", "machine", "versions", "model", "spec", "backends", "prefill", "decode",
                "scaling", "speedups", "vs_floor", "targets", "profiles", "seconds"):
        assert key in r, key
    assert r["machine"]["cores"] >= 1 and isinstance(r["machine"]["cpu"], str)
    assert set(r["backends"]) == set(BACKENDS)
    for b, info in r["backends"].items():
        assert info["parity"]["status"] in ("pass", "FAILED", "none", "skipped"), b
        if info["parity"]["status"] in ("pass", "FAILED"):
            assert _num(info["parity"]["max_abs"]) and info["parity"]["reference"]
        else:
            assert info["parity"]["reason"], b
    # Every (backend, batch, T) case: timed with median and peak memory, or an explicit reason.
    plan = {(1, T) for T in r["spec"]["lengths"]} | {tuple(r["spec"]["throughput"])}
    seen = {(c["backend"], c["batch"], c["seq"]) for c in r["prefill"]}
    assert seen == {(b, bt, T) for b in BACKENDS for bt, T in plan}
    for c in r["prefill"]:
        assert c["status"] in ("ok", "skipped", "parity_failed", "failed")
        if c["status"] == "ok":
            assert _num(c["median_ms"]) and c["median_ms"] > 0 and c["runs"] == len(c["times_ms"]) >= 1
            assert isinstance(c["peak_rss_bytes"], int) and c["peak_rss_bytes"] > 0
            assert _num(c["tokens_per_s"])
        else:
            assert isinstance(c["reason"], str) and c["reason"]
            assert "median_ms" not in c  # no speed for a skipped or red backend
    timed = {c["backend"] for c in r["prefill"] if c["status"] == "ok"}
    assert {"hf-torch", "hf-ort", "bsbr-torch", "bsbr-ort", "floor-ort"} <= timed
    # The HF model exported by torch.onnx (dynamo) passed its gate against HF torch before it was timed.
    hf_ort = r["backends"]["hf-ort"]["parity"]
    assert hf_ort["status"] == "pass" and hf_ort["max_abs"] <= 1e-4 and "HF GPT-2" in hf_ort["reference"]
    assert r["backends"]["floor-ort"]["parity"]["status"] == "none"
    # Decode: every backend at every context, with per-token latency and state bytes.
    assert {(c["backend"], c["context"]) for c in r["decode"]} == {
        (b, cx) for b in DECODE_BACKENDS for cx in r["spec"]["decode_contexts"]}
    for c in r["decode"]:
        assert c["status"] == "ok", c
        assert _num(c["per_token_mean_ms"]) and _num(c["per_token_median_ms"]) and c["state_bytes"] > 0
    kv = {c["context"]: c["state_bytes"] for c in r["decode"] if c["backend"] == "hf-torch"}
    assert kv[48] == 3 * kv[16]  # a KV cache grows with every token
    # GPT-2 + KV cache in ORT: gated by its own parity (prompt, then one token per step, against HF),
    # the same cache bytes as HF's, and its per-token dense work measured for the targets' bound.
    kv_ort = [c for c in r["decode"] if c["backend"] == "kv-ort"]
    assert len(kv_ort) == len(r["spec"]["decode_contexts"]) >= 2
    assert all(c["parity"]["status"] == "pass" and c["parity"]["max_abs"] <= 1e-4 for c in kv_ort)
    assert {c["context"]: c["state_bytes"] for c in kv_ort} == kv
    assert all(_num(c["dense_per_token_ms"]) and c["dense_per_token_ms"] > 0 for c in kv_ort)
    for c in r["decode"]:
        if c["backend"].startswith("bsbr"):
            assert sum(c["state_parts"].values()) == c["state_bytes"]
    for t in r["targets"]:
        assert t["status"] in ("pass", "miss", "n/a") and t["comparison"] in ("<=", ">=") and _num(t["threshold"])
        assert t["measured"] is None or _num(t["measured"])
    assert len(r["targets"]) == len(THRESHOLDS)
    # The prefill targets: BSBR ORT over the HF export at the (nearest measured) short lengths (timed in
    # pairs where the run has them, else this run's medians: below), over the dense floor at every length,
    # and the floor against every CPU backend, from this run's medians.
    pre = {t["name"]: t for t in r["targets"] if t["name"].startswith(("prefill vs", "dense floor (", "floor is"))}
    assert len(pre) == 5 and all(t["measured"] is not None for t in pre.values())
    med = {(c["backend"], c["seq"]): c["median_ms"] for c in r["prefill"] if c["status"] == "ok" and c["batch"] == 1}
    assert math.isclose(pre["prefill vs HF export (T=128)"]["measured"],
                        med["bsbr-ort", T_last := max(r["spec"]["lengths"])] / med["hf-ort", T_last])
    assert math.isclose(pre["dense floor (every T)"]["measured"],
                        max(med["bsbr-ort", T] / med["floor-ort", T] for T in r["spec"]["lengths"]))
    assert math.isclose(pre["floor is the floor"]["measured"],
                        max(med["floor-ort", T] / v for (b, T), v in med.items()
                            if b != "floor-ort" and "int8" not in b))  # the fp32 floor: int8 is not held to it
    kv_targets = {t["name"]: t for t in r["targets"] if t["name"].startswith("kv-cache")}
    assert set(kv_targets) == {"kv-cache decode (short)", "kv-cache decode (long)", "kv-cache state"}
    ctx = r["spec"]["decode_contexts"]
    assert all(t["measured"] is not None and str(ctx[-1]) in t["description"] for n, t in kv_targets.items()
               if n != "kv-cache decode (short)")
    mean = {(c["backend"], c["context"]): c["per_token_mean_ms"] for c in r["decode"]}
    assert math.isclose(kv_targets["kv-cache decode (long)"]["measured"],
                        mean["kv-ort", ctx[-1]] / mean["bsbr-ort", ctx[-1]])
    assert math.isclose(kv_targets["kv-cache decode (short)"]["measured"],
                        mean["bsbr-ort", ctx[0]] / mean["kv-ort", ctx[0]])
    bsbr_state = {c["context"]: c["state_bytes"] for c in r["decode"] if c["backend"] == "bsbr-ort"}
    assert math.isclose(kv_targets["kv-cache state"]["measured"], bsbr_state[ctx[-1]] / kv[ctx[-1]])
    assert all(_num(kv_targets[n]["bound_if_attention_free"]) for n in ("kv-cache decode (short)",
                                                                         "kv-cache decode (long)"))
    # The loaded runtime (its sessions over one shared copy of the weights) against one prefill session.
    mem = r["runtime_memory"]
    assert mem["runtime"] > 0 and mem["prefill-session"] > 0 and _num(mem["ratio"])
    assert all(_num(s["exponent"]) for s in r["scaling"].values()) and "bsbr-ort" in r["scaling"]
    assert r["profiles"]["bsbr-ort"]["status"] == "ok" and r["profiles"]["bsbr-ort"]["op_types_ms"]
    # The shortest length timed in pairs; the prefill targets against the HF export read its ratio.
    (T, pair), = r["paired"]["lengths"].items()
    assert int(T) == min(r["spec"]["lengths"]) and pair["bsbr-ort"] > 0 and pair["hf-ort"] > 0
    # Pooled from two children that made the two sessions in opposite orders (5 rounds each when quick).
    assert pair["runs"] == 10 == len(pair["bsbr-ort_ms"]) == len(pair["hf-ort_ms"])
    assert math.isclose(pair["ratio"], float(np.median(np.array(pair["bsbr-ort_ms"]) / np.array(pair["hf-ort_ms"]))))
    short = [t for t in r["targets"] if t["name"].startswith("prefill vs HF export") and f"T={T}," in t["description"]]
    assert short and all(math.isclose(t["measured"], pair["ratio"]) for t in short)
    # Markdown, fragment and plots.
    md = (out / "bench.md").read_text()
    assert "### Targets" in md and "Parity gate" in md
    assert "GPT-2 + KV cache, ORT (IOBinding) ms/token" in md and "BSBR state / KV cache" in md
    frag = (out / "fragment.md").read_text()
    assert frag.startswith("## Benchmark") and "- command: `bsbr-export bench --quick" in frag
    assert "- machine:" in frag and "- versions:" in frag and "- date:" in frag
    for png in ("latency.png", "speedup.png", "memory.png", "decode.png"):
        assert (out / png).stat().st_size > 1000 and f"{png})" in frag


def test_bench_writes_no_fragment_unless_asked(tmp_path, monkeypatch):
    import bsbr_export.bench as driver

    seen = {}

    def fake(spec, out, fragment=None, **kw):
        seen["fragment"] = fragment
        return {"targets": [], "seconds": 0.0}

    monkeypatch.setattr(driver, "run_bench", fake)
    res = CliRunner().invoke(main, ["bench", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert seen["fragment"] is None and "; fragment" not in res.output


def test_slope_and_schedule():
    p, r2 = loglog_slope([1024, 2048, 4096, 8192], [3.0 * t ** 1.5 for t in (1024, 2048, 4096, 8192)])
    assert abs(p - 1.5) < 1e-9 and r2 > 0.999
    full = BenchSpec()
    assert all(schedule(1, t, full)["runs"] >= 5 for t in (128, 1024, 8192))
    assert schedule(1, 8192, full)["warmup_seq"] < 8192 and schedule(1, 128, full)["warmup_seq"] == 128


def test_recorded_command_names_repository_paths_from_its_root(tmp_path):
    from pathlib import Path

    from bsbr_export.cli import repo_relative

    root = Path(__file__).resolve().parents[1]
    assert repo_relative(root / "docs" / "bench" / "x", root) == Path("docs/bench/x")
    assert repo_relative(tmp_path / "w", root) == tmp_path / "w"  # outside: unchanged
    assert repo_relative(Path("rel/out"), root) == Path("rel/out")
    assert repo_relative("gpt2-small-random", root) == "gpt2-small-random"
