"""The logits processors of ``bsbr_export.runtime.sampling`` (numpy only, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export.errors import InputError
from bsbr_export.generate import sample as generate_sample
from bsbr_export.runtime import sampling
from bsbr_export.runtime.sampling import SamplingOptions, choose, chosen_logprobs, filtered, log_softmax, penalise


def _logits(rows=4, vocab=50, seed=0):
    return np.random.default_rng(seed).normal(0, 2, (rows, vocab)).astype(np.float32)


@pytest.mark.parametrize("kw, what", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_options_one_line(kw, what):
    with pytest.raises(InputError) as e:
        SamplingOptions(**kw)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_generate_shares_the_sampling_code():
    assert generate_sample is sampling.sample  # one copy, not two


def test_greedy_is_argmax():
    z = _logits()
    assert (choose(z, SamplingOptions()) == z.argmax(-1)).all()
    assert (generate_sample(z) == z.argmax(-1)).all()


def test_top_k_and_top_p_keep_the_expected_sets():
    z = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda k=None, p=None: np.flatnonzero(np.isfinite(filtered(z, k, p)[0])).tolist()
    assert keep(k=2) == [0, 1]
    assert keep(p=0.5) == [0]  # the most likely token alone reaches 0.5
    assert keep(p=0.7) == [0, 1]
    assert keep(p=0.81) == [0, 1, 2]
    assert keep(p=1.0) == [0, 1, 2, 3]
    assert keep(p=0.01) == [0]  # the most likely token always stays


def test_filters_match_transformers():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    z = _logits(8, 300, seed=1)
    for p in (0.3, 0.9):
        ref = tf.TopPLogitsWarper(p)(None, torch.from_numpy(z.astype(np.float64))).numpy()
        assert (np.isfinite(filtered(z.astype(np.float64), None, p)) == np.isfinite(ref)).all()
    ref = tf.TopKLogitsWarper(7)(None, torch.from_numpy(z)).numpy()
    assert (np.isfinite(filtered(z, 7, None)) == np.isfinite(ref)).all()
    ids = np.array([[3, 5, 5, 299]] * 8)
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), torch.from_numpy(z.copy())).numpy()
    ours = np.stack([penalise(row, s, 1.3) for row, s in zip(z, ids)])
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_sampled_tokens_stay_in_the_kept_set_and_follow_the_distribution():
    z = _logits(1, 20, seed=2)
    opts = SamplingOptions(temperature=0.7, top_k=5)
    rng = np.random.default_rng(0)
    draws = np.array([choose(z, opts, [rng])[0] for _ in range(4000)])
    kept = set(np.argsort(-z[0])[:5].tolist())
    assert set(draws.tolist()) <= kept
    p = sampling.probabilities(z, opts)[0]
    freq = np.bincount(draws, minlength=20) / len(draws)
    assert np.abs(freq - p).max() < 0.03


def test_one_generator_per_row_makes_a_row_independent_of_the_batch():
    z = _logits(3, 40, seed=3)
    opts = SamplingOptions(temperature=1.0, top_p=0.9)
    batch = choose(z, opts, sampling.row_generators(11, 3))
    for i in range(3):
        alone = choose(z[i:i + 1], opts, sampling.row_generators(11, 1))
        assert alone[0] == batch[i]
    seeds = sampling.row_generators([1, None, 2], 3)
    assert len(seeds) == 3
    with pytest.raises(InputError):
        sampling.row_generators([1, 2], 3)
    with pytest.raises(InputError):
        sampling.row_generators(-1, 1)


def test_legacy_sample_is_seeded():
    z = _logits()
    a = generate_sample(z, 1.0, 10, np.random.default_rng(5))
    b = generate_sample(z, 1.0, 10, np.random.default_rng(5))
    assert (a == b).all()


def test_logprobs_are_log_softmax_at_the_token():
    z = _logits()
    tok = np.array([0, 5, 9, 49])
    ref = z.astype(np.float64) - np.log(np.exp(z.astype(np.float64)).sum(-1, keepdims=True))
    # chosen_logprobs takes its exponentials in float32 (summed in float64): float32 rounding, 1e-6.
    np.testing.assert_allclose(chosen_logprobs(z, tok), ref[np.arange(4), tok], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.exp(log_softmax(z)).sum(-1), 1.0, rtol=1e-12)


def test_chosen_logprobs_match_float64_on_the_full_vocabulary():
    """The float32 log-sum-exp path against float64 log_softmax on GPT-2-sized rows, large logits included."""
    rng = np.random.default_rng(12)
    z = (rng.standard_normal((5, 50257)) * np.array([[1], [5], [20], [60], [200]])).astype(np.float32)
    tok = np.concatenate([z.argmax(-1)[:3], rng.integers(0, 50257, 2)])
    np.testing.assert_allclose(chosen_logprobs(z, tok), log_softmax(z)[np.arange(5), tok], rtol=1e-6, atol=1e-4)


def test_repetition_penalty_changes_greedy_choice():
    z = np.array([[2.0, 1.9, -1.0]], dtype=np.float32)
    opts = SamplingOptions(repetition_penalty=2.0)
    assert choose(z, opts, seen=[np.array([0])])[0] == 1  # 2.0 / 2 < 1.9
    assert choose(z, opts, seen=[np.array([], dtype=np.int64)])[0] == 0
    assert penalise(z[0], np.array([2]), 2.0)[2] == -2.0  # negative logits are multiplied
