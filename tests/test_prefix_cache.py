"""The prefix cache, n completions from one prefill and saved states (``runtime.prefix``), on
exports of the bundled model with chunk L = 16, so that prefixes of 1, L-1, L, L+1, 3L+5 and
4096 tokens are cheap: a request that starts from a cached state gives the same greedy tokens
and log-probabilities as a cold one, for both local windows, fp32 and int8."""

from __future__ import annotations

import numpy as np
import pytest

from bsbr_export.errors import InputError, ModelLoadError
from bsbr_export.runtime import load
from bsbr_export.runtime.prefix import PrefixCache, snapshot_points

from test_runtime_api import BUNDLED

L = 16
MAX = 4160
MIB = 2 ** 20


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from bsbr_export.convert import convert
    from bsbr_export.export import ExportSpec, export_onnx

    out = {}
    for window in ("chunk", "lookback"):
        d = tmp_path_factory.mktemp(f"prefix-{window}")
        model = convert(BUNDLED, chunk_size=L, local_window=window)  # look-back: the default conversion
        export_onnx(model, d, ExportSpec(max_seq_len=MAX))
        export_onnx(model, d, ExportSpec(max_seq_len=MAX, int8=True))
        if window == "chunk":
            export_onnx(model, d, ExportSpec(max_seq_len=MAX, fp16=True))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (BUNDLED / f).is_file():
                (d / f).write_bytes((BUNDLED / f).read_bytes())
        out[window] = d
    return out


# int8 graphs quantize activations per token (graph.Graph.qlinear), so a token's int8 product
# does not depend on the piece it came in. What differs between a prompt fed in other pieces is
# fp32 rounding (as in fp32 graphs, up to about 1e-6), and int8 rounding turns such a difference
# into a whole quantization step when a value lies at a rounding boundary: rare in a short prompt,
# measured up to 1.3e-3 in the decode steps after the 4096-token prompt (16 pieces against one).
INT8_LONG_ATOL = 5e-3
# The default conversion (look-back window) meets such a boundary already in a short prompt's next
# turn: measured 4.5e-3 (16 tokens; 6.2e-3 with gate weights), tokens equal.
INT8_LOOKBACK_ATOL = 1e-2
FP16_ATOL = 1e-3  # fp16 graphs: the rounding of a piece's fp16 sums (measured up to 1.1e-5)


def _same(a, b, what, atol=1e-5):
    assert a.tokens == b.tokens, f"{what}: tokens {a.tokens} != {b.tokens}"
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, err_msg=what)


def _one(rt, ids, new=6, **kw):
    return rt.generate([ids], max_new_tokens=new, return_details=True, **kw)[0]


@pytest.mark.parametrize("window,precision", [("chunk", "fp32"), ("lookback", "fp32"), ("chunk", "int8"),
                                              ("lookback", "int8"), ("chunk", "fp16")])
def test_cached_prefixes_equal_cold(exports, heldout_ids, window, precision):
    d = exports[window]
    cold = load(d, precision=precision, threads=2)
    rt = load(d, precision=precision, threads=2, prefix_cache=256 * MIB)
    extra = heldout_ids[5000:5007]
    for P in (1, L - 1, L, L + 1, 3 * L + 5, 4096):
        atol = (FP16_ATOL if precision == "fp16" else 1e-5 if precision != "int8" else
                INT8_LOOKBACK_ATOL if window == "lookback" else INT8_LONG_ATOL if P > 1000 else 1e-5)
        base = heldout_ids[:P]
        first = _one(rt, base)  # stores the prompt's state, then the generation's
        _same(first, _one(cold, base), f"{window} {precision} P={P} first", atol)
        before = rt.prompt_tokens_computed
        again = _one(rt, base)  # the whole prompt from the cache: nothing computed
        assert again.cached_tokens == P and rt.prompt_tokens_computed == before
        _same(again, first, f"P={P} repeated", atol)
        longer = np.concatenate([base, extra])
        got = _one(rt, longer)
        assert got.cached_tokens == P, (P, got.cached_tokens)
        _same(got, _one(cold, longer), f"{window} {precision} P={P} + 7", atol)
        # The next turn resends the reply: it starts from the end-of-generation state.
        turn = np.concatenate([base, first.tokens, extra])
        got = _one(rt, turn)
        assert got.cached_tokens == P + len(first.tokens) - 1, (P, got.cached_tokens)
        _same(got, _one(cold, turn), f"{window} {precision} P={P} next turn", atol)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cached_row_batched_with_cold_rows_equals_each_alone(exports, heldout_ids, precision):
    rt = load(exports["chunk"], precision=precision, threads=2, prefix_cache=64 * MIB)
    cold = load(exports["chunk"], precision=precision, threads=2)
    warm = heldout_ids[:3 * L + 5]
    _one(rt, warm)
    prompts = [np.concatenate([warm, heldout_ids[900:903]]), heldout_ids[2000:2000 + 2 * L + 3], heldout_ids[7:9]]
    batch = rt.generate(prompts, max_new_tokens=5, return_details=True)
    assert [c.cached_tokens for c in batch] == [3 * L + 5, 0, 0]
    for i, p in enumerate(prompts):
        _same(batch[i], _one(cold, p, new=5), f"row {i}")


