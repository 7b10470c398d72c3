"""HF GPT-2 checkpoint -> BSBR checkpoint.

``convert_state_dict`` is a pure function: an HF ``GPT2LMHeadModel`` state dict and
config in, a fresh BSBR state dict and ``BSBRConfig`` out (every tensor a new copy).
Loading (local directory or hub name) and saving live here too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import BSBRConfig, check_chunk_size
from .errors import (ConfigError, HubUnreachableError, ModelLoadError, PickleCheckpointError,
                     UnsupportedArchitectureError)
from .util import atomic_dir

SUPPORTED_MODEL_TYPES = ("gpt2",)
SUPPORTED_NAMES = "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 (model_type 'gpt2')"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")
WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------- loading

def _read_config(d: Path) -> dict:
    path = d / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{d}: not a model directory (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: config is not a JSON object")
    return cfg


def check_gpt2_config(cfg: dict, where: str) -> None:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{where}: unsupported architecture {mt!r} ({', '.join(cfg.get('architectures') or [])}); "
            f"supported: {SUPPORTED_NAMES}")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise UnsupportedArchitectureError(
            f"{where}: GPT-2 variants with scale_attn_by_inverse_layer_idx or unscaled attention are not supported")
    if cfg.get("add_cross_attention"):
        raise UnsupportedArchitectureError(f"{where}: GPT-2 with cross-attention is not supported")


class SafetensorsFiles(Mapping):
    """The tensors of safetensors files, each read from disk when it is asked for and not kept:
    a conversion then holds the converted model and one source tensor at a time, never the whole
    source checkpoint. Each read opens its file with ``safetensors.safe_open`` and closes it
    again: a handle held open keeps every page it has read resident (the whole checkpoint by the
    end), one per tensor frees them with the tensor."""

    def __init__(self, files):
        from safetensors import safe_open

        self.where = {}  # name -> file
        for f in files:
            with safe_open(str(f), framework="pt") as fh:  # checks the header against the file's size
                self.where.update(dict.fromkeys(fh.keys(), f))

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _load_weights(d: Path, allow_pickle: bool):
    """The checkpoint's tensors by name: safetensors read lazily, a pickle (if allowed) at once."""
    single, index = d / WEIGHTS, d / "model.safetensors.index.json"
    try:
        if single.is_file():
            return SafetensorsFiles([single])
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            for f in files:
                if not (d / f).is_file():
                    raise ModelLoadError(f"{d}: partial model directory, shard {f} is missing")
            return SafetensorsFiles([d / f for f in files])
    except ModelLoadError:
        raise
    except Exception as e:  # truncated or corrupt files
        raise ModelLoadError(f"{d}: unreadable weights ({type(e).__name__}: {e})") from None
    pickle = d / "pytorch_model.bin"
    if pickle.is_file():
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{pickle}: pickle checkpoints can run arbitrary code when loaded; refusing. "
                "Convert it to safetensors, or pass --allow-pickle if you trust its source")
        return torch.load(pickle, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{d}: partial model directory, no weights ({WEIGHTS} or pytorch_model.bin)")


def _download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors",
                                                            "model.safetensors.index.json", *TOKENIZER_FILES]))
    except Exception as e:  # offline, DNS failure, 404, gated repo ...
        raise HubUnreachableError(
            f"'{name}' is not a local directory and cannot be fetched from the HuggingFace hub "
            f"({type(e).__name__}); "
            f"pass a local model directory instead, e.g. models/gpt2-pystdlib") from None


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """A local directory as is; anything else that looks like a hub name is downloaded."""
    p = Path(source)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p}: expected a model directory, got a file")
        return p
    s = str(source)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ModelLoadError(f"{s}: no such model directory")
    return _download(s)


def hf_config(source) -> tuple[dict, Path]:
    """(HF config dict, directory) of a GPT-2 checkpoint, without reading its weights."""
    d = resolve_model_dir(source)
    cfg = _read_config(d)
    if cfg.get("format") == "bsbr-export":
        raise ModelLoadError(f"{d}: already a converted BSBR model; load it with load_bsbr")
    check_gpt2_config(cfg, str(d))
    return cfg, d


