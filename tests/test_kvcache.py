"""GPT-2 with a KV cache in ONNX Runtime (``bsbr_export.kvcache``): the decode baseline of the benchmark.

The graph and its IOBinding decoder are checked step by step against HF ``GPT2LMHeadModel``
decoding with its own cache: logits of the prompt and of every generated token, and the cache
itself, at lengths that are not multiples of 128.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from bsbr_export.bench.spec import RANDOM_MODELS
from bsbr_export.kvcache import GRAPH_FILE, META_KEY, KVCacheDecoder, export_kvcache, kv_logits

from conftest import BUNDLED

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """The benchmark's tiny random GPT-2 with a position table long enough to cross 128 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kw = dict(RANDOM_MODELS["tiny-random"]) | dict(n_positions=192, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**kw)).eval()
    d = tmp_path_factory.mktemp("tiny_random")
    model.save_pretrained(d / "hf", safe_serialization=True)
    return model, export_kvcache(d / "hf", d / "kv")


def _greedy_against_hf(model, decoder: KVCacheDecoder, prompt: np.ndarray, steps: int) -> float:
    """Greedy decoding in both (each feeding back its own argmax, which must agree); returns the
    largest logit difference over the prompt and every step."""
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
    cache, ref = out.cache, out.logits.numpy()
    decoder.start(prompt.shape[0])
    got = decoder.step(prompt)
    assert got.shape == ref.shape
    worst = float(np.abs(got - ref).max())
    for _ in range(steps):
        tok = got[:, -1].argmax(-1)
        assert (tok == ref[:, -1].argmax(-1)).all()
        with torch.inference_mode():
            ref = model(input_ids=torch.from_numpy(tok[:, None]), cache=cache, use_cache=True).logits.numpy()
        got = decoder.step(tok[:, None])
        assert got.shape == ref.shape == (prompt.shape[0], 1, model.config.vocab_size)
        worst = max(worst, float(np.abs(got - ref).max()))
    assert decoder.length == prompt.shape[1] + steps == cache.get_seq_length()
    # The cache the graph carries is HF's cache.
    for i, (k, v) in enumerate(decoder.cache_arrays()):
        np.testing.assert_allclose(k, cache.layers[i].keys.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(v, cache.layers[i].values.numpy(), atol=ATOL, rtol=0)
    return worst


@pytest.mark.parametrize("prompt_len,steps,batch", [(37, 23, 1), (131, 21, 2)])
def test_tiny_random_matches_hf_cache(tiny_random, prompt_len, steps, batch):
    model, path = tiny_random
    dec = KVCacheDecoder(path, threads=1)
    prompt = np.random.default_rng(prompt_len).integers(0, model.config.vocab_size, (batch, prompt_len))
    err = _greedy_against_hf(model, dec, prompt, steps)
    print(f"tiny-random prompt {prompt_len} + {steps} steps, batch {batch}: max|diff| {err:.2e}")
    assert err <= ATOL
    assert dec.cache_bytes() == 2 * 2 * batch * (prompt_len + steps) * 64 * 4


def test_bundled_model_matches_hf_cache(tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(BUNDLED).eval()
    dec = KVCacheDecoder(export_kvcache(BUNDLED, tmp_path / "kv"), threads=1)
    text = np.load(BUNDLED / "heldout_ids.npy").astype(np.int64)
    err = _greedy_against_hf(model, dec, text[None, :150], steps=25)
    print(f"gpt2-pystdlib heldout prompt 150 + 25 steps: max|diff| {err:.2e}")
    assert err <= ATOL


def test_padded_batch_rows_equal_their_rows_alone(tiny_random):
    """attention_mask and position_ids as Optimum feeds them: a left-padded row gives the logits it
    gives alone, and HF agrees on the batch."""
    model, path = tiny_random
    rng = np.random.default_rng(3)
    short, long_ = rng.integers(0, 512, 19), rng.integers(0, 512, 26)
    pad = len(long_) - len(short)
    ids = np.stack([np.concatenate([np.zeros(pad, np.int64), short]), long_])
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    dec = KVCacheDecoder(path, threads=1)
    dec.start(2)
    got = dec.step(ids, mask, pos)
    nxt = got[:, -1].argmax(-1)[:, None]
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    got_next = dec.step(nxt, mask, pos[:, -1:] + 1)
    alone = KVCacheDecoder(path, threads=1)
    np.testing.assert_allclose(got[0, pad:], kv_logits(alone, short[None], len(short))[0], atol=ATOL, rtol=0)
    alone_next = alone.step(nxt[:1])
    np.testing.assert_allclose(got_next[0], alone_next[0], atol=ATOL, rtol=0)
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask[:, :-1]),
                    position_ids=torch.from_numpy(pos), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got[0, pad:], ref[0, pad:], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1], ref[1], atol=ATOL, rtol=0)
    # Without the mask the padded row attends to its pad tokens and its logits change.
    dec.start(2)
    unmasked = dec.step(ids, np.ones_like(ids), pos)
    assert np.abs(unmasked[0, pad:] - got[0, pad:]).max() > 1e-3


def test_export_layout(tiny_random):
    """Optimum's names and shapes; the weights in the one external-data file, not in the graph."""
    model, path = tiny_random
    m = onnx.load(str(path), load_external_data=False)
    L = model.config.n_layer
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:] == [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"weights.onnx.data"}
    # Every matrix lies in the weights file, once (the LM head is tied to wte); only small vectors stay inline.
    hf = {n.removeprefix("transformer."): p for n, p in model.named_parameters()}
    big = {n for n, p in hf.items() if p.dim() == 2}
    assert big <= {t.name for t in external} and len(big) == 2 + 4 * model.config.n_layer
    info = [{e.key: e.value for e in t.external_data} for t in external]
    stored = sum(int(i["length"]) for i in info)
    assert stored == 4 * sum(hf[t.name].numel() for t in external)
    assert (path.parent / "weights.onnx.data").stat().st_size == max(int(i["offset"]) + int(i["length"]) for i in info)
    assert path.stat().st_size < 64 * 1024 and path.name == GRAPH_FILE
    meta = json.loads({p.key: p.value for p in m.metadata_props}[META_KEY])
    assert meta["n_layer"] == L and meta["vocab_size"] == model.config.vocab_size
    assert not list(path.parent.glob(".export.*"))  # the temporary directory is gone


def test_filled_cache_decodes_like_hf(tiny_random):
    """A cache set from arrays (how the benchmark reaches long contexts) decodes as HF does with
    the same arrays in its DynamicCache."""
    from transformers import DynamicCache

    model, path = tiny_random
    c = model.config
    rng = np.random.default_rng(7)
    P, d = 141, c.n_embd // c.n_head
    pairs = [tuple(rng.standard_normal((1, c.n_head, P, d), dtype=np.float32) for _ in range(2))
             for _ in range(c.n_layer)]
    dec = KVCacheDecoder(path, threads=1)
    dec.fill(pairs)
    assert dec.length == P and dec.cache_bytes() == 2 * c.n_layer * P * c.n_embd * 4
    cache = DynamicCache(config=c)
    for i, (k, v) in enumerate(pairs):
        cache.update(torch.from_numpy(k.copy()), torch.from_numpy(v.copy()), i)
    tok = 5
    for _ in range(21):
        got = dec.step([[tok]])
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits.numpy()
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        tok = int(ref[0, -1].argmax())
    assert dec.length == P + 21
