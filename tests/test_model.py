"""The converted GPT-2: exactness within one chunk, causality, padding, decode, generation."""

import numpy as np
import pytest
import torch

from bsbr_export.convert import convert
from bsbr_export.generate import generate
from bsbr_export.runtime import TorchStepper
from conftest import assert_close, assert_decode_matches


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return convert(tiny_hf_dir, chunk_size=24)


@pytest.fixture(scope="module")
def bundled(bundled_dir):
    return convert(bundled_dir, chunk_size=128)


def padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize("which", ["tiny", "bundled"])
@pytest.mark.parametrize("lengths", [[24], [24, 7, 1]])
def test_exact_within_one_chunk(which, lengths, request):
    hf = request.getfixturevalue(f"{which}_hf")
    model = request.getfixturevalue(which)
    L = model.cfg.chunk_size
    lengths = [min(n, L) if which == "tiny" else (L if n == 24 else n * 5) for n in lengths]
    ids, mask = padded_batch(lengths, model.cfg.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
    for i, n in enumerate(lengths):
        assert_close(out[i, :n], ref[i, :n], 1e-4, f"{which} row {i} len {n}")


@pytest.mark.parametrize("T", [1, 23, 24, 25, 77, 192])
def test_model_reference_matches_vectorised(tiny, T):
    ids = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        assert_close(tiny(ids), tiny(ids, impl="reference"), 1e-5, f"T={T}")


def test_model_with_compression_reference_matches_vectorised(tiny_hf_dir):
    model = convert(tiny_hf_dir, chunk_size=20, compression=4)
    ids = torch.randint(0, 101, (1, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(ids), model(ids, impl="reference"), 1e-5, "compression 4")


@pytest.mark.parametrize("impl", ["vectorised", "reference"])
@pytest.mark.parametrize("t", [22, 23, 24, 47, 48, 50])
def test_model_is_causal(tiny, impl, t):
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 101, (1, 80), generator=g)
    ids2 = ids.clone()
    ids2[0, t + 1:] = torch.randint(0, 101, (80 - t - 1,), generator=g)
    with torch.no_grad():
        a, b = tiny(ids, impl=impl), tiny(ids2, impl=impl)
    assert (a[0, :t + 1] - b[0, :t + 1]).abs().max() <= 1e-6
    assert (a[0, t + 1:] - b[0, t + 1:]).abs().max() > 1e-4


def test_right_padding_changes_no_real_token(tiny):
    lengths = [70, 25, 1, 48]
    ids, mask = padded_batch(lengths, 101, seed=3)
    ids[mask == 0] = 7  # padding content must not matter
    with torch.no_grad():
        batch = tiny(ids, attention_mask=mask)
        for i, n in enumerate(lengths):
            single = tiny(ids[i:i + 1, :n])
            assert_close(batch[i, :n], single[0], 1e-5, f"row {i}")


def test_left_padding_is_refused(tiny):
    from bsbr_export.errors import InputError

    ids = torch.zeros(1, 5, dtype=torch.int64)
    with pytest.raises(InputError, match="right-padded"):
        tiny(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


@pytest.mark.parametrize("prompt", [1, 23, 24, 25, 48])
@pytest.mark.parametrize("compression", [None, 4])
def test_decode_matches_full_forward(tiny_hf_dir, prompt, compression):
    model = convert(tiny_hf_dir, chunk_size=24, compression=compression)
    ids = torch.randint(0, 101, (2, 100), generator=torch.Generator().manual_seed(prompt))
    assert_decode_matches(model, ids, prompt, 1e-5, 2e-5)


def test_greedy_generation_matches_hf(bundled, bundled_hf, heldout_ids):
    L = bundled.cfg.chunk_size
    prompt = torch.from_numpy(heldout_ids[1000:1000 + L - 32])[None]
    with torch.no_grad():
        ref = bundled_hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                  do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    ours = generate(TorchStepper(bundled, max_len=L), prompt.numpy(), 32)[0]
    assert ours.tolist() == ref.tolist()


def test_sampling_is_seeded(tiny):
    prompt = np.array([[1, 2, 3]])
    a = generate(TorchStepper(tiny, 64), prompt, 20, temperature=1.0, top_k=10, seed=5)
    b = generate(TorchStepper(tiny, 64), prompt, 20, temperature=1.0, top_k=10, seed=5)
    c = generate(TorchStepper(tiny, 64), prompt, 20, temperature=1.0, top_k=10, seed=6)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_stop_token_ends_generation(tiny):
    prompt = np.array([[1, 2, 3]])
    free = generate(TorchStepper(tiny, 64), prompt, 10)
    stop = int(free[0, 2])
    out = generate(TorchStepper(tiny, 64), prompt, 10, stop_token=stop)
    assert out.shape[1] == list(free[0]).index(stop) + 1


def test_positions_beyond_table_follow_policy(tiny):
    from bsbr_export.modeling import position_ids

    c = tiny.cfg  # n_positions 256, chunk 24
    p = position_ids(c, 0, 600)
    assert p[:256].tolist() == list(range(256))
    assert p.max() < 256 and p[300].item() == 256 - 24 + 300 % 24
    pc = position_ids(c.replace(position_policy="chunk"), 0, 100)
    assert pc.tolist() == [t % 24 for t in range(100)]
    ids = torch.randint(0, 101, (1, 600))
    with torch.no_grad():
        assert torch.isfinite(tiny(ids)).all()


FUSED_CHILD = r"""
import json, sys, torch
from bsbr_export.convert import convert
model = convert(sys.argv[1], chunk_size=24, retrieval=sys.argv[2], retrieval_scale=1.0)
ids = torch.randint(0, 101, (2, 53), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = model(ids, impl="fused"), model(ids)
from bsbr_export.ops.kernel import is_interpreted
print(json.dumps({"interpreted": is_interpreted(), "max_abs": (a - b).abs().max().item()}))
"""


@pytest.mark.parametrize("retrieval", ["plain", "normalised"])
def test_model_fused_kernel_under_interpreter(tiny_hf_dir, retrieval):
    """The model's fused path (Triton kernel, CPU interpreter here) matches the vectorised path,
    for the plain and the normalised op, over 53 tokens = 2 chunks of 24 and a partial one."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", FUSED_CHILD, str(tiny_hf_dir), retrieval], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["interpreted"] and out["max_abs"] <= 1e-4, out
