"""Shared fixtures: a tiny random GPT-2 on disk and the bundled pretrained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "gpt2-pystdlib"


def assert_close(actual, expected, atol, name="", rtol=0.0):
    """One comparison helper: prints the measured error so logs show the margin."""
    err = (actual.double() - expected.double()).abs().max().item()
    print(f"[assert_close] {name}: max|diff| = {err:.3e} (atol {atol:.1e})")
    assert err <= atol + rtol * expected.abs().max().item(), f"{name}: max|diff| {err:.3e} > {atol:.1e}"
    return err


def rand_ids(T, seed, B=2, vocab=101):
    """Random token ids (B, T) of the tiny models, seeded."""
    import torch

    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_causal_at(model, t: int, n: int, name: str = "", vocab: int = 101):
    """Changing the tokens after position t changes no logit up to t (and does change later ones),
    in the vectorised and the reference implementation."""
    import torch

    g = torch.Generator().manual_seed(t)
    ids = rand_ids(n, t, B=1, vocab=vocab)
    ids2 = ids.clone()
    ids2[0, t + 1:] = torch.randint(0, vocab, (n - t - 1,), generator=g)
    for impl in ("vectorised", "reference"):
        with torch.no_grad():
            a, b = model(ids, impl=impl), model(ids2, impl=impl)
        assert (a[0, :t + 1] - b[0, :t + 1]).abs().max() <= 1e-6, (name, impl)
        assert (a[0, t + 1:] - b[0, t + 1:]).abs().max() > 1e-4, (name, impl)


def assert_decode_matches(model, ids, prompt: int, tol_prefill: float, tol_decode: float, name: str = ""):
    """Torch: prefill ``prompt`` tokens, then one token at a time to the end; every position's
    logits equal the full forward's. Returns the decode state."""
    import torch

    with torch.no_grad():
        full = model(ids)
        logits, st = model.prefill(ids[:, :prompt], max_len=ids.shape[1])
        assert_close(logits, full[:, :prompt], tol_prefill, f"{name} prefill")
        for t in range(prompt, ids.shape[1]):
            assert_close(model.decode_step(ids[:, t], st), full[:, t], tol_decode, f"{name} decode t={t}")
    return st


def assert_ort_decode_matches(full, onnx_dir, ids, prompt: int, tol: float = 1e-4, name: str = ""):
    """ONNX Runtime (ORTStepper: extend, decode and close graphs): prefill ``prompt`` tokens of
    ``ids`` (numpy), then teacher-forced decode of the rest, against ``full`` (the torch logits)."""
    import torch

    from bsbr_export.runtime import ORTStepper

    full = torch.as_tensor(full)
    st = ORTStepper(onnx_dir, max_len=ids.shape[1])
    assert_close(torch.from_numpy(st.prefill(ids[:, :prompt])), full[:, prompt - 1], tol, f"{name} prefill")
    for t in range(prompt, ids.shape[1]):
        assert_close(torch.from_numpy(st.decode(ids[:, t])), full[:, t], tol, f"{name} t={t}")


def export_each(models: dict, keys, factory, prefix: str, max_len: int) -> dict:
    """Each model of ``keys`` exported (fp32, ``max_len``) to a directory of its own: key ->
    (model, directory)."""
    from bsbr_export.export import ExportSpec, export_onnx

    out = {}
    for key in keys:
        d = factory.mktemp(prefix + "_".join(key))
        export_onnx(models[key], d, ExportSpec(max_seq_len=max_len))
        out[key] = (models[key], d)
    return out


def assert_extend_pieces(eng, st, ids, full, pieces, tol: float, name: str = ""):
    """Two rows fed ``pieces`` ((tokens of row 0, tokens of row 1) per call) through
    ``eng.extend``: each call's last logits of each row against ``full`` (torch, (2, T, V))."""
    import torch

    for a, b in pieces:
        pos = st.positions.copy()
        logits = eng.extend(st, [0, 1], [ids[0, pos[0]:pos[0] + a], ids[1, pos[1]:pos[1] + b]])
        for row, n in ((0, a), (1, b)):
            assert_close(torch.from_numpy(logits[row]), full[row, pos[row] + n - 1], tol,
                         f"{name} row {row} at {pos[row] + n}")


def onnx_prefill_cases(model, onnx_dir, lengths, ids_for):
    """ONNX Runtime's prefill (logits and every carried state, stacked) beside torch's reference
    forward and prefill state, per length: yields (T, ids, out, ref, st)."""
    import torch

    from bsbr_export.ops import state as S
    from bsbr_export.runtime import ORTRunner

    names = ["logits"] + [S.layer_name(n, i) for n in S.CARRIED for i in range(model.cfg.n_layer)]
    with ORTRunner(Path(onnx_dir) / "model.onnx", outputs=names) as r:
        for T in lengths:
            ids = ids_for(T)
            out = dict(zip(names, r.session.run(names, {"input_ids": ids})))
            out |= S.stack(out, S.CARRIED, model.cfg.n_layer)
            with torch.no_grad():
                ref = model(torch.from_numpy(ids), impl="reference")
                _, st = model.prefill(torch.from_numpy(ids), max_len=T)
            yield T, ids, out, ref, st


def make_tiny_hf(path: Path, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=101, n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    model = GPT2LMHeadModel(cfg).eval()
    # Larger-than-init weights so attention patterns are far from uniform.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "c_attn" in n and p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_hf(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf(tiny_hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="session")
def bundled_dir():
    assert (BUNDLED / "model.safetensors").is_file(), f"bundled model missing at {BUNDLED}"
    return BUNDLED


@pytest.fixture(scope="session")
def bundled_hf(bundled_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(bundled_dir).eval()


@pytest.fixture(scope="session")
def heldout_ids(bundled_dir):
    import numpy as np

    return np.load(bundled_dir / "heldout_ids.npy").astype("int64")


BUNDLED_INT8_MAX_LEN = 140  # lengths 1, L-1, L, L+1 and 140: none but L a multiple of the chunk


@pytest.fixture(scope="session")
def bundled_int8_run(bundled_dir, tmp_path_factory):
    """One main-command run on the bundled model (--engine int8, --max-seq-len 140), shared by the
    int8 tests and the fidelity line's: (its output, stdout and stderr together; its directory)."""
    from click.testing import CliRunner

    from bsbr_export.cli import main

    out = tmp_path_factory.mktemp("int8") / "out"
    res = CliRunner().invoke(main, [str(bundled_dir), "--engine", "int8", "--out", str(out), "--threads", "2",
                                    "--max-seq-len", str(BUNDLED_INT8_MAX_LEN)])
    assert res.exit_code == 0, res.output
    return res.output, out


def op_inputs(T: int, seed: int, L: int, B: int = 2, H: int = 3, d: int = 8, scale: float = 0.7, g_min: float = 0.2):
    """Seeded inputs of the BSBR op over T tokens in chunks of L: q, k, v (B, H, T, d) times
    ``scale``, meta vectors r, h (B, H, C, d) and a positive g (H,) in [g_min, g_min + 1)."""
    from bsbr_export.ops.chunk import num_chunks

    g = torch.Generator().manual_seed(seed)
    C = num_chunks(T, L)
    q, k, v = (scale * torch.randn(B, H, T, d, generator=g) for _ in range(3))
    r, h = (torch.randn(B, H, C, d, generator=g) for _ in range(2))
    return q, k, v, r, h, torch.rand(H, generator=g) + g_min