def test_snapshots_of_a_long_prompt_share_their_chunks(exports, heldout_ids):
    rt = load(exports["chunk"], threads=2, prefix_cache=512 * MIB)
    ids = heldout_ids[:2000]
    _one(rt, ids, new=1)
    pts = snapshot_points(ids.size, L, rt.cache.interval)
    assert pts == sorted({512, 1024, 1536, *range(1488, 2000, L), 2000})
    find = lambda n: rt.cache.find(ids[:n], need_logits=False)  # noqa: E731
    for n, first in ((512, 0), (1024, 512), (1488, 1024), (1504, 1488), (1536, 1520), (2000, 1984)):
        snap = find(n)
        assert snap is not None and snap.position == n and snap.first == first // L
        held = snap.bank["state_bank_h"].shape[2] if snap.bank else 0
        # only the chunks its parent lacks, of those a bank keeps (the retrieval stops at the position table)
        kept = lambda t: min(t // L, rt.engine.capacity)  # noqa: E731
        assert rt.engine.capacity < 2000 // L and held == kept(n) - kept(first), (n, held)
    # a prompt sharing 1450 tokens starts from the 1024-token snapshot, one sharing 1900 from 1888
    for shared, cached in ((1450, 1024), (1900, 1888)):
        other = np.concatenate([ids[:shared], heldout_ids[9000:9010]])
        got = _one(rt, other, new=3)
        assert got.cached_tokens == cached
        _same(got, _one(load(exports["chunk"], threads=2), other, new=3), f"shared {shared}")


def test_eviction_under_a_small_budget_keeps_answers_right(exports, heldout_ids):
    probe = load(exports["chunk"], threads=2, prefix_cache=512 * MIB)
    _one(probe, heldout_ids[:40], new=2)
    one = probe.cache.bytes  # two snapshots of a 40-token prompt
    rt = load(exports["chunk"], threads=2, prefix_cache=int(one * 1.5))
    cold = load(exports["chunk"], threads=2)
    for k in range(6):
        p = heldout_ids[100 * k:100 * k + 40]
        _same(_one(rt, p, new=2), _one(cold, p, new=2), f"prompt {k}")
        assert rt.cache.bytes <= rt.cache.budget
    assert rt.cache.stats["evictions"] > 0
    # the most recent prompt is still there
    assert _one(rt, heldout_ids[500:540], new=2).cached_tokens == 40


def test_cache_options_are_checked(exports):
    with pytest.raises(InputError, match="prefix cache budget"):
        load(exports["chunk"], threads=2, prefix_cache=-1)
    rt = load(exports["chunk"], threads=2)
    assert isinstance(rt.cache, PrefixCache) and not rt.cache.enabled


def test_n_completions_prefill_once_and_equal_seeded_single_requests(exports, heldout_ids):
    rt = load(exports["chunk"], threads=2)
    p = heldout_ids[:3 * L + 5]
    before = rt.prompt_tokens_computed
    got = rt.generate([p], max_new_tokens=6, temperature=0.9, seed=11, n=3, return_details=True)
    assert rt.prompt_tokens_computed - before == p.size  # one prefill for the three choices
    assert [c.cached_tokens for c in got] == [0, p.size, p.size]
    for j, c in enumerate(got):
        alone = _one(rt, p, temperature=0.9, seed=11 + j)
        _same(c, alone, f"choice {j}")
    assert len({tuple(c.tokens) for c in got}) > 1  # the choices differ
    best = rt.generate([p], max_new_tokens=6, temperature=0.9, seed=11, n=1, best_of=3, return_details=True)
    assert best[0].tokens == max(got, key=lambda c: sum(c.logprobs)).tokens
    with pytest.raises(InputError, match="best_of"):
        rt.generate([p], n=3, best_of=2)
    with pytest.raises(InputError, match="n must be"):
        rt.generate([p], n=0)


def test_saved_state_continues_in_a_fresh_runtime(exports, heldout_ids, tmp_path):
    d = exports["lookback"]
    rt = load(d, threads=2)
    prompt, more = heldout_ids[:3 * L + 5], heldout_ids[3000:3009]
    whole = np.concatenate([prompt, more])
    path = rt.save_state(prompt, tmp_path / "conv.npz")
    fresh = load(d, threads=2)
    assert fresh.load_state(path) == prompt.size
    got = _one(fresh, whole)
    assert got.cached_tokens == prompt.size and fresh.prompt_tokens_computed == more.size
    _same(got, _one(rt, whole), "resumed")
    with pytest.raises(ModelLoadError, match="another export"):
        load(exports["chunk"], threads=2).load_state(path)
    (tmp_path / "junk.npz").write_bytes(b"not a state")
    with pytest.raises(ModelLoadError, match="not a bsbr-export state file"):
        fresh.load_state(tmp_path / "junk.npz")


def test_python_doc_examples_of_reusing_state_run_as_written(exports, tmp_path):
    import os
    import subprocess
    import sys

    from test_runtime_api import ROOT

    sec = (ROOT / "docs" / "python.md").read_text()
    sec = sec[sec.index("## Reusing a prompt's state"):]
    sec = sec[:sec.index("\n#", 5)]
    code = "\n".join(line[4:] for line in sec.splitlines() if line.startswith("    ") or not line.strip())
    env = {**os.environ, "BSBR_EXPORT_DIR": str(exports["chunk"])}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.split("\n")
    cached = int(next(line for line in lines if "came from the cache" in line).split()[0])
    assert cached > 0
    assert int([line for line in lines if line.strip()][-1]) > 0  # the loaded state's tokens were reused
