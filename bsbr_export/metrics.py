"""Metrics of the conversion study: how far a converted model is from its original.

Every function takes tensors of matching shape, the *reference* (original model)
first, and returns per-position values (a tensor over the leading dimensions) so a
caller can average per window, per chunk index or per position inside a chunk.
Definitions (written in docs/RESULTS.md too):

- cosine similarity of hidden states, per position: ``a.b / (|a| |b|)``;
- MSE of hidden states, per position: ``mean_i (a_i - b_i)^2`` over the hidden dims;
- KL of next-token distributions, per position, in nats:
  ``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` with ``P = softmax(original logits)``,
  ``Q = softmax(converted logits)``;
- top-k agreement, per position: 1 if the original's top-1 token is among the
  converted model's k highest logits, else 0 (k = 1: both pick the same token);
- perplexity over a set of predictions: ``exp(mean NLL)``, NLL = ``-log softmax(logits)[target]``;
  the change of one model's perplexity against another's on the same windows comes with a
  paired percentile bootstrap interval over windows (``perplexity_change``).
- attention density: the fraction of the causal query-key pairs ``T (T + 1) / 2`` that the
  local softmax of a chunked model actually scores.
- ROUGE-N / ROUGE-L: F1 of clipped n-gram overlap / of the longest common subsequence
  between a reference and a candidate token list.
"""

from __future__ import annotations

import math

import torch

from .util import kl_from_logprobs


def cosine(ref: torch.Tensor, out: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity over the last dim: (..., E) x (..., E) -> (...)."""
    ref, out = ref.double(), out.double()
    num = (ref * out).sum(-1)
    den = ref.norm(dim=-1) * out.norm(dim=-1)
    return num / den.clamp_min(eps)


def mse(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the last dim: (..., E) x (..., E) -> (...)."""
    return ((ref.double() - out.double()) ** 2).mean(-1)


def kl_next_token(ref_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_out) of next-token distributions in nats: (..., V) x (..., V) -> (...)."""
    return kl_from_logprobs(torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(out_logits.double(), -1))


def topk_agreement(ref_logits: torch.Tensor, out_logits: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where the reference's top-1 token is among the converted model's top-k, else 0.0:
    (..., V) x (..., V) -> (...)."""
    top1 = ref_logits.argmax(-1, keepdim=True)  # (..., 1)
    topk = out_logits.topk(k, dim=-1).indices  # (..., k)
    return (topk == top1).any(-1).double()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target: (..., V) x (...) -> (...), in nats."""
    lp = torch.log_softmax(logits.double(), -1)
    return -lp.gather(-1, targets[..., None].long())[..., 0]


def perplexity(nlls) -> float:
    """exp(mean NLL) over all predictions given (a tensor, or a list of tensors)."""
    if isinstance(nlls, (list, tuple)):
        nlls = torch.cat([torch.as_tensor(x).double().flatten() for x in nlls])
    return math.exp(torch.as_tensor(nlls).double().mean().item())


def perplexity_change(nll_ref, nll_new, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """``ppl(new) / ppl(ref) - 1`` over the same windows, with a bootstrap interval over windows.

    ``nll_ref``, ``nll_new``: one tensor of per-token NLLs per window, window i of both scoring
    the same tokens. Each of ``n_boot`` resamples draws the windows with replacement (the same
    draw for both models: paired), and the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled changes. Returns change, lo, hi (fractions,
    0.01 = +1%), windows, level, n_boot.
    """
    if len(nll_ref) != len(nll_new) or not nll_ref:
        raise ValueError(f"need the same, non-zero number of windows, got {len(nll_ref)} and {len(nll_new)}")
    ref = [torch.as_tensor(x).double().flatten() for x in nll_ref]
    new = [torch.as_tensor(x).double().flatten() for x in nll_new]
    if any(a.numel() != b.numel() or a.numel() == 0 for a, b in zip(ref, new)):
        raise ValueError("window i of both models must score the same, non-zero number of tokens")
    sum_ref, sum_new = torch.stack([a.sum() for a in ref]), torch.stack([b.sum() for b in new])  # (n,)
    count = torch.tensor([a.numel() for a in ref], dtype=torch.float64)  # (n,)
    n = len(ref)
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))  # (n_boot, n)
    tokens = count[idx].sum(1)
    changes = torch.exp((sum_new[idx].sum(1) - sum_ref[idx].sum(1)) / tokens) - 1.0  # (n_boot,)
    lo, hi = torch.quantile(changes, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    change = math.exp((sum_new.sum() - sum_ref.sum()).item() / count.sum().item()) - 1.0
    return {"change": change, "lo": lo.item(), "hi": hi.item(), "windows": n, "level": level, "n_boot": n_boot}


def format_change(c: dict) -> str:
    """``+1.2% [-0.3, +2.8]`` (the interval at ``c["level"]``). A bound that would print as 0.0
    but is not zero gets the digits that show its sign (``[-1.0, -0.03]``): whether an interval
    excludes zero is what a reader looks for."""
    def bound(x: float) -> str:
        for digits in (1, 2, 3):
            s = f"{100 * x:+.{digits}f}"
            if float(s) != 0 or x == 0:
                return s
        return s
    return f"{100 * c['change']:+.1f}% [{bound(c['lo'])}, {bound(c['hi'])}]"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    return x.mean().item(), (x.std().item() if x.numel() > 1 else 0.0)


def local_pairs(T: int, L: int) -> int:
    """Query-key pairs the local softmax scores: sum over chunks of n (n + 1) / 2."""
    full, rest = divmod(T, L)
    return full * L * (L + 1) // 2 + rest * (rest + 1) // 2


def attention_density(T: int, L: int | None) -> float:
    """Fraction of the causal pairs T (T + 1) / 2 scored token-to-token (L None: full attention, 1.0)."""
    causal = T * (T + 1) // 2
    return 1.0 if L is None else local_pairs(T, L) / causal


def retrieval_pairs(T: int, L: int) -> int:
    """Query-chunk pairs of the retrieval: chunk i scores the i earlier meta keys, C (C - 1) / 2."""
    C = -(-T // L)
    return C * (C - 1) // 2


def _ngrams(tokens: list, n: int) -> dict:
    out: dict = {}
    for i in range(len(tokens) - n + 1):
        g = tuple(tokens[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def rouge_n(reference: list, candidate: list, n: int) -> float:
    """ROUGE-N F1: clipped n-gram overlap; precision over the candidate's n-grams, recall over
    the reference's; 0 when either side has none."""
    r, c = _ngrams(reference, n), _ngrams(candidate, n)
    overlap = sum(min(v, c.get(g, 0)) for g, v in r.items())
    if not overlap:
        return 0.0
    p, rec = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


def rouge_l(reference: list, candidate: list) -> float:
    """ROUGE-L F1: longest common subsequence length over candidate (precision) and reference (recall)."""
    if not reference or not candidate:
        return 0.0
    prev = [0] * (len(candidate) + 1)
    for x in reference:
        cur = [0]
        for j, y in enumerate(candidate):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, rec = lcs / len(candidate), lcs / len(reference)
    return 2 * p * rec / (p + rec)
