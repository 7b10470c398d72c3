"""What a benchmark run measures: the backends, the ``BenchSpec`` and the timing schedule."""

from __future__ import annotations

from dataclasses import dataclass, replace

SCHEMA = "bsbr-export-bench/1"
BACKENDS = ("hf-torch", "hf-ort", "bsbr-torch", "bsbr-ort", "int8-ort", "tensorrt", "floor-ort")
LABELS = {
    "hf-torch": "HF GPT-2, torch SDPA",
    "hf-ort": "HF GPT-2 (torch.onnx dynamo export), ORT",
    "bsbr-torch": "BSBR, torch",
    "bsbr-ort": "BSBR, ORT",
    "int8-ort": "BSBR int8 (dense weights int8), ORT",
    "tensorrt": "BSBR, TensorRT",
    "floor-ort": "dense floor, ORT",
}
KINDS = {"hf-torch": "torch", "hf-ort": "onnxruntime", "bsbr-torch": "torch", "bsbr-ort": "onnxruntime",
         "int8-ort": "onnxruntime", "tensorrt": "tensorrt", "floor-ort": "onnxruntime"}
DECODE_BACKENDS = ("hf-torch", "kv-ort", "bsbr-torch", "bsbr-ort")
DECODE_LABELS = {"hf-torch": "HF GPT-2 + KV cache, torch", "kv-ort": "GPT-2 + KV cache, ORT (IOBinding)",
                 "bsbr-torch": "BSBR state, torch", "bsbr-ort": "BSBR state, ORT (runtime engine, IOBinding)"}
RANDOM_MODELS = {
    # GPT2Config() defaults: 124M parameters, vocab 50257, n_positions 1024.
    "gpt2-small-random": {},
    "tiny-random": dict(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=4),
}
MIB = 2 ** 20
DECODE_WARMUP = 3  # untimed decode steps before the timed chunk of steps


@dataclass(frozen=True)
class BenchSpec:
    """What one ``bsbr-export bench`` run measures."""

    model: str = "gpt2-small-random"  # a RANDOM_MODELS name or a local HF GPT-2 directory
    lengths: tuple = (1, 32, 128, 256, 512, 1024, 2048, 4096, 8192)
    throughput: tuple = (8, 256)  # (batch, T) of the throughput point
    decode_contexts: tuple = (256, 512, 1024, 2048, 4096, 8192)
    chunk_size: int = 128
    # g = 1: the retrieval term is live, so the parity gate checks it (its cost is paid for any g).
    retrieval_scale: float = 1.0
    threads: int = 0  # 0: every core this process may use
    runs: int | None = None  # timed runs per case; None: ``schedule``
    warmup: int | None = None
    quick: bool = False
    fit_range: tuple = (1024, 8192)  # T range of the scaling-exponent fit
    profile_len: int | None = None  # ORT profile of the ORT backends at this T (None: the longest)
    opt_levels_len: int | None = 1024  # bsbr-ort under each ORT optimisation level at this T (None: skip)
    seed: int = 0
    case_timeout_s: int = 1800

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def decode_steps(self) -> int:
        """One chunk of steps: the amortised per-token mean includes exactly one chunk close."""
        return self.chunk_size

    @property
    def ext_positions(self) -> int:
        """Position table of the standard baselines: the longest prefill or decoded position."""
        need = [self.max_len, self.throughput[1]]
        if self.decode_contexts:
            need.append(max(self.decode_contexts) + self.decode_steps + DECODE_WARMUP)
        return max(need)

    @classmethod
    def from_dict(cls, d: dict) -> BenchSpec:
        """The spec back from ``asdict`` after a JSON round trip (lists become tuples again)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def quick_spec(**changes) -> BenchSpec:
    """The CI smoke test: a tiny random model, T in {16, 48}, 2 runs, seconds in all."""
    base = BenchSpec(model="tiny-random", lengths=(16, 48), throughput=(2, 16), decode_contexts=(16, 48),
                     chunk_size=16, runs=2, warmup=1, quick=True, fit_range=(16, 48), opt_levels_len=48,
                     case_timeout_s=300)
    return replace(base, **changes)


LONG_TOKENS = 4096  # from here on one run takes many seconds: the warm-up runs a short prefix
SHORT_WARMUP_SEQ = 256


def schedule(batch: int, seq: int, spec: BenchSpec) -> dict:
    """Warm-up and timed runs of a case: >= 5 timed runs (2 under ``--quick``).

    Long cases warm up on a ``SHORT_WARMUP_SEQ``-token prefix: that initialises threads, weights
    and kernels; the first long run's allocations then land in one of the timed runs, which the
    median absorbs. It keeps the whole sweep within its time budget.
    """
    if spec.runs is not None:
        warm, runs = (1 if spec.warmup is None else spec.warmup), spec.runs
    else:
        warm, runs = (2, 7) if batch * seq <= 512 else (1, 5)
        warm = warm if spec.warmup is None else spec.warmup
    short = batch * seq >= LONG_TOKENS and not spec.quick
    return {"warmup": warm, "runs": runs, "warmup_seq": min(seq, SHORT_WARMUP_SEQ) if short else seq}


def prefill_plan(spec: BenchSpec) -> list[tuple[int, int]]:
    """(batch, T) of every prefill case: batch 1 at each length, then the throughput point."""
    plan = [(1, T) for T in sorted(spec.lengths)]
    if spec.throughput and tuple(spec.throughput) not in plan:
        plan.append(tuple(spec.throughput))
    return plan