def planned_config(source, **options) -> tuple[BSBRConfig, Path]:
    """The ``BSBRConfig`` that ``convert(source, **options)`` will produce (options validated),
    read from config.json alone: lets a caller refuse bad input before loading any weights."""
    hf, d = hf_config(source)
    if "chunk_size" in options:
        check_chunk_size(options["chunk_size"])
    return bsbr_config_from_hf(hf, **options), d


def load_hf_checkpoint(source, allow_pickle: bool = False) -> tuple[dict, dict, Path]:
    """(state_dict, HF config dict, directory) of a GPT-2 checkpoint."""
    cfg, d = hf_config(source)
    return _load_weights(d, allow_pickle), cfg, d


# --------------------------------------------------------------------------- conversion

def _hf_key(sd: dict, name: str) -> torch.Tensor:
    for prefix in ("transformer.", ""):
        if prefix + name in sd:
            return sd[prefix + name]
    raise ModelLoadError(f"partial checkpoint: tensor {name!r} is missing")


def bsbr_config_from_hf(hf: dict, **options) -> BSBRConfig:
    return BSBRConfig(
        vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", 1024), n_embd=hf["n_embd"],
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation_function=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), **options)


def _random_orthogonal(H: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(H, d, k) with orthonormal columns per head."""
    a = torch.randn(H, d, d, generator=gen)
    qm, _ = torch.linalg.qr(a)
    return qm[:, :, :k].contiguous()


def convert_state_dict(hf_sd: dict, hf_config: dict, **options) -> tuple[dict, BSBRConfig]:
    """HF GPT-2 state dict + config -> (BSBR state dict, BSBRConfig). Inputs are not modified.

    options: any ``BSBRConfig`` field (chunk_size, compression, position_policy,
    meta_init, retrieval_scale, seed, ...).
    """
    if "chunk_size" in options:
        check_chunk_size(options["chunk_size"])
    check_gpt2_config(hf_config, "config")
    cfg = bsbr_config_from_hf(hf_config, **options)
    E = cfg.n_embd
    gen = torch.Generator().manual_seed(cfg.seed)
    get = lambda n: _hf_key(hf_sd, n).detach().to(torch.float32).clone().contiguous()  # noqa: E731
    out = {"wte.weight": get("wte.weight"), "wpe.weight": get("wpe.weight"),
           "ln_f.weight": get("ln_f.weight"), "ln_f.bias": get("ln_f.bias")}
    if tuple(out["wte.weight"].shape) != (cfg.vocab_size, E):
        raise ModelLoadError(f"wte has shape {tuple(out['wte.weight'].shape)}, config says {(cfg.vocab_size, E)}")
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = get(p + ln + ".weight")
            out[p + ln + ".bias"] = get(p + ln + ".bias")
        # HF Conv1D stores (in, out); nn.Linear wants (out, in).
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[p + mod + ".weight"] = get(p + mod + ".weight").T.contiguous()
            out[p + mod + ".bias"] = get(p + mod + ".bias")
        w, b = out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"]
        if cfg.meta_init == "qk":
            # Meta query/key start as the layer's own query/key projections.
            out[p + "attn.meta_q.weight"], out[p + "attn.meta_q.bias"] = w[:E].clone(), b[:E].clone()
            out[p + "attn.meta_k.weight"], out[p + "attn.meta_k.bias"] = w[E:2 * E].clone(), b[E:2 * E].clone()
        else:
            for m in ("meta_q", "meta_k"):
                out[p + f"attn.{m}.weight"] = torch.randn(E, E, generator=gen) * 0.02
                out[p + f"attn.{m}.bias"] = torch.zeros(E)
        out[p + "attn.g"] = torch.full((cfg.n_head,), float(cfg.retrieval_scale))
        if cfg.compression is not None:
            out[p + "attn.U"] = _random_orthogonal(cfg.n_head, cfg.head_dim, cfg.state_dim, gen)
        if cfg.feature_map == "learned":  # starts as elu + 1 (the identity map)
            out[p + "attn.fm.W"] = torch.eye(cfg.head_dim).repeat(cfg.n_head, 1, 1)
            out[p + "attn.fm.b"] = torch.zeros(cfg.n_head, cfg.head_dim)
        if cfg.feature_map == "hedgehog":  # the identity's first d/2 columns (ops.chunk.HedgehogFeature)
            out[p + "attn.fm.W"] = torch.eye(cfg.head_dim)[:, :cfg.head_dim // 2].repeat(cfg.n_head, 1, 1)
        if cfg.retrieval_weights == "decay":  # lambda of the decaying retrieval weights, per head
            out[p + "attn.decay"] = torch.full((cfg.n_head,), float(cfg.retrieval_decay))
    return out, cfg


def build_model(sd: dict, cfg: BSBRConfig):
    """The BSBR model over the tensors of ``sd`` themselves (no initialisation, no copy)."""
    from .modeling import BSBRGPT2

    with torch.device("meta"):
        model = BSBRGPT2(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"state dict does not match the BSBR model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def convert(source, allow_pickle: bool = False, **options):
    """Load a GPT-2 (directory or hub name) and return the converted BSBR model."""
    hf_sd, hf_cfg, _ = load_hf_checkpoint(source, allow_pickle)
    sd, cfg = convert_state_dict(hf_sd, hf_cfg, **options)
    del hf_sd  # every converted tensor is a copy: the original's memory goes before the model is built
    return build_model(sd, cfg)


# --------------------------------------------------------------------------- BSBR checkpoints

def save_bsbr(model, out_dir, tokenizer_from: Path | None = None, force: bool = False,
              extra: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files, + ``extra``: file name -> text)
    atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not force:
        raise ModelLoadError(f"{out}: already exists (use --force to replace it)")
    with atomic_dir(out, force=force, tag="tmp") as tmp:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}  # no copy: written as they are
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.cfg.save(tmp / "config.json")
        if tokenizer_from is not None:
            for f in TOKENIZER_FILES:
                if (Path(tokenizer_from) / f).is_file():
                    shutil.copy2(Path(tokenizer_from) / f, tmp / f)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return out


def load_bsbr(path):
    """Load a directory written by ``save_bsbr``."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg = _read_config(d)
    if cfg.get("format") != "bsbr-export":
        raise ModelLoadError(f"{d}: not a converted BSBR model (convert it first)")
    if not (d / WEIGHTS).is_file():
        raise ModelLoadError(f"{d}: partial model directory, {WEIGHTS} is missing")
    try:
        bcfg = BSBRConfig.from_dict(cfg)
    except (TypeError, ConfigError) as e:
        raise ModelLoadError(f"{d}: invalid BSBR config ({e})") from None
    try:
        sd = load_file(str(d / WEIGHTS))
    except Exception as e:
        raise ModelLoadError(f"{d}: unreadable weights ({type(e).__name__}: {e})") from None
    return build_model(sd, bcfg)


def converted_dir(source) -> Path | None:
    """``source`` as a Path when it is a converted BSBR directory (``save_bsbr``'s), else None."""
    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file():
        try:
            if _read_config(p).get("format") == "bsbr-export":
                return p
        except ModelLoadError:
            return None
    return None


def converted_config(d) -> BSBRConfig:
    """The ``BSBRConfig`` of a converted directory, read from its config.json alone (no weights)."""
    try:
        return BSBRConfig.from_dict(_read_config(Path(d)))
    except (TypeError, ConfigError) as e:
        raise ModelLoadError(f"{d}: invalid BSBR config ({e})") from None


def recorded_original(d) -> str | None:
    """The original GPT-2 a converted directory came from, where it says so: its calibration.json
    (the calibrate command), or the manifest.json beside it when it is the ``bsbr/`` of the main
    command's output (its ``original``, else its ``source`` when that is a local GPT-2 directory)."""
    d = Path(d)
    for f, keys in ((d / "calibration.json", ("source", "original")), (d.parent / "manifest.json", ("original",)),
                    (d.parent / "manifest.json", ("source",))):
        try:
            val = json.loads(f.read_text())
            for k in keys:
                val = val[k]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(val, str) or not val:
            continue
        if keys == ("source",) and not (Path(val).is_dir() and converted_dir(val) is None):
            continue  # a source typed relative to another directory, or itself converted
        return val
    return None


def load_any(source, allow_pickle: bool = False, **options):
    """A converted BSBR directory as saved, or an HF GPT-2 converted on the fly."""
    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = _read_config(p)
        if cfg.get("format") == "bsbr-export":
            if options:
                raise ConfigError(f"{p} is already converted; conversion options {sorted(options)} do not apply")
            return load_bsbr(p)
    return convert(source, allow_pickle=allow_pickle, **options)
