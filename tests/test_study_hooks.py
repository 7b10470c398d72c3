"""Study plumbing for round two: the bootstrap interval on perplexity changes (metrics), the rows
studylib resolves (look-back variants, baselines), their models and their decode-state cost."""

import math
import sys
from pathlib import Path

import pytest
import torch

from bsbr_export.metrics import format_change, perplexity, perplexity_change
from bsbr_export.ops.baselines import WindowAttention
from bsbr_export.ops.state import StateSpec, kv_cache_bytes
from conftest import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import studylib as S  # noqa: E402


def windows(n, T, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.rand(T, generator=g) * 4 for _ in range(n)]


# --------------------------------------------------------------------------- bootstrap


def test_change_of_identical_models_is_zero_with_a_zero_interval():
    a = windows(8, 50, 0)
    c = perplexity_change(a, [x.clone() for x in a])
    assert c["change"] == 0 and c["lo"] == 0 and c["hi"] == 0 and c["windows"] == 8


def test_paired_constant_shift_gives_a_point_interval_however_windows_differ():
    """new = ref + delta on every token: every resample changes perplexity by e^delta - 1, even
    with windows of very different difficulty (an unpaired resample would spread widely)."""
    g = torch.Generator().manual_seed(1)
    ref = [torch.rand(40, generator=g, dtype=torch.float64) * 5 * (i + 1) for i in range(10)]
    delta = 0.03
    c = perplexity_change(ref, [x + delta for x in ref])
    assert c["change"] == pytest.approx(math.exp(delta) - 1, abs=1e-12)
    assert c["lo"] == pytest.approx(c["change"], abs=1e-9) and c["hi"] == pytest.approx(c["change"], abs=1e-9)


def test_change_matches_perplexities_and_interval_brackets_it():
    ref = windows(12, 64, 2)
    g = torch.Generator().manual_seed(3)
    new = [x + 0.02 + 0.3 * torch.randn(64, generator=g) for x in ref]
    c = perplexity_change(ref, new)
    assert c["change"] == pytest.approx(perplexity(new) / perplexity(ref) - 1, rel=1e-9)
    assert c["lo"] < c["change"] < c["hi"]
    assert perplexity_change(ref, new) == c  # seeded: the same interval every time
    wider = perplexity_change(ref, new, level=0.99)
    assert wider["lo"] <= c["lo"] and wider["hi"] >= c["hi"]
    assert format_change(c).startswith(f"{100 * c['change']:+.1f}% [")


def test_more_windows_narrow_the_interval_and_a_clear_loss_excludes_zero():
    g = torch.Generator().manual_seed(4)

    def pair(n):
        ref = [torch.rand(32, generator=g) * 4 for _ in range(n)]
        # Per-window effects around +0.05 nats: some windows better, most worse.
        return ref, [x + 0.05 + 0.1 * torch.randn(()) for x in ref]

    few, many = perplexity_change(*pair(4)), perplexity_change(*pair(64))
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]
    assert many["lo"] > 0


def test_change_refuses_unpaired_windows():
    a = windows(3, 10, 5)
    with pytest.raises(ValueError):
        perplexity_change(a, a[:2])
    with pytest.raises(ValueError):
        perplexity_change(a, [a[0], a[1], a[2][:5]])
    with pytest.raises(ValueError):
        perplexity_change([], [])


# --------------------------------------------------------------------------- rows, models, cost


def test_rows_of_round_two():
    names = S.added_rows(128)
    assert {"window 128", "window 256", "sinks 4 + window 128", "sinks 4 + window 256"} <= set(names)
    assert S.row_spec("normalised, look-back")["local_window"] == "lookback"
    assert S.row_spec("sinks 4 + window 256") == WindowAttention(256, 4)
    assert S.row_spec("window 7") == WindowAttention(7)
    assert S.row_spec("plain") == S.VARIANTS["plain"]
    with pytest.raises(SystemExit):
        S.row_spec("window")


def test_baseline_model_is_the_original_within_its_window(tiny_hf_dir, tiny_hf):
    m = S.load_model(str(tiny_hf_dir), "sinks 2 + window 10", 8)
    assert isinstance(m, S.Baseline)
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, hidden = m(ids, output_hidden_states=True)
        ref = tiny_hf(input_ids=ids, output_hidden_states=True)
    assert_close(logits, ref.logits, 1e-4, "baseline within window + sinks")
    assert len(hidden) == len(ref.hidden_states)
    look = S.load_model(str(tiny_hf_dir), "normalised, look-back", 8, position_policy="chunk")
    assert look.cfg.local_window == "lookback" and look.cfg.position_policy == "chunk"


