"""The server's prefix cache (``serve --prefix-cache``), n and best_of on /v1/completions, and
the cache's metrics, on the serving tests' export of the bundled model (L = 32)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
pytest.importorskip("openai", reason="the openai client is not installed (the test extra has it)")

from test_serve import MODEL, Running, export_dir  # noqa: E402,F401  (tests/ is on sys.path; export_dir is a fixture)


@pytest.fixture(scope="module")
def server(export_dir):  # noqa: F811
    s = Running(export_dir, max_batch=4, max_queue=16, prefill_chunk=64, prefix_cache=64 << 20)
    yield s
    s.stop()


def _ids(heldout_ids, a, n):
    return [int(x) for x in heldout_ids[a:a + n]]


def test_repeated_prompt_and_next_turn_come_from_the_cache(server, heldout_ids):
    c = server.client()
    prompt = _ids(heldout_ids, 0, 100)
    first = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    before = server.sched.prompt_tokens_computed
    again = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 100
    assert server.sched.prompt_tokens_computed == before  # nothing of the prompt computed
    assert again.choices[0].text == first.choices[0].text
    np.testing.assert_allclose(again.choices[0].logprobs.token_logprobs, first.choices[0].logprobs.token_logprobs,
                               atol=1e-5)
    # the next turn resends the reply: it starts where the generation ended
    gen = server.sched.tokenizer.encode(first.choices[0].text)
    turn = prompt + gen + _ids(heldout_ids, 700, 5)
    got = c.completions.create(model=MODEL, prompt=turn, max_tokens=4, temperature=0)
    assert got.usage.prompt_tokens_details.cached_tokens >= 100
    assert server.metric("bsbr_prefix_cache_hits") >= 2
    assert server.metric("bsbr_prefix_cache_bytes") > 0
    assert server.metric("bsbr_prefix_cache_budget") == 64 << 20


def test_a_cancelled_prefill_leaves_no_snapshot(server, heldout_ids, monkeypatch):
    sched = server.sched
    entries = len(sched.cache)
    prompt = np.asarray(heldout_ids[1000:1000 + 300], np.int64)
    from bsbr_export.serve.scheduler import GenRequest

    events = []
    req = GenRequest(ids=prompt, max_tokens=4, sink=events.append)
    real = sched.engine.extend

    def extend_then_cancel(*a, **kw):  # the client goes away after the prompt's first piece
        out = real(*a, **kw)
        req.cancel()
        return out

    monkeypatch.setattr(sched.engine, "extend", extend_then_cancel)
    sched.submit(req)
    import time

    end = time.monotonic() + 30
    while req.finish_reason is None and time.monotonic() < end:
        time.sleep(0.02)
    monkeypatch.undo()
    assert req.finish_reason == "cancelled"
    assert len(sched.cache) == entries
    assert sched.cache.find(prompt, need_logits=False) is None or \
        sched.cache.find(prompt, need_logits=False).position < 64  # nothing of this prompt was kept


def test_n_choices_prefill_once_and_equal_single_seeded_requests(server, heldout_ids):
    c = server.client()
    prompt = _ids(heldout_ids, 2000, 70)
    before = server.sched.prompt_tokens_computed
    many = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=7, n=3, logprobs=0)
    assert server.sched.prompt_tokens_computed - before == 70  # one prefill for three choices
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.usage.prompt_tokens == 70 and many.usage.completion_tokens == sum(
        len(ch.logprobs.tokens) for ch in many.choices)
    for j, ch in enumerate(many.choices):
        one = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=7 + j, logprobs=0)
        assert one.choices[0].text == ch.text, j
    best = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=7, n=1, best_of=3)
    top = max(many.choices, key=lambda ch: sum(ch.logprobs.token_logprobs))
    assert len(best.choices) == 1 and best.choices[0].text == top.text
    # streaming with n: each choice's chunks carry its index
    seen = {}
    for chunk in c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=7, n=3,
                                      stream=True):
        for ch in chunk.choices:
            seen[ch.index] = seen.get(ch.index, "") + ch.text
    assert [seen[j] for j in range(3)] == [ch.text for ch in many.choices]
