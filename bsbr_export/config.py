"""The BSBR model configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

POSITION_POLICIES = ("absolute", "chunk")
META_INITS = ("qk", "random")
COMPRESSION_INITS = ("random-orthogonal",)
RETRIEVALS = ("plain", "normalised")
FEATURE_MAPS = ("identity", "elu1", "relu", "learned", "hedgehog")
# Feature maps that keep every phi(x) >= 0, so a shared denominator never vanishes.
POSITIVE_FEATURE_MAPS = ("elu1", "relu", "learned", "hedgehog")
# Feature maps with parameters of their own (``attn.fm``), trained by calibration.
TRAINED_FEATURE_MAPS = ("learned", "hedgehog")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
# The local softmax's window: the token's own chunk, or its own chunk and the one before it.
LOCAL_WINDOWS = ("chunk", "lookback")
# Earlier chunks each local window adds to the token's own chunk.
LOOKBACK_CHUNKS = {"chunk": 0, "lookback": 1}
# The weights p_ij of the retrieved chunks: a softmax over them (one chunk's worth of mass), all
# ones (their sum), a learned per-head decay lambda^age, or an unnormalised sigmoid gate.
RETRIEVAL_WEIGHTS = ("softmax", "sum", "decay", "gate")
# The default conversion: the look-back window keeps the original's behaviour far better than the
# chunk window before any calibration (docs/results/retrieval-weights.md: 86.2% top-1, KL 0.035 on
# 64 held-out windows, against 77.7% / 0.079) at an ORT prefill within 1.15x the dense floor at
# 8192 tokens (docs/results/lookback-cost.md: 1.10x). Its weights stay the softmax: gate weights
# agree a little better at 1024 tokens (86.6%) but their unnormalised retrieved mass grows with the
# context and costs perplexity beyond it (docs/results/long-context.md: +14% at 8192).
DEFAULT_LOCAL_WINDOW, DEFAULT_RETRIEVAL_WEIGHTS = "lookback", "softmax"
# The retrieval stops at the position table (``retrieval_until``): beyond it, the retrieval made
# perplexity over long windows worse than none for the default and for calibrated conversions alike
# (docs/results/retrieval-until.md: at 8192 tokens the default went from -0.3% [-0.8, +0.3] against
# the original in 1024-token pieces to -1.7% [-2.4, -1.0], --calibrate self from +13.8% to -1.3%).
DEFAULT_RETRIEVAL_UNTIL = "positions"
# What a saved config without the key meant when it was written (before the key existed).
LEGACY = {"retrieval_weights": "softmax", "local_window": "chunk", "retrieval_until": None}


def check_chunk_size(value) -> int:
    """Chunk size must be a positive integer (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"chunk size must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"chunk size must be a positive integer, got {value}")
    return value


# The best measured settings of each retrieval variant on the bundled model before
# calibration (docs/RESULTS.md, table 1): normalised with elu + 1 and g = 0.03 keeps the
# original's next-token distribution best, so it is the default conversion.
DEFAULT_FEATURE_MAP = {"plain": "identity", "normalised": "elu1"}
DEFAULT_SCALE = {"plain": 0.0, "normalised": 0.03}


@dataclass(frozen=True)
class BSBRConfig:
    """Shape of a GPT-2 and the BSBR options that replace its attention.

    position_policy:
      ``absolute``: GPT-2's learned positions for t < n_positions; beyond the
        table, token t takes position ``n_positions - chunk_size + (t mod chunk_size)``,
        so each chunk past the table reuses the table's last chunk-length window.
      ``chunk``: positions restart every chunk (``t mod chunk_size``).
      Both give GPT-2's own positions for t < chunk_size, so a sequence within one
      chunk is computed exactly as by GPT-2.
    meta_init: how the converter initialises the meta query/key projections
      (``qk``: copies of the layer's query/key projections; ``random``: N(0, 0.02)).
    compression: state compression factor kappa (None = off); chunk states are kept
      as ``U^T F`` with U (d x d/kappa) orthonormal per head.
    retrieval_scale: initial value of the per-head retrieval scale g (0 = block-local
      attention only: the retrieval term vanishes).
    retrieval: how the retrieved state enters the output.
      ``plain``: ``o_t = a_t + g phi(q_t) S_c(t)`` (the design note's form; phi = identity).
      ``normalised``: local and retrieved terms share one denominator, as in hybrid
        local + linear attention:
        ``o_t = (sum_s e^{q_t.k_s/sqrt d} v_s + g phi(q_t) S) / (sum_s e^{q_t.k_s/sqrt d} + g phi(q_t) Z)``
        with ``Z_i = sum_j p_ij z_j``, ``z_j = sum_{s in chunk j} phi(k_s)``; needs g >= 0 and
        a positive feature map.
    feature_map: phi before compression: ``identity`` (plain only), ``elu1`` (elu(x) + 1),
      ``relu``, ``learned``: elu(x W_h + b_h) + 1 with a per-head map (d x d) that starts as the
      identity (so the conversion starts as ``elu1``) and is trained to make the retrieval's
      weights imitate the original's softmax weights (``calibrate.transfer``). The ONNX graphs
      compute it before the fused op (which takes phi(q) as an input), so kernel and plugin are
      those of ``elu1``.
      ``hedgehog``: [softmax(x W_h), softmax(-x W_h)] with a per-head W_h (d x d/2), started as
      the first d/2 columns of the identity (Hedgehog's map: positive, spiky like the softmax it
      imitates, d features in all, so every state keeps its shape); untrained it is a poor
      retrieval (calibrate it: ``calibrate.transfer``), computed before the fused op like
      ``learned``.
    local_window: what the local softmax of token t covers.
      ``chunk``: the keys s <= t of t's own chunk; retrieval from every earlier chunk.
      ``lookback``: the keys s <= t of t's own chunk and of the chunk before it; retrieval from
        the chunks before that (chunk i retrieves from chunks j < i - 1), so chunks 0 and 1
        retrieve nothing and a sequence of up to two chunks is computed exactly as by GPT-2
        (with ``absolute`` positions). Every backend computes it (ONNX ``...Lookback`` functions,
        the Triton kernel's ``lookback``); state_k/state_v then hold two chunks.
    retrieval_weights: the weights p_ij of S_i = sum_{j < i - lookback} p_ij F_j.
      ``softmax``: softmax_j(r_i . h_j / sqrt d) (they sum to one);
      ``sum``: 1 for every retrieved chunk (S_i is the sum of their F_j);
      ``decay``: lambda_h^(i - 1 - lookback - j), a learned per-head decay (``attn.decay``, started
        at ``retrieval_decay``, in (0, 1]): S_i = lambda S_{i-1} + F_{i-1-lookback}, no meta vectors;
      ``gate``: sigmoid(r_i . h_j / sqrt d), unnormalised.
      The fused op takes each chunk's S as it is, so only the retrieval changes.
    retrieval_until: the tokens within which chunks retrieve: chunk i retrieves only when it starts
      before this position (i L < retrieval_until); later chunks keep the local softmax alone (S_i = 0).
      "positions" (the default): the position table, n_positions, where GPT-2's learned positions
      end (beyond it the retrieval made perplexity worse for every conversion measured:
      docs/results/retrieval-until.md); None (or "all"): every chunk retrieves. Saved as tokens.
    """

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    chunk_size: int = 128
    compression: int | None = None
    position_policy: str = "absolute"
    meta_init: str = "qk"
    compression_init: str = "random-orthogonal"
    retrieval_scale: float | None = None  # None: the variant's default (DEFAULT_SCALE)
    retrieval: str = "normalised"
    feature_map: str | None = None  # None: the variant's default (DEFAULT_FEATURE_MAP)
    local_window: str = DEFAULT_LOCAL_WINDOW
    retrieval_weights: str = DEFAULT_RETRIEVAL_WEIGHTS
    retrieval_decay: float = 0.95  # initial lambda of ``decay``
    retrieval_until: int | str | None = DEFAULT_RETRIEVAL_UNTIL  # None: every chunk retrieves
    seed: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        # Variant-dependent defaults, resolved once so that saved configs are explicit.
        if self.retrieval_weights is None:  # not named: the default (a calibration names its own)
            object.__setattr__(self, "retrieval_weights", DEFAULT_RETRIEVAL_WEIGHTS)
        if self.feature_map is None and self.retrieval in DEFAULT_FEATURE_MAP:
            object.__setattr__(self, "feature_map", DEFAULT_FEATURE_MAP[self.retrieval])
        if self.retrieval_scale is None and self.retrieval in DEFAULT_SCALE:
            object.__setattr__(self, "retrieval_scale", DEFAULT_SCALE[self.retrieval])
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        until = {"all": None, "positions": self.n_positions}.get(self.retrieval_until, self.retrieval_until)
        if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 1):
            raise ConfigError(f"retrieval until must be a positive number of tokens, 'positions' or 'all', "
                              f"got {self.retrieval_until!r}")
        object.__setattr__(self, "retrieval_until", until)
        check_chunk_size(self.chunk_size)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.chunk_size > self.n_positions:
            raise ConfigError(
                f"chunk size {self.chunk_size} exceeds the model's position table ({self.n_positions})")
        if self.position_policy not in POSITION_POLICIES:
            raise ConfigError(f"position policy must be one of {POSITION_POLICIES}, got {self.position_policy!r}")
        if self.meta_init not in META_INITS:
            raise ConfigError(f"meta init must be one of {META_INITS}, got {self.meta_init!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation_function!r}")
        if self.retrieval not in RETRIEVALS:
            raise ConfigError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(f"feature map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.feature_map == "hedgehog" and self.head_dim % 2:
            raise ConfigError(f"the hedgehog feature map needs an even head dim, got {self.head_dim}")
        if self.local_window not in LOCAL_WINDOWS:
            raise ConfigError(f"local window must be one of {LOCAL_WINDOWS}, got {self.local_window!r}")
        if self.retrieval_weights not in RETRIEVAL_WEIGHTS:
            raise ConfigError(f"retrieval weights must be one of {RETRIEVAL_WEIGHTS}, got {self.retrieval_weights!r}")
        lam = self.retrieval_decay
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
            raise ConfigError(f"retrieval decay must be a number in (0, 1], got {lam!r}")
        if self.retrieval == "plain" and self.feature_map != "identity":
            raise ConfigError(f"plain retrieval uses the identity feature map, got {self.feature_map!r}")
        if self.retrieval == "normalised":
            if self.feature_map not in POSITIVE_FEATURE_MAPS:
                raise ConfigError(f"normalised retrieval needs a positive feature map {POSITIVE_FEATURE_MAPS}, "
                                  f"got {self.feature_map!r}")
            if not self.retrieval_scale >= 0:
                raise ConfigError(f"normalised retrieval needs retrieval_scale >= 0, got {self.retrieval_scale!r}")
        if self.compression is not None:
            c = self.compression
            if isinstance(c, bool) or not isinstance(c, int) or c < 1 or self.head_dim % c:
                raise ConfigError(
                    f"compression must be a positive integer dividing the head dim {self.head_dim}, got {c!r}")
            if self.compression_init not in COMPRESSION_INITS:
                raise ConfigError(f"compression init must be one of {COMPRESSION_INITS}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def state_dim(self) -> int:
        """d': rows of a (compressed) chunk state."""
        return self.head_dim // (self.compression or 1)

    @property
    def retrieving_chunks(self) -> int | None:
        """Chunks i that retrieve (i < this; ``retrieval_until``), None: every chunk."""
        u = self.retrieval_until
        return None if u is None else -(-u // self.chunk_size)

    @property
    def lookback(self) -> int:
        """Earlier chunks inside the local softmax window (0 or 1)."""
        return LOOKBACK_CHUNKS[self.local_window]

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def replace(self, **changes) -> "BSBRConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BSBRConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"format", "bsbr_export_version"}
        if unknown:
            raise ConfigError(f"unknown BSBR config keys: {sorted(unknown)}")
        return cls(**{**LEGACY, **{k: v for k, v in d.items() if k in names}})

    def save(self, path: Path) -> None:
        from . import __version__

        d = {"format": "bsbr-export", "bsbr_export_version": __version__, **self.to_dict()}
        Path(path).write_text(json.dumps(d, indent=2) + "\n")