def test_decode_state_cost(tiny_hf_dir):
    d, L = str(tiny_hf_dir), 8
    model = S.load_model(d, "normalised", L)
    for ctx in (8, 100, 8192):
        assert S.decode_state_bytes(d, "normalised", L, ctx) == StateSpec.from_config(model.cfg).bytes_at(ctx)
    cfg = model.cfg
    one_chunk_kv = 2 * cfg.n_layer * cfg.n_head * L * cfg.head_dim * 4
    assert (S.decode_state_bytes(d, "normalised, look-back", L)
            - S.decode_state_bytes(d, "normalised", L)) == one_chunk_kv
    assert S.decode_state_bytes(d, "sinks 4 + window 16", L) == kv_cache_bytes(cfg.n_layer, cfg.n_embd, 20)
    assert S.decode_state_bytes(d, "window 16", L, 10) == kv_cache_bytes(cfg.n_layer, cfg.n_embd, 10)
    # The BSBR state grows with the context, the baselines' does not.
    assert S.decode_state_bytes(d, "normalised", L, 8192) > S.decode_state_bytes(d, "normalised", L, 4096)
    assert S.decode_state_bytes(d, "window 16", L, 8192) == S.decode_state_bytes(d, "window 16", L, 4096)
    assert S.state_bytes(S.load_model(d, "window 16", L), 64) == kv_cache_bytes(cfg.n_layer, cfg.n_embd, 16)


def test_fidelity_quick_with_baselines_has_every_row(tmp_path):
    """study_fidelity --quick --with-baselines: tables 1, 2 and 7 hold a row per look-back variant
    and baseline, table 2 their decode state at 8192 tokens as decode_state_bytes gives it."""
    import subprocess

    from test_study_quick import tiny_model_with_tokenizer

    model = tmp_path / "tiny"
    model.mkdir()
    tiny_model_with_tokenizer(model)
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, str(S.ROOT / "scripts" / "study_fidelity.py"), "--quick", "--with-baselines",
                          "--model", str(model), "--out", str(out), "--figures", str(tmp_path / "figures")],
                         capture_output=True, text=True, cwd=S.ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = (out / "study_fidelity.md").read_text()
    L = 16  # the quick chunk
    tables = {t: text[text.index(f"### Table {t}"):] for t in (1, 2, 7)}
    for name in S.added_rows(L):
        for t, body in tables.items():
            assert f"| {name} |" in body, (t, name)
        state = S.mib(S.decode_state_bytes(str(model), name, L))
        row = next(line for line in tables[2].splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip(" |").endswith(state), (name, row)
    assert "% [" in tables[7]  # perplexity changes with their intervals


def test_format_change_shows_the_sign_of_a_bound_near_zero():
    """A bound that rounds to 0.0 at one decimal gets the digits that tell whether the interval
    excludes zero; other bounds keep one decimal."""
    assert format_change({"change": -0.005, "lo": -0.0104, "hi": -0.0003}) == "-0.5% [-1.0, -0.03]"
    assert format_change({"change": 0.001, "lo": -0.0002, "hi": 0.0031}) == "+0.1% [-0.02, +0.3]"
    assert format_change({"change": 0.0, "lo": 0.0, "hi": 0.012}) == "+0.0% [+0.0, +1.2]"


def test_calibration_run_specs_self_and_bad():
    """study_calibration's START:self[:MINUTES] runs (the main command's --calibrate self) and the
    one-line refusals of bad ones, before any model loads."""
    import study_calibration as C

    start = "default, hedgehog φ, decay weights"
    assert C.parse_run(f"{start}:self:10", 1024, 1024) == (start, (None, "self"), 10.0)
    assert C.parse_run("default:self", 1024, 1024) == ("default", (None, "self"), 10.0)
    assert S.row_spec(start) == {"feature_map": "hedgehog", "retrieval_weights": "decay"}
    for bad in ("default:self:abc", "default:self:0", "default:self:1:2", "nosuch:self:1", "normalised:bogus"):
        with pytest.raises(SystemExit):
            C.parse_run(bad, 1024, 1024)


def test_cost_key_names_the_graph_shape(tiny_hf_dir):
    """Rows that export to the same graph share a cost key; the limit and the weights change it."""
    d, L = str(tiny_hf_dir), 8
    keys = {n: S.cost_key(d, n, L)[0] for n in ("local", "plain", "default", "default, gate weights",
                                                "normalised, look-back")}
    assert keys["local"] == keys["plain"] and len(set(keys.values())) == 4
    assert keys["default"].endswith("positions") and keys["normalised, look-back"].endswith("all")
    assert S.cost_key(d, "window 16", L) == (None, None)
