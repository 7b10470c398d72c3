"""Calibration trains only what the conversion added and moves the model towards the original."""

import pytest
import torch

from bsbr_export.calibrate import calibrate, distill_loss
from bsbr_export.convert import convert


@pytest.mark.parametrize("opts", [dict(retrieval="plain", retrieval_scale=0.0),
                                  dict(retrieval="normalised", feature_map="elu1", retrieval_scale=1.0)])
def test_calibration_reduces_kl_and_touches_only_conversion_params(tiny_hf_dir, tiny_hf, opts):
    model = convert(tiny_hf_dir, chunk_size=16, **opts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    wins = [torch.randint(0, 101, (1, 80), generator=g) for _ in range(4)]
    teacher = lambda x: tiny_hf(input_ids=x).logits  # noqa: E731

    def kl():
        with torch.no_grad():
            return sum(distill_loss(model(x), torch.log_softmax(teacher(x), -1)).item() for x in wins)

    k0 = kl()
    seen = []
    calibrate(model, teacher, wins, passes=3, lr=3e-3, after_pass=lambda k, m: seen.append(k))
    assert seen == [1, 2, 3]
    assert kl() < k0
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in after.items():
        changed = not torch.equal(v, before[k])
        assert changed == any(s in k for s in ("meta_q", "meta_k", "attn.g")), k
    if opts["retrieval"] == "normalised":
        assert all((b.attn.g > 0).all() for b in model.h)
    assert all(p.requires_grad for p in model.parameters())


def test_learning_rate_warms_up_linearly_per_group_and_across_calls(tiny_hf_dir, tiny_hf, monkeypatch):
    # lr * min(1, (step + 1) / warmup) for the weights, lr_g * the same for a normalised g; a log
    # handed back in continues the warm-up where the earlier call left it.
    model = convert(tiny_hf_dir, chunk_size=16, retrieval="normalised", feature_map="elu1", retrieval_scale=1.0)
    g = torch.Generator().manual_seed(0)
    wins = [torch.randint(0, 101, (1, 32), generator=g) for _ in range(3)]
    teacher = lambda x: tiny_hf(input_ids=x).logits  # noqa: E731
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **kw):
        seen.append([group["lr"] for group in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    log = calibrate(model, teacher, wins, passes=2, lr=1e-3, lr_g=0.05, warmup=10)
    assert log.steps == 6
    calibrate(model, teacher, wins, passes=2, lr=1e-3, lr_g=0.05, warmup=10, log=log)
    expected = [(1e-3 * min(1.0, s / 10), 0.05 * min(1.0, s / 10)) for s in range(1, 13)]
    assert len(seen) == 12 and all(got == pytest.approx(want, rel=1e-12) for got, want in zip(seen, expected)), seen
