"""The plots of a run: latency.png, speedup.png, memory.png and decode.png (matplotlib, if installed)."""

from __future__ import annotations

from pathlib import Path

from .results import median, timed_backends
from .spec import DECODE_BACKENDS, DECODE_LABELS, LABELS, MIB


def plots(result: dict, out: Path) -> list[str]:
    """latency.png, speedup.png, memory.png, decode.png under ``out``; names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    lengths = sorted(result["spec"]["lengths"])
    shown = [b for b in timed_backends(result) if any(median(result, b, T) for T in lengths)]
    style = {"floor-ort": dict(ls="--", color="gray")}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in shown:
        pts = [(T, median(result, b, T)) for T in lengths if median(result, b, T)]
        ax.plot(*zip(*pts), marker="o", label=LABELS[b], **style.get(b, {}))
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (batch 1)", ylabel="prefill latency (ms, median)",
           title=f"Prefill latency: {result['model']['name']}, {result['threads']} threads")
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, series in result["speedups"].items():
        pts = [(int(T), v) for T, v in series.items() if v]
        if pts:
            a, b = name.split("/")
            ax.plot(*zip(*pts), marker="o", label=f"{LABELS[a]} over {LABELS[b]}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="sequence length T (batch 1)", ylabel="speedup (x)", title="Speedup vs T")
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "speedup.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in shown:
        pts = [(T, median(result, b, T, key="peak_rss_bytes") / 2 ** 30) for T in lengths if median(result, b, T)]
        ax.plot(*zip(*pts), marker="o", label=LABELS[b], **style.get(b, {}))
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (batch 1)", ylabel="peak RSS (GiB)",
           title="Peak process memory during prefill")
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "memory.png")

    if result["decode"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for b in DECODE_BACKENDS:
            pts = [(c["context"], c["per_token_mean_ms"], c["state_bytes"] / MIB) for c in result["decode"]
                   if c["backend"] == b and c["status"] == "ok"]
            if pts:
                x, y, s = zip(*pts)
                a1.plot(x, y, marker="o", label=DECODE_LABELS[b])
                a2.plot(x, s, marker="o", label=DECODE_LABELS[b])
        ctxs = sorted({c["context"] for c in result["decode"]})
        for a, yl in ((a1, "per-token latency (ms, mean over one chunk)"), (a2, "state memory (MiB)")):
            a.set(xscale="log", xlabel="context (tokens held in the state)", ylabel=yl)
            a.set_xticks(ctxs, [str(c) for c in ctxs])
            a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
        a2.set_yscale("log")
        a1.set_title("Decode latency vs context")
        a2.set_title("Decode state memory vs context")
        save(fig, "decode.png")
    return written
