"""The logits processors of ``bsbr_export.runtime.sampling`` (numpy only, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export.errors import InputError
from bsbr_export.generate import sample as generate_sample
from bsbr_export.runtime import sampling
from bsbr_export.runtime.sampling import (
    SamplingOptions,
    choose,
    choose_rows,
    chosen_logprobs,
    filtered,
    penalise,
)
from bsbr_export.util import log_softmax


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


def test_a_tiny_temperature_is_greedy_not_nan():
    z = _logits()
    with np.errstate(invalid="raise", over="raise"):  # no NaN, no warning
        p = sampling.probabilities(z, SamplingOptions(temperature=1e-310))
    assert np.isfinite(p).all() and (p.argmax(-1) == z.argmax(-1)).all() and np.allclose(p.max(-1), 1)
    rng = np.random.default_rng(0)
    assert [sampling.draw(row, rng) for row in p] == z.argmax(-1).tolist()


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
    # chosen_logprobs takes its max, exponentials and sum in float32: float32 rounding, 1e-6.
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


# --------------------------------------------------------------------------- choose_rows: the batched path

V_GPT2 = 50257


def _gpt2_sized_logits(seed=12):
    """(5, 50257) float32 rows of growing magnitude (std 1 to 200): large logits included."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((5, V_GPT2)) * np.array([[1], [5], [20], [60], [200]])).astype(np.float32)


