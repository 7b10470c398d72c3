"""Stage 2 on long windows (``calibrate --long-every``): the original's targets over a sliding
context, some steps and the held-out loss on windows longer than the original's positions, and
settings that cannot work refused in one line before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bsbr_export import calibrate_data
from bsbr_export.calibrate import sliding_logp
from bsbr_export.cli import main


def test_sliding_logp_is_the_original_over_sliding_contexts(tiny_hf):
    # window 64, advanced by 32: positions 0-63 from x[0:64], 64-95 from x[32:96], 96-127 from
    # x[64:128], 128-149 from x[86:150]; each one at least 32 tokens after its context starts.
    x = torch.randint(0, 101, (2, 150), generator=torch.Generator().manual_seed(0))

    def teacher(ids):
        return tiny_hf(input_ids=ids).logits

    got = sliding_logp(teacher, x, 64)
    assert got.shape == (2, 150, 101)

    def ref(lo, hi, a, b):
        return torch.log_softmax(teacher(x[:, lo:hi]).float(), -1)[:, a - lo:b - lo]

    want = torch.cat([ref(0, 64, 0, 64), ref(32, 96, 64, 96), ref(64, 128, 96, 128), ref(86, 150, 128, 150)], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # A sliding context is not the whole prefix: past the window, the targets differ from one long pass
    # (which the original could not even run past its positions).
    full = torch.log_softmax(teacher(x).float(), -1)
    torch.testing.assert_close(got[:, :64], full[:, :64], rtol=0, atol=1e-5)
    assert (got[:, 64:] - full[:, 64:]).abs().max() > 1e-3
    short = x[:, :40]  # within one window: one pass
    torch.testing.assert_close(sliding_logp(teacher, short, 64), full[:, :40], rtol=0, atol=1e-5)


def invoke(args):
    return CliRunner().invoke(main, ["calibrate", *map(str, args)])


TINY_SELF = ["--self", "--seq-len", "64", "--chunk-size", "16", "--heldout-windows", "2", "--eval-every", "2"]


def test_one_stage_2_step_in_n_trains_on_a_long_window(tiny_hf_dir, tmp_path, monkeypatch):
    real, lengths = calibrate_data.Corpus.sample, []

    def sample(self, gen, batch=1, length=None):
        x = real(self, gen, batch, length)
        lengths.append(x.shape[1])
        return x

    monkeypatch.setattr(calibrate_data.Corpus, "sample", sample)
    out = tmp_path / "o"
    # tiny_hf has 256 positions: 300-token windows take two sliding passes of the original.
    res = invoke([tiny_hf_dir, *TINY_SELF, "--self-tokens", "640", "--stage2", "--long-every", "2",
                  "--long-len", "300", "--max-steps", "4", "--heldout-windows", "5", "--out", out])
    assert res.exit_code == 0, res.output
    assert lengths == [64] * 4 + [64, 300, 64, 300], lengths  # stage 1, then stage 2
    assert "1 step in 2 on a window of 300 tokens; 1 held-out window of 300 tokens" in res.output
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["training"]["long_every"] == 2 and rec["training"]["long_len"] == 300
    assert [s["stage"] for s in rec["stages"]] == [1, 2]


@pytest.mark.parametrize("extra, msg", [
    (["--long-every", "2"], "--long-every trains stage 2 on long windows: add --stage2"),
    (["--stage2", "--long-every", "2", "--long-len", "64"], "--long-len above --seq-len 64, got 2 and 64"),
    (["--stage2", "--long-every", "2", "--long-len", "4096"], "long windows of 4096 tokens (--long-len) need at least that many training tokens, the data has 640"),
])
def test_long_windows_that_cannot_work_fail_in_one_line(tiny_hf_dir, tmp_path, extra, msg):
    res = invoke([tiny_hf_dir, *TINY_SELF, "--self-tokens", "640", "--out", tmp_path / "o", *extra])
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and msg in lines[0], res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_budget_spent_before_training_skips_the_stages(tiny_hf_dir, tmp_path):
    out = tmp_path / "o"
    res = invoke([tiny_hf_dir, *TINY_SELF, "--self-tokens", "640", "--stage2", "--minutes", "0.0001", "--out", out])
    assert res.exit_code == 0, res.output
    assert "is spent before training" in res.output and "stage 1: attention transfer, skipped: no budget left" \
        in res.output and "stage 2: KL distillation, skipped: no budget left" in res.output
    assert "no stage ran, 0 steps" in res.output
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["stages"] == [] and rec["heldout"]["after"] == rec["heldout"]["before"]
