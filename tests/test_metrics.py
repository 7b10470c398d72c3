"""Each study metric on a case small enough to compute by hand."""

import math

import pytest
import torch

from bsbr_export import metrics as M


def test_cosine_hand_case():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    # orthogonal: 0; parallel: 1; opposite: -1
    assert M.cosine(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0])


def test_mse_hand_case():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 4.0], [3.0, -1.0]])
    # (0 + 4) / 2 = 2; (9 + 1) / 2 = 5
    assert M.mse(a, b).tolist() == pytest.approx([2.0, 5.0])


def test_kl_hand_case():
    # P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    p_logits = torch.log(torch.tensor([0.5, 0.5]))
    q_logits = torch.log(torch.tensor([0.25, 0.75])) + 7.0  # a shift of the logits changes nothing
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_next_token(p_logits, q_logits).item() == pytest.approx(want, rel=1e-6)
    assert M.kl_next_token(p_logits, p_logits).item() == pytest.approx(0.0, abs=1e-15)


def test_topk_agreement_hand_case():
    ref = torch.tensor([[0.0, 5.0, 1.0, 2.0],  # original top-1: token 1
                        [9.0, 0.0, 1.0, 2.0]])  # original top-1: token 0
    out = torch.tensor([[0.0, 3.0, 4.0, 1.0],  # converted ranks 2 > 1 > 3 > 0: token 1 is 2nd
                        [0.0, 3.0, 4.0, 5.0]])  # token 0 is last (4th)
    assert M.topk_agreement(ref, out, 1).tolist() == [0.0, 0.0]
    assert M.topk_agreement(ref, out, 2).tolist() == [1.0, 0.0]
    assert M.topk_agreement(ref, out, 4).tolist() == [1.0, 1.0]
    assert M.topk_agreement(ref, ref, 1).tolist() == [1.0, 1.0]


def test_nll_and_perplexity_hand_case():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    targets = torch.tensor([0, 1])
    n = M.nll(logits, targets)
    assert n.tolist() == pytest.approx([math.log(2), -math.log(0.8)])
    # exp(mean(ln 2, ln 1.25)) = sqrt(2 * 1.25)
    assert M.perplexity(n) == pytest.approx(math.sqrt(2.5))
    assert M.perplexity([n[:1], n[1:]]) == pytest.approx(math.sqrt(2.5))
    # uniform over V tokens: perplexity V
    assert M.perplexity(M.nll(torch.zeros(5, 7), torch.arange(5))) == pytest.approx(7.0)


def test_mean_std_hand_case():
    assert M.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert M.mean_std([4.0]) == (4.0, 0.0)


def test_attention_density_hand_case():
    # T = 5, L = 2: chunks of 2, 2, 1 -> 3 + 3 + 1 = 7 of 15 causal pairs
    assert M.local_pairs(5, 2) == 7
    assert M.attention_density(5, 2) == pytest.approx(7 / 15)
    assert M.attention_density(4, 8) == 1.0  # one chunk: everything
    assert M.attention_density(5, None) == 1.0
    assert M.retrieval_pairs(5, 2) == 3  # chunk 1 sees 0; chunk 2 sees 0, 1


def test_rouge_hand_case():
    ref = "the cat sat on the mat".split()
    cand = "the cat lay on the mat".split()
    # unigrams: 5 of 6 shared both ways -> F1 5/6; bigrams: (the cat) (on the) (the mat) = 3 of 5
    assert M.rouge_n(ref, cand, 1) == pytest.approx(5 / 6)
    assert M.rouge_n(ref, cand, 2) == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5 -> F1 5/6
    assert M.rouge_l(ref, cand) == pytest.approx(5 / 6)
    assert M.rouge_n(ref, ["dog"], 1) == 0.0 and M.rouge_l([], cand) == 0.0
    # clipping: a repeated candidate word counts once per reference occurrence
    assert M.rouge_n(["a", "b"], ["a", "a"], 1) == pytest.approx(0.5)
