"""The main command's fidelity line: the converted model against the original GPT-2 (both torch).

Its figures come from ``bsbr_export.fidelity.agreement``, the per-window metrics and summary
behind table 2 of docs/RESULTS.md (scripts/study_fidelity.py). The main-command run is the
bundled model's int8 run shared with test_int8.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bsbr_export import fidelity as F
from bsbr_export.convert import convert, planned_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def studylib():
    sys.path.insert(0, str(ROOT / "scripts"))
    import studylib as S

    return S


def test_main_command_prints_the_fidelity_line(bundled_int8_run):
    output, out = bundled_int8_run
    lines = output.splitlines()
    parity = next(ln for ln in lines if ln.startswith("  parity onnx_fp32 "))
    assert "pass: ONNX vs converted torch, " in parity and "min top-1 100.0%" in parity
    fid = next(ln for ln in lines if ln.startswith("  fidelity "))
    assert lines.index(fid) > lines.index(parity)  # after the parity lines
    f = json.loads((out / "manifest.json").read_text())["fidelity"]
    assert f["windows"] == F.WINDOWS == 4 and f["tokens_per_window"] == 1024 and f["text"] == "heldout_ids.npy"
    assert fid.strip() == (f"fidelity            converted vs original GPT-2 (torch): top-1 agreement "
                           f"{f['top1']:.1%}, mean KL {f['kl_mean_nats']:.3f} nats (4 windows of 1024 tokens, "
                           f"heldout_ids.npy)")
    # The conversion changes the model: far from the graphs' 100% against the converted model.
    assert 0.6 < f["top1"] < 0.95 and 0.01 < f["kl_mean_nats"] < 0.5
    assert "fidelity" in json.loads((out / "manifest.json").read_text())["stages"]


def test_main_command_figures_are_table_two_figures(bundled_int8_run, bundled_dir, heldout_ids, studylib):
    """The manifest's figures equal a direct call of the function table 2 uses, on the same
    windows, and the study's own path (``studylib.evaluate``) gives them too."""
    S = studylib
    assert S.window_metrics is F.window_metrics and S.summarise is F.summarise and S.windows is F.windows
    f = json.loads((bundled_int8_run[1] / "manifest.json").read_text())["fidelity"]
    hf, _ = F.load_original(bundled_dir)
    model = convert(bundled_dir)  # the main command's default conversion: table 2's "normalised" row
    assert model.cfg.retrieval == S.VARIANTS["normalised"]["retrieval"]
    wins = F.windows(heldout_ids, 1024, F.WINDOWS)
    direct = F.agreement(hf, model, wins)
    study, _ = S.evaluate(S.Reference(hf, wins), model)
    for s in (direct, study):
        assert s["top1"][0] == pytest.approx(f["top1"], rel=1e-9, abs=1e-12)
        assert s["kl"][0] == pytest.approx(f["kl_mean_nats"], rel=1e-9)
        assert s["top1"][1] == pytest.approx(f["top1_std"], rel=1e-9, abs=1e-12)


def test_plan_reads_the_first_tokens_of_a_text(bundled_dir, tmp_path):
    from bsbr_export.runtime import Tokenizer

    cfg, d = planned_config(bundled_dir)
    text = "".join((ROOT / "bsbr_export" / n).read_text() for n in ("fidelity.py", "metrics.py"))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    p = F.plan(cfg, d, path, heldout=np.arange(5000))  # the text wins over held-out ids
    ids = Tokenizer.from_dir(bundled_dir).encode(text)
    assert len(ids) > 1025 and p["ids"].tolist() == ids[:1025]
    assert (p["windows"], p["tokens"], p["source"]) == (1, 1024, str(path))
    assert [w.shape for w in F.windows(p["ids"], p["tokens"], p["windows"])] == [(1, 1025)]


def test_plan_skips_without_text_and_says_how_to_get_it(tiny_hf_dir):
    cfg, d = planned_config(tiny_hf_dir)
    p = F.plan(cfg, d)
    assert "--eval-text FILE" in p["skipped"]
    assert F.summary_line(p).startswith("skipped: the model ships no heldout_ids.npy; pass --eval-text FILE")


def test_plan_skips_without_the_memory_for_both_models(bundled_dir, heldout_ids, monkeypatch):
    from bsbr_export import check

    cfg, d = planned_config(bundled_dir)
    assert "ids" in F.plan(cfg, d, heldout=heldout_ids)
    monkeypatch.setattr(check, "available_bytes", lambda: F.peak_bytes(cfg) - 1)
    p = F.plan(cfg, d, heldout=heldout_ids)
    assert p["skipped"].startswith("the original GPT-2 beside the conversion needs about ")
    short = F.plan(cfg, d, heldout=heldout_ids[:200])  # fewer than two chunks
    assert short["skipped"].startswith("the model has 200 held-out tokens only; pass --eval-text FILE")
