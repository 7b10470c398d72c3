"""The ONNX Runtime engine: ragged batches, prompts in pieces, per-row decode and chunk closing,
row replacement, state kept bound (no host copies of the state), one copy of the weights.

The oracle is the torch model run on each prompt alone (``TorchStepper``: prefill, then one
token at a time), itself tested against the full forward and HF GPT-2 elsewhere.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from bsbr_export.convert import convert
from bsbr_export.errors import InputError, ModelLoadError
from bsbr_export.export import ExportSpec, export_onnx
from bsbr_export.runtime import TorchStepper
from bsbr_export.runtime.engine import Engine
from bsbr_export.runtime.runners import check_providers

L = 24
MAX_LEN = 256
LENGTHS = [1, L - 1, L, L + 1, 3 * L + 5]
NEW = 2 * L + 7
TIE = 1e-4  # a step whose top two logits are this close ends the token comparison of its row


@pytest.fixture(scope="module")
def exported(bundled_dir, tmp_path_factory):
    """The bundled model at chunk 24 (many chunk closings in a short run), exported."""
    model = convert(bundled_dir, chunk_size=L)
    out = tmp_path_factory.mktemp("engine")
    export_onnx(model, out, ExportSpec(max_seq_len=MAX_LEN))
    return model, out


@pytest.fixture(scope="module")
def engine(exported):
    return Engine(exported[1], threads=2)


def _prompts(kind, vocab, heldout):
    rng = np.random.default_rng(7)
    if kind == "random":
        return [rng.integers(0, vocab, n) for n in LENGTHS]
    starts = rng.integers(0, len(heldout) - max(LENGTHS), len(LENGTHS))
    return [heldout[s:s + n] for s, n in zip(starts, LENGTHS)]


def _greedy(engine, prompts, new=NEW, pieces=None):
    """Greedy tokens and the logits of every step, all prompts in one batch."""
    st = engine.new_state(len(prompts))
    if pieces is None:
        logits = engine.extend(st, list(range(len(prompts))), prompts)
    else:  # every prompt fed in pieces of the given sizes (the rest in the last piece)
        done = [0] * len(prompts)
        logits = np.zeros((len(prompts), engine.vocab_size), np.float32)
        for size in [*pieces, MAX_LEN]:
            rows = [b for b, p in enumerate(prompts) if done[b] < len(p)]
            if not rows:
                break
            out = engine.extend(st, rows, [prompts[b][done[b]:done[b] + size] for b in rows])
            for i, b in enumerate(rows):
                logits[b] = out[i]
                done[b] = min(done[b] + size, len(prompts[b]))
    toks, steps = [], [logits.copy()]
    for i in range(new):
        tok = logits.argmax(-1)
        toks.append(tok)
        if i < new - 1:
            logits = engine.decode(st, tok)
            steps.append(logits.copy())
    return np.stack(toks, 1), steps


def _torch_alone(model, prompt, new=NEW):
    ts = TorchStepper(model, MAX_LEN)
    lg, toks, steps = ts.prefill(prompt[None])[0], [], []
    for i in range(new):
        steps.append(lg)
        toks.append(int(lg.argmax()))
        if i < new - 1:
            lg = ts.decode(np.array([toks[-1]]))[0]
    return toks, steps


def _check_against_torch(model, prompts, toks, steps):
    for b, p in enumerate(prompts):
        ref_toks, ref_steps = _torch_alone(model, p)
        for i in range(NEW):
            err = np.abs(steps[i][b] - ref_steps[i]).max()
            assert err <= 1e-4, f"row {b} (length {len(p)}) step {i}: max|diff| {err:.2e}"
            top2 = np.sort(ref_steps[i])[-2:]
            if top2[1] - top2[0] < TIE:  # a near tie: the rest of this row may diverge legitimately
                break
            assert toks[b, i] == ref_toks[i], f"row {b} step {i}"


@pytest.mark.parametrize("kind", ["random", "heldout"])
def test_ragged_batch_equals_each_prompt_alone_and_torch(exported, engine, heldout_ids, kind):
    model, _ = exported
    prompts = _prompts(kind, model.cfg.vocab_size, heldout_ids)
    toks, steps = _greedy(engine, prompts)
    for b, p in enumerate(prompts):
        alone, _ = _greedy(engine, [p])
        assert (alone[0] == toks[b]).all(), f"row {b} (length {len(p)}) differs from the prompt alone"
    _check_against_torch(model, prompts, toks, steps)


def test_prompts_in_pieces_equal_one_prefill(exported, engine, heldout_ids):
    model, _ = exported
    prompts = _prompts("heldout", model.cfg.vocab_size, heldout_ids)
    whole, _ = _greedy(engine, prompts)
    pieces, steps = _greedy(engine, prompts, pieces=[1, L - 1, 2 * L + 3])
    assert (whole == pieces).all()
    _check_against_torch(model, prompts, pieces, steps)


def test_row_replacement_leaves_other_rows_unchanged(exported, engine):
    rng = np.random.default_rng(3)
    vocab = exported[0].cfg.vocab_size
    prompts = [rng.integers(0, vocab, n) for n in (5, L + 3, 2 * L - 1)]
    ref, _ = _greedy(engine, prompts, new=3 * L)
    st = engine.new_state(3)
    logits = engine.extend(st, [0, 1, 2], prompts)
    toks = []
    newcomer = rng.integers(0, vocab, L + 2)
    for i in range(3 * L):
        tok = logits.argmax(-1)
        toks.append(tok.copy())
        if i == L // 2:  # row 1 is replaced by a new sequence mid-run (its output is no longer compared)
            engine.reset_rows(st, [1])
            engine.extend(st, [1], [newcomer])
        logits = engine.decode(st, tok)
    toks = np.stack(toks, 1)
    assert (toks[0] == ref[0]).all() and (toks[2] == ref[2]).all()


def test_inactive_rows_keep_their_state(exported, engine):
    """A row fed a piece at a time (prefill interleaved with decode steps) is not disturbed by
    the others' decode steps, even when it stands one token short of its chunk's end."""
    rng = np.random.default_rng(4)
    vocab = exported[0].cfg.vocab_size
    a, b = rng.integers(0, vocab, L - 1), rng.integers(0, vocab, 2 * L)
    ref, _ = _greedy(engine, [b], new=4)
    st = engine.new_state(2)
    logits = engine.extend(st, [0, 1], [a, b[:L - 1]])  # both rows at slot L - 1 of their chunk
    for _ in range(3):  # row 0 decodes (and closes its chunk); row 1 waits
        logits = engine.decode(st, np.array([int(logits[0].argmax()), 0]), active=np.array([True, False]))
    assert st.positions.tolist() == [L + 2, L - 1]
    out = engine.extend(st, [1], [b[L - 1:]])
    toks = [int(out[0].argmax())]
    for _ in range(3):
        out = engine.decode(st, np.array([0, toks[-1]]), active=np.array([False, True]))
        toks.append(int(out[1].argmax()))
    assert toks == ref[0].tolist()


def test_state_stays_bound_in_the_decode_loop(engine, monkeypatch):
    """Per token: every graph runs through IOBinding, and no state tensor is copied to the host."""
    import onnxruntime as ort

    st = engine.new_state(2)
    logits = engine.extend(st, [0, 1], [np.arange(5), np.arange(L - 2)])
    calls = {"run": 0, "numpy": 0, "iobinding": 0}
    for sess in engine.sessions.values():
        monkeypatch.setattr(sess, "run", lambda *a, **k: calls.__setitem__("run", calls["run"] + 1))
        orig = sess.run_with_iobinding
        monkeypatch.setattr(sess, "run_with_iobinding",
                            lambda io, *a, _o=orig, **k: (calls.__setitem__("iobinding", calls["iobinding"] + 1),
                                                          _o(io, *a, **k))[1])
    real_numpy = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy",
                        lambda self: (calls.__setitem__("numpy", calls["numpy"] + 1), real_numpy(self))[1])
    for _ in range(2 * L):  # crosses chunk boundaries of both rows
        logits = engine.decode(st, logits.argmax(-1))
    assert calls["run"] == 0 and calls["numpy"] == 0
    assert calls["iobinding"] >= 2 * L + 2  # decode every token, close at each row's boundary


def test_decode_writes_one_row_and_leaves_other_rows_untouched(exported, engine):
    """The per-token graph reads K/V/S and returns only the token's k/v rows (format 4: per layer);
    the engine writes each active row's k/v at its slot and nothing else: an inactive row keeps
    every byte, an active row changes in one K and one V slot per layer."""
    from bsbr_export.ops import state as S

    model, out = exported
    dec = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    n_layer = model.cfg.n_layer
    assert [i.name for i in dec.graph.input][2:] == [S.layer_name(n, i) for n in S.DECODE_IN for i in range(n_layer)]
    assert [o.name for o in dec.graph.output][1:] == [S.layer_name(S.out_name(n), i) for n in S.DECODE_OUT
                                                      for i in range(n_layer)]
    rng = np.random.default_rng(9)
    V = model.cfg.vocab_size
    st = engine.new_state(3)
    logits = engine.extend(st, [0, 1, 2], [rng.integers(0, V, n) for n in (5, L - 1, L + 3)])
    pos = st.positions.copy()
    before = {n: [b.copy() for b in st.buf[n]] for n in (S.K, S.V, S.S)}
    bank_before = {n: st.banks[2][n].copy() for n in S.BANKED.values()}
    engine.decode(st, logits.argmax(-1), active=np.array([True, False, True]))
    assert st.positions.tolist() == [pos[0] + 1, pos[1], pos[2] + 1]
    for n in (S.K, S.V, S.S):
        for i, (b, a) in enumerate(zip(st.buf[n], before[n])):
            assert np.array_equal(b[1], a[1]), f"inactive row's {n} layer {i} changed"
            for r in (0, 2):
                changed = np.flatnonzero((b[r] != a[r]).any(axis=(0, 2)))
                if n == S.S:
                    assert changed.size == 0, "S changes only when a chunk closes"
                else:  # the open chunk's slot (after the previous chunk's rows with the look-back window)
                    slot = model.cfg.lookback * L + pos[r] % L
                    assert changed.tolist() == [slot], (n, i, r, changed)
                    row = st._rows[S.ROW_K if n == S.K else S.ROW_V][i][r, :, 0]
                    assert np.array_equal(b[r, :, slot], row)
    assert all(np.array_equal(st.banks[2][n], a) for n, a in bank_before.items())


def test_state_memory_follows_what_the_rows_hold(exported, engine):
    """A row's bank exists once it closes a chunk and grows with the chunks it holds, never to the
    export's capacity up front; a reset row gives its bank back; set_rows/rows round-trip."""
    rng = np.random.default_rng(10)
    V = exported[0].cfg.vocab_size
    st = engine.new_state(4)
    engine.extend(st, [0, 1, 2, 3], [rng.integers(0, V, 5)] * 4)
    assert st.banks == [None] * 4
    assert st.nbytes() == 4 * engine.row_bytes(5)
    engine.extend(st, [1], [rng.integers(0, V, 3 * L)])  # row 1 now holds 3L + 5 tokens: 3 chunks
    held = st.banks[1]["state_bank_h"].shape[3]
    assert 3 <= held < engine.capacity
    assert st.nbytes() == 3 * engine.row_bytes(5) + engine.row_bytes(3 * L + 5)
    saved = st.rows([1])
    engine.reset_rows(st, [1])
    assert st.banks[1] is None and st.positions[1] == 0
    st.set_rows([2], saved, 3 * L + 5)
    again = st.rows([2])
    assert all(np.array_equal(saved[n], again[n]) for n in saved)
    engine.reserve(st, 3, MAX_LEN)
    assert st.banks[3]["state_bank_F"].shape[3] == MAX_LEN // L
    assert engine.bank_bytes(MAX_LEN) == sum(a.nbytes for a in st.banks[3].values())