def test_batched_logprobs_match_float64_log_softmax_on_the_full_vocabulary():
    z = _gpt2_sized_logits()
    z[1, 7] = 3e4  # one far larger than the rest: a row whose token holds all the mass
    z[2, :100] = -3e4  # and some far below
    opts = [SamplingOptions(), SamplingOptions(temperature=0.8, top_k=50), SamplingOptions(),
            SamplingOptions(temperature=1.0, top_p=0.9), SamplingOptions()]
    got = choose_rows(z, opts, sampling.row_generators(3, 5), logprobs=True, top_logprobs=[5, 0, 3, 1, 5])
    ref = log_softmax(z)  # float64
    rows = np.arange(5)
    assert got.logprobs.dtype == np.float64
    np.testing.assert_allclose(got.logprobs, ref[rows, got.tokens], rtol=0, atol=1e-4)
    assert np.abs(got.logprobs - ref[rows, got.tokens]).max() < 1e-5  # in practice far inside the bound
    for i, k in enumerate([5, 0, 3, 1, 5]):
        if k == 0:
            assert got.top[i] is None
            continue
        want = np.argsort(-ref[i], kind="stable")[:k]
        assert list(got.top[i]) == want.tolist()  # most likely first
        np.testing.assert_allclose(list(got.top[i].values()), ref[i, want], rtol=0, atol=1e-4)
    # the greedy rows took the argmax; logsumexp alone agrees as well (1-D input, other dtypes)
    assert (got.tokens[[0, 2, 4]] == z[[0, 2, 4]].argmax(-1)).all()
    lse64 = np.log(np.exp(z.astype(np.float64) - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    np.testing.assert_allclose(sampling.logsumexp(z)[:, 0], lse64, rtol=0, atol=1e-4)
    np.testing.assert_allclose(sampling.logsumexp(z[3])[0], lse64[3], rtol=0, atol=1e-4)
    np.testing.assert_allclose(sampling.logsumexp(z.astype(np.float64))[:, 0], lse64, rtol=0, atol=1e-4)


def _old_choose(logits, opts, rngs, seen=None):
    """The per-row code ``choose`` had before the batched path (float64 distribution, one draw per row)."""
    if seen is not None and opts.repetition_penalty not in (None, 1):
        logits = np.stack([penalise(row, s, opts.repetition_penalty) for row, s in zip(logits, seen)])
    if opts.greedy:
        return logits.argmax(-1)
    z = filtered(np.asarray(logits, dtype=np.float64) / opts.temperature, opts.top_k, opts.top_p)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.array([sampling.draw(row, rng) for row, rng in zip(p, rngs)])


def _mixed_rows():
    """(options, seed, seen, logprobs, top_logprobs) per row: greedy, sampled, penalised, logprob rows."""
    rep = np.array([5, 17, 17, 4000])
    return [
        (SamplingOptions(), None, None, False, 0),  # greedy, nothing else: the batched argmax
        (SamplingOptions(temperature=0.9, top_k=40), 7, None, False, 0),
        (SamplingOptions(), None, None, True, 3),  # greedy with logprobs and top logprobs
        (SamplingOptions(temperature=1.0, top_p=0.9), 8, None, True, 0),
        (SamplingOptions(repetition_penalty=1.3), None, rep, True, 0),  # greedy with a penalty
        (SamplingOptions(temperature=0.7, top_k=20, repetition_penalty=1.2), 9, rep, False, 2),  # top implies logprob
        (SamplingOptions(temperature=0.9, top_k=40), 10, None, True, 0),  # same options as row 1, other seed
        (SamplingOptions(), None, None, False, 0),
    ]


def test_a_mixed_batch_gives_each_row_what_it_gives_alone():
    spec = _mixed_rows()
    opts, seeds, seen, lp, tops = map(list, zip(*spec))
    gens = lambda: [np.random.default_rng(s) if s is not None else None for s in seeds]
    batch_rngs, alone_rngs, old_rngs = gens(), gens(), gens()
    rng = np.random.default_rng(4)
    for step in range(3):  # several steps: each row's generator advances as in a generation
        z = (rng.standard_normal((8, V_GPT2)) * 4).astype(np.float32)
        z[:, 17] = z.max(-1) + 1  # the argmax, a token the penalised rows have seen
        batch = choose_rows(z, opts, batch_rngs, seen, logprobs=lp, top_logprobs=tops)
        for i in range(len(spec)):
            alone = choose_rows(z[i:i + 1], opts[i], [alone_rngs[i]], [seen[i]], logprobs=lp[i], top_logprobs=tops[i])
            assert batch.tokens[i] == alone.tokens[0], f"step {step} row {i}"
            assert batch.top[i] == alone.top[0], f"step {step} row {i}"
            if lp[i] or tops[i]:
                assert batch.logprobs[i] == alone.logprobs[0], f"step {step} row {i}"  # bit for bit
                assert batch.logprobs[i] == pytest.approx(log_softmax(z[i])[batch.tokens[i]], abs=1e-4)
            else:
                assert np.isnan(batch.logprobs[i]) and np.isnan(alone.logprobs[0])
            # and what the code before the batched path chose: the same draw for the same seed
            assert batch.tokens[i] == _old_choose(z[i:i + 1], opts[i], [old_rngs[i]], [seen[i]])[0], f"row {i}"
        assert (batch.tokens[[0, 2, 7]] == 17).all()
        assert batch.tokens[4] != 17  # the penalty moved the greedy choice off the seen token
        assert len(batch.top[2]) == 3 and next(iter(batch.top[2])) == 17 and len(batch.top[5]) == 2


def test_choose_draws_as_before_for_seeded_rows():
    """``choose`` (one options object for the batch) keeps the draws of the per-row code."""
    z = _logits(6, 300, seed=9)
    for opts in (SamplingOptions(temperature=0.8), SamplingOptions(temperature=1.3, top_k=12),
                 SamplingOptions(temperature=1.0, top_p=0.8, repetition_penalty=1.4)):
        seen = [np.arange(i, 40 * i + 1, 7) for i in range(6)]
        new = [choose(z, opts, sampling.row_generators(21, 6), seen) for _ in range(2)]
        old = _old_choose(z, opts, sampling.row_generators(21, 6), seen)
        assert (new[0] == old).all() and (new[1] == old).all()
        shared = np.random.default_rng(2)  # the legacy form: one generator drawn in row order
        assert (sampling.sample(z, opts.temperature, opts.top_k, np.random.default_rng(2), opts.top_p) ==
                _old_choose(z, SamplingOptions(opts.temperature, opts.top_k, opts.top_p), [shared] * 6)).all()


def test_log_sum_exp_only_for_the_rows_that_ask(monkeypatch):
    calls = []
    real = sampling.logsumexp
    monkeypatch.setattr(sampling, "logsumexp", lambda lg: calls.append(len(lg)) or real(lg))
    z = _logits(6, 300, seed=5)
    got = choose_rows(z, SamplingOptions())
    assert calls == [] and np.isnan(got.logprobs).all() and got.top == [None] * 6
    assert (got.tokens == z.argmax(-1)).all()
    got = choose_rows(z, SamplingOptions(), logprobs=[False, True, False, False, False, False],
                      top_logprobs=[0, 0, 0, 2, 0, 0])
    assert calls == [2]  # rows 1 and 3 only
    assert np.isnan(got.logprobs[[0, 2, 4, 5]]).all() and np.isfinite(got.logprobs[[1, 3]]).all()
    assert got.top[1] is None and len(got.top[3]) == 2


def test_choose_rows_rejects_mismatched_arguments():
    z = _logits(3, 20)
    with pytest.raises(InputError, match="generator"):
        choose_rows(z, [SamplingOptions(), SamplingOptions(temperature=1.0), SamplingOptions()], [None] * 3)
    with pytest.raises(InputError, match="opts"):
        choose_rows(z, [SamplingOptions()] * 2)
    with pytest.raises(InputError, match="logprobs"):
        choose_rows(z, SamplingOptions(), logprobs=[True])
    with pytest.raises(InputError, match="processed"):
        choose_rows(z, SamplingOptions(), processed=z[:2])
    # processed logits choose, the model's logits give the log-probability
    proc = z.copy()
    proc[:, 3] = 100.0
    got = choose_rows(z, SamplingOptions(), logprobs=True, processed=proc)
    assert (got.tokens == 3).all()
    np.testing.assert_allclose(got.logprobs, log_softmax(z)[:, 3], rtol=0, atol=1e-5)
