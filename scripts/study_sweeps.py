"""Study tables 5 and 6: chunk size sweep and state compression sweep.

    python scripts/study_sweeps.py [--model models/gpt2-pystdlib] [--windows N] [--quick]
                                   [--calibrated out/study/calibrated-normalised-conversion]

Speed is the median wall time of a batch-1 forward on this machine's CPU; memory is the
decode state a streaming generator preallocates (against GPT-2's KV cache); similarity
is measured against the original on held-out windows. Writes docs/results/study_sweeps.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import studylib as S
from bsbr_export.convert import _random_orthogonal, build_model, load_bsbr
from bsbr_export.ops.state import kv_cache_bytes
from bsbr_export.util import markdown_table, median_ms


def options():
    ap = S.parser(__doc__)
    ap.add_argument("--chunk-size", type=int, default=128, help="chunk size of the compression sweep")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--long-len", type=int, default=4096, help="second timing length (BSBR only)")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows")
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    ap.add_argument("--compressions", type=int, nargs="*", default=[0, 2, 4, 8], help="0 = none")
    ap.add_argument("--variants", nargs="*", default=["plain", "local", "normalised"],
                    help="rows: studylib variants or baselines ('window W', 'sinks S + window W')")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calibrated", type=Path, nargs="*", default=[],
                    help="calibrated BSBR checkpoints to add to the compression sweep")
    a = ap.parse_args()
    if a.quick:
        a.chunk_size, a.seq_len, a.long_len, a.windows, a.repeats = 16, 64, 128, 2, 1
        a.chunk_sizes, a.compressions = [8, 16, 32], [0, 2]
    return a


def with_compression(model, kappa: int | None, seed: int = 0):
    """The same weights with (another) compression factor; U seeded random-orthogonal."""
    cfg = model.cfg.replace(compression=kappa or None)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("attn.U")}
    gen = torch.Generator().manual_seed(seed)
    if cfg.compression:
        for i in range(cfg.n_layer):
            sd[f"h.{i}.attn.U"] = _random_orthogonal(cfg.n_head, cfg.head_dim, cfg.state_dim, gen)
    return build_model(sd, cfg)


def speed(model, T: int, repeats: int, vocab: int) -> float:
    x = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        return median_ms(lambda: model(x), runs=repeats)


def main():
    args = options()
    t0, hf, model_dir, ids, data_desc = S.start(args)
    T, Tl = args.seq_len, args.long_len
    V, N = hf.config.vocab_size, hf.config.n_positions
    ref = S.Reference(hf, S.windows(ids, T, args.windows))
    desc = f"{data_desc}; {len(ref.wins)} windows of {T} tokens for similarity; random ids for timing"
    with torch.no_grad():
        x = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
        t_orig = median_ms(lambda: hf(input_ids=x), runs=args.repeats)
    kv = kv_cache_bytes(hf.config.n_layer, hf.config.n_embd, T)

    out = ["## Hyperparameters (tables 5, 6)", "",
           f"Reference on this machine: the original model's forward over {T} tokens takes {t_orig:.1f} ms "
           f"(median of {args.repeats}); its fp32 KV cache for {T} tokens is {kv / 2**20:.2f} MiB.", "",
           "### Table 5: chunk size sweep", "", S.provenance(args, desc)]
    rows = []
    # --with-baselines: the look-back variants and the main command's conversion at every chunk size;
    # the baselines, whose windows do not depend on the chunk, once (chunk column "-").
    per_chunk = args.variants + ([*S.LOOKBACK_VARIANTS, "default"] if args.with_baselines else [])
    runs = [(L, n) for L in args.chunk_sizes if L <= N for n in per_chunk if not S.is_baseline(S.row_spec(n))]
    runs += [(None, n) for n in args.variants if S.is_baseline(S.row_spec(n))]
    runs += [(None, n) for n in (S.baseline_names(args.chunk_size) if args.with_baselines else [])]
    for L, n in runs:
        m = S.load_model(args.model, n, L or args.chunk_size)
        summ, _ = S.evaluate(ref, m)
        rows.append([L or "-", n, f"{speed(m, T, args.repeats, V):.1f}", f"{speed(m, Tl, args.repeats, V):.1f}",
                     f"{S.state_bytes(m, T) / 2**20:.2f}", f"{S.state_bytes(m, Tl) / 2**20:.2f}",
                     S.fmt(summ["cos_final"]), S.fmt(summ["kl"]), S.pct(summ["top1"])])
    out += [markdown_table(["chunk L", "variant", f"forward ms T={T}", f"forward ms T={Tl}",
                            f"decode state MiB (T={T})", f"decode state MiB (T={Tl})", "cos final", "KL (nats)",
                            "top-1"], rows),
            "Forward times are medians of batch-1 fp32 forwards (vectorised PyTorch path) on this CPU; "
            "decode state: the preallocated streaming state (current chunk's keys and values, retrieved state, "
            "bank of chunk states and meta keys) for batch 1; a baseline's: its KV cache of window and sinks.", ""]
    # ---------------------------------------------------------------- table 6
    L = args.chunk_size
    out += ["### Table 6: state compression sweep", "", S.provenance(args, desc + f"; chunk {L}")]
    bases = {n: S.load_model(args.model, n, L) for n in args.variants
             if n != "local" and not S.is_baseline(S.row_spec(n))}
    for p in args.calibrated:
        if Path(p).is_dir():
            bases[f"calibrated: {Path(p).name}"] = load_bsbr(p)
    rows = []
    for n, base in bases.items():
        ppl0 = None
        for kappa in args.compressions:
            m = with_compression(base, kappa)
            summ, _ = S.evaluate(ref, m)
            ppl0 = ppl0 or summ["ppl"]
            sb = S.state_bytes(m, Tl)
            per_chunk = m.cfg.n_layer * m.cfg.n_head * (m.cfg.state_dim * (m.cfg.head_dim + 1) + m.cfg.head_dim) * 4
            rows.append([n, kappa or "none", f"{sb / 2**20:.2f}", f"{per_chunk / 1024:.1f}",
                         f"{speed(m, T, args.repeats, V):.1f}", S.pct(summ["top1"]), S.fmt(summ["kl"]),
                         f"{summ['ppl']:.3f}", f"{100 * (summ['ppl'] / summ['ppl_ref'] - 1):+.2f}%",
                         f"{100 * (summ['ppl'] / ppl0 - 1):+.2f}%"])
    out += [markdown_table(["variant", "compression κ", f"decode state MiB (T={Tl})", "bank KiB per chunk",
                            f"forward ms T={T}", "top-1", "KL (nats)", f"ppl T={T}", "ppl vs original",
                            "ppl vs κ = none"], rows),
            "The block-local variant (g = 0) never reads its chunk states, so compression changes nothing "
            "in it but memory. Bank per chunk: one F_j (d' x d), z_j (d', normalised only, counted for all) "
            "and meta key h_j (d) per layer and head, fp32.", ""]
    out.append(f"_study_sweeps wall time: {time.time() - t0:.0f} s_\n")
    S.write_fragment(args, "sweeps", "\n".join(out))


if __name__ == "__main__":
    main()