def test_prefill_in_bounded_calls_equals_one_extend(exported, engine, monkeypatch):
    """``Engine.prefill`` feeds at most ``max_tokens`` tokens per extend call (long prompts in
    pieces) and gives each row's last logits as one extend of the whole batch does."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, exported[0].cfg.vocab_size, n) for n in LENGTHS]
    one = engine.extend(engine.new_state(len(prompts)), list(range(len(prompts))), prompts)
    calls = []
    real = engine.extend
    monkeypatch.setattr(engine, "extend", lambda st, rows, ids: (calls.append(sum(map(len, ids))), real(st, rows, ids))[1])
    st = engine.new_state(len(prompts))
    out = engine.prefill(st, list(range(len(prompts))), prompts, max_tokens=L + 3)
    assert max(calls) <= L + 3 and sum(calls) == sum(map(len, prompts))
    assert st.positions.tolist() == [len(p) for p in prompts]
    assert np.abs(out - one).max() <= 1e-4
    with pytest.raises(InputError, match="maximum"):
        engine.prefill(engine.new_state(1), [0], [np.zeros(MAX_LEN + 1, np.int64)])


def test_weights_stored_once_across_graphs(exported):
    """Every initializer's bytes are written once; the ONNX files take <= 1.05x the converted
    checkpoint's tensors."""
    model, out = exported
    stored, seen = {}, {}
    for f in sorted(out.glob("*.onnx")):
        for t in onnx.load(str(f), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                key = (info["location"], int(info["offset"]), int(info["length"]))
                assert seen.setdefault(t.name, key) == key, f"{t.name} stored twice"
                stored[key] = t.name
    assert {k[0] for k in stored} == {"weights.onnx.data"}
    # The model's tensors, each once across the graphs: their bytes add up to the checkpoint's.
    sd = model.state_dict()
    sizes = {}
    for f in sorted(out.glob("*.onnx")):
        for t in onnx.load(str(f), load_external_data=False).graph.initializer:
            if t.name in sd:
                ext = {e.key: e.value for e in t.external_data}
                sizes[t.name] = int(ext["length"]) if ext else len(t.raw_data) or 4 * len(t.float_data)
    assert set(sizes) == set(sd)
    assert sum(sizes.values()) == sum(v.numel() * v.element_size() for v in sd.values())
    assert sum(k[2] for k in stored) <= (out / "weights.onnx.data").stat().st_size
    ckpt = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    onnx_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert onnx_bytes <= 1.05 * ckpt, (onnx_bytes, ckpt)


def test_bad_exports_fail_in_one_line(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "close.onnx").unlink()
    with pytest.raises(ModelLoadError, match="missing close.onnx"):
        Engine(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    with open(bad / "weights.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelLoadError, match="weights.onnx.data"):
        Engine(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    m = onnx.load(str(bad / "extend.onnx"), load_external_data=False)
    meta = json.loads(m.metadata_props[0].value)
    meta["state"]["format"] = 1
    m.metadata_props[0].value = json.dumps(meta)
    onnx.save(m, str(bad / "extend.onnx"))
    with pytest.raises(ModelLoadError, match="state format 1"):
        Engine(bad)


def test_bad_input_fails_before_ort(engine):
    st = engine.new_state(2)
    with pytest.raises(InputError, match="empty"):
        engine.extend(st, [0], [np.array([], np.int64)])
    with pytest.raises(InputError, match="maximum"):
        engine.extend(st, [0], [np.zeros(MAX_LEN + 1, np.int64)])
    with pytest.raises(InputError, match=r"\[0, "):
        engine.extend(st, [0], [np.array([engine.vocab_size])])
    with pytest.raises(InputError, match="distinct"):
        engine.extend(st, [0, 0], [np.arange(3), np.arange(3)])
    with pytest.raises(InputError, match="one per row"):
        engine.decode(st, np.array([1]))
    assert (st.positions == 0).all()  # nothing ran
    with pytest.raises(InputError, match="not available"):
        check_providers(["NoSuchExecutionProvider"])


def test_a_few_tokens_on_held_rows_run_as_steps_only_in_a_small_state(engine, heldout_ids, monkeypatch):
    """A piece of a few tokens on a held row runs as per-token steps while the state is small (a
    step computes every row of it), through the extend graph in a large state; both give the
    logits of the same tokens fed whole."""
    from bsbr_export.runtime import engine as eng_mod

    ids = np.asarray(heldout_ids[:L + 7], dtype=np.int64)
    whole = engine.extend(engine.new_state(1), [0], [ids])[0]
    steps = []
    real = Engine.decode
    monkeypatch.setattr(Engine, "decode", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    for batch, expect in ((1, 3), (eng_mod.STEP_ROWS, 0)):
        st = engine.new_state(batch)
        engine.extend(st, [0], [ids[:L + 4]])
        steps.clear()
        out = engine.extend(st, [0], [ids[L + 4:]])[0]  # 3 tokens on a held row
        assert len(steps) == expect, (batch, steps)
        np.testing.assert_allclose(out, whole, atol=2e-4, rtol=0)
