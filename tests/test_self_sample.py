"""Windows sampled from the original GPT-2 itself (calibration data without the user's text)."""

import pytest
import torch

from bsbr_export.errors import ConfigError
from bsbr_export.self_sample import sample_windows


def test_sampling_is_seeded_and_in_the_vocabulary(tiny_hf):
    a = sample_windows(tiny_hf, 5, 12, batch=2, seed=3)
    assert a.shape == (5, 12) and a.dtype.kind == "i"
    assert a.min() >= 0 and a.max() < tiny_hf.config.vocab_size
    assert (sample_windows(tiny_hf, 5, 12, batch=2, seed=3) == a).all()
    assert (sample_windows(tiny_hf, 5, 12, batch=2, seed=4) != a).any()


def test_a_tiny_nucleus_is_greedy_and_the_cache_agrees_with_a_full_forward(tiny_hf):
    # top_p -> 0 keeps only the most likely token: each row must be the greedy continuation of BOS,
    # which a forward over the whole prefix (no KV cache) recomputes token by token.
    got = sample_windows(tiny_hf, 2, 10, batch=2, seed=0, top_p=1e-9)
    x = torch.zeros(1, 1, dtype=torch.long)  # BOS = 0 in the tiny model
    with torch.no_grad():
        for _ in range(10):
            nxt = tiny_hf(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], 1)
    assert (got == x[0, 1:].numpy()).all()


def test_progress_reports_each_batch(tiny_hf):
    lines = []
    sample_windows(tiny_hf, 3, 4, batch=2, progress=lines.append)
    assert len(lines) == 2 and lines[-1].startswith("sampled 3/3 windows of 4 tokens")


@pytest.mark.parametrize("kw, msg", [(dict(seq_len=256), "positions"), (dict(top_p=0.0), "top_p"),
                                     (dict(n_windows=0), "n_windows")])
def test_bad_arguments_fail_in_one_line(tiny_hf, kw, msg):
    args = dict(n_windows=2, seq_len=8) | kw
    with pytest.raises(ConfigError, match=msg) as e:
        sample_windows(tiny_hf, **args)
    assert "\n" not in str(e.value)
