"""The converter is a pure function; checkpoints round-trip; bad input gets one clear error."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from bsbr_export.config import BSBRConfig
from bsbr_export.convert import (convert, convert_state_dict, load_bsbr, load_hf_checkpoint, save_bsbr)
from bsbr_export.errors import (ConfigError, HubUnreachableError, ModelLoadError, PickleCheckpointError,
                                UnsupportedArchitectureError)


def test_state_dict_keys_and_shapes(tiny_hf_dir):
    sd, hf_cfg, _ = load_hf_checkpoint(tiny_hf_dir)
    out, cfg = convert_state_dict(sd, hf_cfg, chunk_size=24, compression=2)
    E, H, d = 32, 2, 16
    assert out["h.0.attn.c_attn.weight"].shape == (3 * E, E)
    assert out["h.1.attn.meta_q.weight"].shape == (E, E)
    assert out["h.1.attn.g"].shape == (H,)
    assert out["h.0.attn.U"].shape == (H, d, d // 2)
    U = out["h.0.attn.U"]
    assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(d // 2).expand(H, -1, -1), atol=1e-5)
    # qk strategy: meta projections start as copies of the query / key projections.
    assert torch.equal(out["h.0.attn.meta_k.weight"], out["h.0.attn.c_attn.weight"][E:2 * E])
    assert cfg.chunk_size == 24 and cfg.compression == 2


def test_conversion_leaves_source_untouched(tiny_hf_dir, tiny_hf):
    sd = {k: v.clone() for k, v in tiny_hf.state_dict().items()}
    model = convert(tiny_hf_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in tiny_hf.state_dict().items():
        assert torch.equal(v, sd[k]), k
    out, _ = convert_state_dict(sd, tiny_hf.config.to_dict())
    for k, v in out.items():
        for src in sd.values():
            assert v.data_ptr() != src.data_ptr(), f"{k} shares storage with the source"


def test_save_load_round_trip(tiny_hf_dir, tmp_path):
    model = convert(tiny_hf_dir, chunk_size=20, compression=4, retrieval_scale=0.5)
    save_bsbr(model, tmp_path / "m")
    again = load_bsbr(tmp_path / "m")
    assert again.cfg == model.cfg
    ids = torch.randint(0, 101, (2, 70))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    with pytest.raises(ModelLoadError, match="already exists"):
        save_bsbr(model, tmp_path / "m")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_bad_chunk_size(tiny_hf_dir, bad):
    with pytest.raises(ConfigError, match="chunk size must be a positive integer"):
        convert(tiny_hf_dir, chunk_size=bad)


def test_chunk_larger_than_position_table(tiny_hf_dir):
    with pytest.raises(ConfigError, match="exceeds the model's position table"):
        convert(tiny_hf_dir, chunk_size=512)


def test_bad_compression(tiny_hf_dir):
    with pytest.raises(ConfigError, match="compression"):
        convert(tiny_hf_dir, compression=3)


def test_unsupported_architecture_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="supported: gpt2"):
        convert(tmp_path)


def test_pickle_refused_without_opt_in(tiny_hf, tmp_path):
    tiny_hf.config.save_pretrained(tmp_path)
    torch.save(tiny_hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="--allow-pickle"):
        convert(tmp_path)
    model = convert(tmp_path, allow_pickle=True)
    assert model.cfg.n_layer == 2


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        convert(str(tmp_path / "nope"))


def test_partial_directories(tiny_hf_dir, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        convert(d)
    shutil.copy(tiny_hf_dir / "config.json", d)
    with pytest.raises(ModelLoadError, match="no weights"):
        convert(d)
    (d / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="unreadable weights"):
        convert(d)


def test_missing_tensor(tiny_hf, tmp_path):
    from safetensors.torch import save_file

    tiny_hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in tiny_hf.state_dict().items() if "h.1.mlp" not in k and k != "lm_head.weight"}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="h.1.mlp"):
        convert(tmp_path)


def test_hub_name_offline_gives_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="models/gpt2-pystdlib"):
        convert("gpt2")


def test_config_validation():
    with pytest.raises(ConfigError):
        BSBRConfig(vocab_size=10, n_positions=64, n_embd=30, n_layer=1, n_head=4)
    with pytest.raises(ConfigError, match="position policy"):
        BSBRConfig(vocab_size=10, n_positions=256, n_embd=32, n_layer=1, n_head=4, position_policy="sinusoid")


def test_checkpoint_reader_matches_safetensors(bundled_dir, tmp_path):
    """The lazy reader gives the bundled model's tensors exactly as safetensors reads them:
    the same names, dtypes, shapes and values; a file cut inside its data is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bsbr_export.convert import SafetensorsFiles

    sd, _, _ = load_hf_checkpoint(bundled_dir)
    with safe_open(str(bundled_dir / "model.safetensors"), framework="pt") as ref:
        assert sorted(sd) == sorted(ref.keys()) and len(sd) == len(list(ref.keys()))
        for name in ref.keys():
            want, got = ref.get_tensor(name), sd[name]
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert torch.equal(got, want), name
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    others = {"f16": x.half(), "bf16": x.bfloat16(), "i64": torch.arange(7), "u8": torch.arange(4, dtype=torch.uint8),
              "bool": x > 0, "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(others, tmp_path / "t.safetensors")
    files = SafetensorsFiles([tmp_path / "t.safetensors"])
    for k, v in others.items():  # other dtypes and shapes through the same reader
        assert files[k].dtype == v.dtype and files[k].shape == v.shape and torch.equal(files[k], v), k
    files["f16"].zero_()  # each read is its own tensor: writing to one leaves the file and later reads
    assert torch.equal(files["f16"], others["f16"])
    d = tmp_path / "cut"
    d.mkdir()
    shutil.copy(bundled_dir / "config.json", d)
    data = (bundled_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ModelLoadError, match="unreadable weights"):
        load_hf_checkpoint(d)

