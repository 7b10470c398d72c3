"""Study tables 3 and 4: attention patterns (figures) and attention density against T.

    python scripts/study_attention.py [--model models/gpt2-pystdlib] [--quick]

Table 3 draws, for every layer, each head's original attention map next to the converted
model's within-chunk maps and its between-chunk retrieval weights p_ij, and measures where
the original puts its attention mass (own chunk, earlier chunks, the first token). Table 4
counts the query-key pairs each model scores. Writes docs/results/study_attention.md and
docs/figures/attention_layer*.png.
"""

from __future__ import annotations

import math
import time

import torch

import studylib as S
from bsbr_export import metrics as M
from bsbr_export.util import markdown_table


def options():
    ap = S.parser(__doc__)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=None, help="windows for the attention-mass table (default: all)")
    ap.add_argument("--variant", default="normalised", help="conversion drawn in the figures")
    ap.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    a = ap.parse_args()
    if a.quick:
        a.chunk_size, a.seq_len, a.windows, a.lengths = 16, 64, 2, [16, 64, 256]
        a.chunk_sizes = [8, 16]
    return a


@torch.no_grad()
def bsbr_maps(model, x):
    """Per layer: (local maps (H, C, L, L), retrieval weights p (H, C, C)) of one window."""
    captured = []
    hooks = [b.attn.register_forward_hook(lambda mod, inp, out: captured.append(inp[0])) for b in model.h]
    model(x)
    for h in hooks:
        h.remove()
    L = model.cfg.chunk_size
    out = []
    for blk, xa in zip(model.h, captured):
        a = blk.attn
        q, k, _ = a.qkv(xa)  # (1, H, T, d)
        r, hm = a.meta(xa)  # (1, H, C, d)
        T, d = q.shape[2], q.shape[3]
        C = -(-T // L)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, C * L - T)).view(1, t.shape[1], C, L, d)  # noqa: E731
        s = pad(q) @ pad(k).transpose(-1, -2) / math.sqrt(d)  # (1, H, C, L, L)
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        local = torch.softmax(s, -1)[0]
        w = (r @ hm.transpose(-1, -2))[0] / math.sqrt(d)  # (H, C, C)
        w = w.masked_fill(~torch.ones(C, C, dtype=torch.bool).tril(-1), float("-inf"))
        p = torch.softmax(w, -1).nan_to_num(0.0)
        out.append((local, p))
    return out


def block_map(local, T):
    """Within-chunk maps placed on the T x T grid (zeros outside the chunks)."""
    H, C, L, _ = local.shape
    full = torch.zeros(H, C * L, C * L)
    for c in range(C):
        full[:, c * L:(c + 1) * L, c * L:(c + 1) * L] = local[:, c]
    return full[:, :T, :T]


def draw(args, layer, orig, local, p, T):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = orig.shape[0]
    fig, axes = plt.subplots(H, 3, figsize=(12, 3.6 * H), squeeze=False)
    bm = block_map(local, T)
    for hd in range(H):
        # Square root of the weights so that small but real weights stay visible.
        for j, (img, title) in enumerate([(orig[hd].sqrt(), f"original L{layer} H{hd}"),
                                          (bm[hd].sqrt(), f"converted within-chunk L{layer} H{hd}"),
                                          (p[hd], f"retrieval p_ij L{layer} H{hd}")]):
            ax = axes[hd, j]
            ax.imshow(img.numpy(), cmap="viridis", interpolation="nearest", aspect="auto")
            ax.set_title(title, fontsize=9)
            if j == 2:
                ax.set_xticks(range(p.shape[-1]))
                ax.set_yticks(range(p.shape[-1]))
            ax.set_xlabel("key chunk j" if j == 2 else "key position")
            ax.set_ylabel("query chunk i" if j == 2 else "query position")
    fig.tight_layout()
    path = S.figure_path(args, f"attention_layer{layer}.png")
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


@torch.no_grad()
def mass_table(hf, wins, L):
    """Per layer and head: the original's mean attention mass (queries in chunks >= 1) on the
    own chunk, on earlier chunks, and on token 0."""
    acc = None
    for x in wins:
        att = hf(input_ids=x[:, :-1], output_attentions=True).attentions  # layers x (1, H, T, T)
        T = att[0].shape[-1]
        pos = torch.arange(T)
        own = (pos[:, None] // L) == (pos[None, :] // L)
        q_sel = pos >= L
        rows = []
        for a in att:
            a = a[0][:, q_sel]  # (H, Tq, T)
            o = own[q_sel]
            rows.append(torch.stack([(a * o).sum(-1).mean(-1), (a * ~o).sum(-1).mean(-1), a[..., 0].mean(-1)], -1))
        m = torch.stack(rows)  # (layers, H, 3)
        acc = m if acc is None else acc + m
    return acc / len(wins)


def main():
    args = options()
    t0, hf, model_dir, ids, data_desc = S.start(args)
    L, T = args.chunk_size, args.seq_len
    model = S.load_converted(args.model, chunk_size=L, **S.VARIANTS[args.variant])
    wins = S.windows(ids, T, args.windows)
    out = ["## Attention patterns and density (tables 3, 4)", "",
           "### Table 3: attention patterns, original against converted", "",
           S.provenance(args, f"{data_desc}; the first of the windows below for the figures, chunk {L}, "
                              f"variant `{args.variant}` before calibration")]
    x = wins[0]
    with torch.no_grad():
        att = hf(input_ids=x[:, :-1], output_attentions=True).attentions
    maps = bsbr_maps(model, x[:, :-1])
    for layer, ((local, p), orig) in enumerate(zip(maps, att)):
        path = draw(args, layer, orig[0], local, p, T)
        out.append(f"![layer {layer}: original, converted within-chunk, retrieval p_ij]({S.rel_to_out(args, path)})\n")
    out += ["Columns: the original's attention weights over the whole window; the converted model's local "
            "softmax weights inside each chunk (exactly the original's weights for chunk 0, renormalised "
            "over the own chunk elsewhere); the converted model's retrieval weights p_ij of query chunk i over "
            "earlier chunks j (row 0 is empty: chunk 0 retrieves nothing). Maps show the square root of the "
            "weights.", ""]
    m = mass_table(hf, wins, L)
    out += [f"Where the original puts its attention (queries in chunks ≥ 1; {len(wins)} windows of {T} tokens, "
            f"chunk {L}): the mass BSBR's local term keeps (own chunk), the mass it must retrieve or lose "
            f"(earlier chunks), and the mass on token 0 (an attention sink when large).", ""]
    rows = [[li, hd, f"{m[li, hd, 0]:.3f}", f"{m[li, hd, 1]:.3f}", f"{m[li, hd, 2]:.3f}"]
            for li in range(m.shape[0]) for hd in range(m.shape[1])]
    out += [markdown_table(["layer", "head", "own chunk", "earlier chunks", "token 0"], rows)]
    # ---------------------------------------------------------------- table 4
    out += ["### Table 4: attention density against T", "",
            S.provenance(args, "none (counted from the shapes)"),
            "Density: the fraction of the causal query-key pairs T(T+1)/2 that the local softmax scores "
            "(full attention: 1). Retrieval adds C(C-1)/2 query-chunk scores (C = ceil(T/L)), shown for the "
            f"default chunk {L}.", ""]
    N = hf.config.n_positions
    rows = []
    for Tn in args.lengths:
        rows.append([Tn, f"{Tn * (Tn + 1) // 2:,}", "1.000" if Tn <= N else f"n/a (> {N})"]
                    + [f"{M.attention_density(Tn, Lc):.4f}" for Lc in args.chunk_sizes]
                    + [f"{M.retrieval_pairs(Tn, L):,}"])
    out += [markdown_table(["T", "causal pairs", "original"] + [f"BSBR L={Lc}" for Lc in args.chunk_sizes]
                           + [f"retrieval scores (L={L})"], rows)]
    out.append(f"_study_attention wall time: {time.time() - t0:.0f} s_\n")
    S.write_fragment(args, "attention", "\n".join(out))


if __name__ == "__main__":
    main()
