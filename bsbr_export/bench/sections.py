"""The report's later sections: decode, ORT optimisation levels, targets, ORT profiles, missed-target notes."""

from __future__ import annotations

from ..util import markdown_table
from .results import cell, decode_mean, decode_row, decode_state_bytes, fmt_mib, fmt_ms, fmt_x, median, ratio
from .spec import DECODE_BACKENDS, DECODE_LABELS, LABELS, SHORT_WARMUP_SEQ
from .targets import TARGET_DECODE_LONG, TARGET_DECODE_SHORT


def table(head: list, rows: list[list]) -> str:
    """A Markdown table without the trailing newline (sections are joined by newlines)."""
    return markdown_table(head, rows).rstrip("\n")


def decode_table(result: dict) -> str:
    ctxs = sorted({c["context"] for c in result["decode"]})
    bs = [b for b in DECODE_BACKENDS if any(c["backend"] == b for c in result["decode"])]
    steps = result["spec"]["chunk_size"]
    head = (f"\n### Decode: per-token latency vs context (mean over {steps} steps = one chunk, ms; "
            f"state memory MiB)\n\n")
    rows = []
    for cx in ctxs:
        lat = []
        for b in bs:
            c = decode_row(result, b, cx)
            lat.append(fmt_ms(c["per_token_mean_ms"]) if c is not None and c["status"] == "ok"
                       else (c["status"] if c else "—"))
        bsbr, kv = decode_state_bytes(result, cx)
        speed = ratio(decode_mean(result, "kv-ort", cx), decode_mean(result, "bsbr-ort", cx))
        rows.append([cx] + lat + ["—" if kv is None else fmt_mib(kv), "—" if bsbr is None else fmt_mib(bsbr),
                                  fmt_x(ratio(bsbr, kv)), fmt_x(speed)])
    kv_rows = [c for c in result["decode"] if c["backend"] == "kv-ort" and "parity" in c]
    tail = ""
    if kv_rows and kv_rows[0]["parity"].get("max_abs") is not None:
        p = kv_rows[0]["parity"]
        tail += (f"\n\n{DECODE_LABELS['kv-ort']}: GPT-2's decoder with past in Optimum's layout (past_key_values."
                 f"{{i}}.key/value in, present.{{i}}.key/value out), run through IOBinding with each step's present "
                 f"outputs bound as the next step's past (no host copy of the cache). Parity before timing: max abs "
                 f"diff {p['max_abs']:.2e} against {p['reference']}, T={p['seq']} ({p['status']}).")
    elif kv_rows:
        tail += f"\n\n{DECODE_LABELS['kv-ort']}: not timed, {kv_rows[0]['parity'].get('reason', 'parity FAILED')}."
    mem = result.get("runtime_memory") or {}
    if mem.get("runtime") and mem.get("prefill-session"):
        tail += (f"\n\nResident memory added by a loaded runtime (extend, decode and close sessions, one shared copy "
                 f"of the weights): {fmt_mib(mem['runtime'])} MiB, against {fmt_mib(mem['prefill-session'])} MiB for "
                 f"one prefill session of the same export ({mem['ratio']:.2f}x).")
    return head + table(["context"] + [f"{DECODE_LABELS[b]} ms/token" for b in bs]
                        + ["KV cache MiB", "BSBR state MiB", "BSBR state / KV cache",
                           "BSBR ORT speedup over KV-cache ORT"], rows) + tail


def opt_levels_table(result: dict) -> str:
    T = result["spec"]["opt_levels_len"]
    rows = [[c["optimization"], fmt_ms(c.get("median_ms")) if c["status"] == "ok" else c["status"]]
            for c in result["opt_levels"]]
    rows.append(["all (main table)", cell(result, "bsbr-ort", T)])
    return f"\n### BSBR ORT under ORT graph optimisation levels (T={T}, batch 1)\n\n" + table(["level", "median ms"],
                                                                                            rows)


def paired_table(result: dict) -> str:
    """Short prompts timed in pairs (``profile.run_paired``), when the run has any."""
    lengths = result.get("paired", {}).get("lengths")
    if not lengths:
        return ""
    rows = [[T, fmt_ms(r["bsbr-ort"]), fmt_ms(r["hf-ort"]), f"{r['ratio']:.2f}x", r["runs"]] for T, r in lengths.items()]
    return ("\n### Short prompts timed in pairs (batch 1, median ms)\n\nBSBR ORT and the HF export alternating call by "
            "call, each round starting with the other, in each of two processes that make the two sessions in "
            "opposite orders (made first, a session can run ~10% slower), ORT's thread spinning off in both sessions (the "
            "idle one's spinning threads would take the running one's cores), the rounds pooled: the median of their ratios is what "
            "the prefill targets against the HF export read (the separate processes of the prefill table differ "
            "from each other by more than those targets' margins).\n\n"
            + table(["T", "BSBR, ORT", "HF export, ORT", "median of the rounds' ratios", "rounds"], rows))


def targets_table(result: dict) -> str:
    rows = []
    for t in result["targets"]:
        bound = t.get("bound_if_attention_free")
        rows.append([t["description"], "—" if t["measured"] is None else f"{t['measured']:.2f}{t['unit']}",
                     f"{t['comparison']} {t['threshold']:.2f}{t['unit']}", t["status"],
                     "—" if bound is None else f"{bound:.2f}x"])
    return ("\n### Targets\n\n" + table(["target", "measured", "required", "result", "bound if attention were free"],
                                        rows)
            + "\n\nBound if attention were free: the baseline's latency over the dense floor's, the largest "
            "speedup any attention (even one costing nothing) could reach against that baseline here. For the "
            "decode targets against the KV cache the floor is the KV-cache decoder's per-token time on an empty "
            "cache (one token, no context); for the latency ratio (<=) the bound is the lowest ratio reachable.")


def profile_tables(result: dict) -> str:
    profs = {b: p for b, p in result["profiles"].items() if p.get("status") == "ok"}
    if not profs:
        return ""
    T = next(iter(profs.values()))["seq"]
    ops = []
    for p in profs.values():
        ops += [o for o in p["op_types_ms"] if o not in ops]
    floor = profs.get("floor-ort", {}).get("op_types_ms", {})
    bs = list(profs)
    warm = next(iter(profs.values())).get("warmup_seq", SHORT_WARMUP_SEQ)
    head = (f"\n### Where the time goes: ORT profile at T={T} (node time per op type, ms, one run after a "
            f"{'full-length' if warm == T else f'{warm}-token'} warm-up)\n\n")
    rows = []
    for o in ops[:14]:
        diff = (profs["bsbr-ort"]["op_types_ms"].get(o, 0.0) - floor.get(o, 0.0)) if "bsbr-ort" in profs else None
        rows.append([o] + [fmt_ms(profs[b]["op_types_ms"].get(o, 0.0)) for b in bs]
                    + [fmt_ms(diff) if diff is not None else "—"])
    text = head + table(["op type"] + [LABELS[b] for b in bs] + ["BSBR ORT − floor"], rows)
    text += "\n| **run (wall)** | " + " | ".join(fmt_ms(profs[b]["run_ms"]) for b in bs) + " | |"
    if "bsbr-ort" in profs:
        text += (f"\n\nInside `bsbr::ChunkAttention` (local softmax + retrieval term): "
                 f"{fmt_ms(profs['bsbr-ort']['chunk_attention_fn_ms'])} ms of BSBR ORT's node time.")
    return text


def _op_share(result: dict, backend: str, ops) -> tuple[float, float] | None:
    """(ms of ``ops`` in ``backend``'s profile, its profiled run ms)."""
    p = result.get("profiles", {}).get(backend, {})
    if p.get("status") != "ok":
        return None
    return sum(p["op_types_ms"].get(o, 0.0) for o in ops), p["run_ms"]


def _profile_diff(result: dict, top: int = 6) -> str:
    profs = result.get("profiles", {})
    a, f = profs.get("bsbr-ort", {}), profs.get("floor-ort", {})
    if a.get("status") != "ok" or f.get("status") != "ok":
        return ""
    ops = set(a["op_types_ms"]) | set(f["op_types_ms"])
    diff = sorted(((a["op_types_ms"].get(o, 0.0) - f["op_types_ms"].get(o, 0.0), o) for o in ops), reverse=True)
    return ", ".join(f"{o} {fmt_ms(v)} ms" for v, o in diff[:top] if v > 0)


def _speedup_note(result: dict, t: dict, Tmax: int) -> str:
    """Why a speedup target is missed: the dense floor bounds any speedup; the LM head's share of it."""
    floor, bsbr = median(result, "floor-ort", Tmax), median(result, "bsbr-ort", Tmax)
    bound = t["bound_if_attention_free"]
    below = " (below the target: no attention can reach it on this machine)" if bound < t["threshold"] else ""
    text = (f"The dense floor alone takes {fmt_ms(floor)} ms at T={Tmax}, {floor / bsbr:.0%} of BSBR ORT's "
            f"{fmt_ms(bsbr)} ms, so even attention that cost nothing would give at most {bound:.2f}x "
            f"here{below}. ")
    lm = _op_share(result, "floor-ort", ("Gemm",))
    if lm:
        text += (f"The LM head (the one Gemm) takes {fmt_ms(lm[0])} ms of the floor's profiled {fmt_ms(lm[1])} ms: "
                 f"computing logits only for the positions a caller needs (the last one when generating) "
                 f"removes it from every backend alike and raises the bound. ")
    return text + "The rest of the floor is the per-token MLP and projections, identical in every backend."


def _kv_cache_note(result: dict, name: str) -> str:
    """Why a decode target against GPT-2 + KV cache in ORT is missed, from the decode rows of this run."""
    ctx = sorted({c["context"] for c in result["decode"]})
    cs = ctx[0] if result.get("quick") or TARGET_DECODE_SHORT not in ctx else TARGET_DECODE_SHORT
    cl = ctx[-1] if result.get("quick") or TARGET_DECODE_LONG not in ctx else TARGET_DECODE_LONG
    if name == "kv-cache state":
        bsbr, kv = decode_state_bytes(result, cl)
        row = next((c for b in ("bsbr-ort", "bsbr-torch") for c in [decode_row(result, b, cl)]
                    if c is not None and c.get("state_parts")), None)
        text = f"At context {cl} the KV cache holds {fmt_mib(kv)} MiB and the BSBR state {fmt_mib(bsbr)} MiB"
        if row:
            big, nbytes = max(row["state_parts"].items(), key=lambda kv_: kv_[1])
            text += (f", {fmt_mib(nbytes)} MiB of it in {big} ({nbytes / bsbr:.0%}): the bank grows by one "
                     f"state per closed chunk, head and layer, so the ratio tends to that bank's bytes per token "
                     f"over the cache's (shrunk by a longer chunk or by --compression)")
        return text + "."
    row = lambda b, c: decode_row(result, b, c) or {}  # noqa: E731
    kv_s, kv_l = decode_mean(result, "kv-ort", cs), decode_mean(result, "kv-ort", cl)
    b_s, b_l = decode_mean(result, "bsbr-ort", cs), decode_mean(result, "bsbr-ort", cl)
    text = (f"GPT-2 + KV cache ORT takes {fmt_ms(kv_s)} ms per token at context {cs} and {fmt_ms(kv_l)} ms at "
            f"{cl} (each step writes the whole cache into new present outputs, {fmt_mib(decode_state_bytes(result, cl)[1])} "
            f"MiB at {cl}); BSBR ORT {fmt_ms(b_s)} and {fmt_ms(b_l)} ms.")
    med = row("bsbr-ort", cs).get("per_token_median_ms")
    if med is not None and b_s is not None:
        steps = row("bsbr-ort", cs).get("steps", 0)
        text += (f" BSBR ORT's median step at {cs} is {fmt_ms(med)} ms: the once-per-chunk close adds about "
                 f"{fmt_ms((b_s - med) * steps)} ms per chunk ({fmt_ms(b_s - med)} ms per token amortised).")
    dense = row("kv-ort", cs).get("dense_per_token_ms")
    if dense is not None:
        text += f" The KV-cache decoder's per-token time on an empty cache (the dense work alone) is {fmt_ms(dense)} ms."
    return text


def _prefill_note(result: dict, t: dict) -> str:
    """Why a prefill target against the HF export or the dense floor is missed: the three latencies at
    the length it names, and where the floor stands against the HF export (the dense part alone)."""
    import re

    found = re.findall(r"T=(\d+)", t["description"])  # the length it names (the last: "at T=...")
    T = int(found[-1]) if found else None
    bsbr, hf, floor = (median(result, b, T) for b in ("bsbr-ort", "hf-ort", "floor-ort"))
    text = (f"At T={T}: BSBR ORT {fmt_ms(bsbr)} ms, HF export ORT {fmt_ms(hf)} ms, dense floor "
            f"{fmt_ms(floor)} ms. ")
    if floor is not None and hf is not None and floor > hf:
        text += ("The dense floor itself is slower than the HF export here, so the gap lies in the dense "
                 "graph (projections, MLP, LM head, per-node overhead), not in BSBR attention. ")
    if t["name"] == "floor is the floor":
        text += "A backend faster than the floor means the floor is not yet the floor."
    else:
        text += "Op types side by side: docs/results/profile-short.md (scripts/profile_short.py)."
    return text


def miss_notes(result: dict) -> str:
    """One data-driven paragraph per missed target (the numbers come from this run)."""
    Tmax = sorted(result["spec"]["lengths"])[-1]
    out = []
    for t in result["targets"]:
        if t["status"] != "miss":
            continue
        name, text = t["name"], ""
        if name in ("bsbr-ort vs hf-ort", "bsbr-ort vs hf-torch") and t.get("bound_if_attention_free") is not None:
            text = _speedup_note(result, t, Tmax)
        elif name == "dense floor":
            d = _profile_diff(result)
            text = (f"BSBR ORT spends {fmt_ms(median(result, 'bsbr-ort', Tmax) - median(result, 'floor-ort', Tmax))} "
                    f"ms over the floor at T={Tmax}. " + (f"By op type (profile, BSBR − floor): {d}. " if d else ""))
        elif name == "peak memory":
            text = (f"Both peaks include the weights and the [T, vocab] logits (plus ORT's copy of them); "
                    f"the floor's peak is {cell(result, 'floor-ort', Tmax, fmt=fmt_mib, key='peak_rss_bytes')} MiB.")
        elif name == "decode (ORT)":
            text = ("Per-token decode time grows with context: the per-token decode graph reads only the open "
                    "chunk and S, but the once-per-chunk close graph takes the banks of closed chunks (at full "
                    "capacity) as inputs and returns them as outputs, so the one closing step of each chunk "
                    "copies O(context) bytes (see the decode table).")
        elif name.startswith("decode"):
            text = "Per-token decode time grows with context (see the decode table)."
        elif name.startswith("kv-cache"):
            text = _kv_cache_note(result, name)
        elif name.startswith("prefill vs HF export") or name in ("dense floor (every T)", "floor is the floor"):
            text = _prefill_note(result, t)
        elif name == "short sequences":
            text = "At one chunk BSBR computes the same attention as GPT-2 plus the retrieval bookkeeping."
        elif name == "scaling":
            fl = result["scaling"].get("floor-ort", {}).get("exponent")
            text = f"The dense floor's own exponent is {fl:.2f}." if fl is not None else ""
        out.append(f"- **{t['description']}**: {t['measured']:.2f}{t['unit']} (needs {t['comparison']} "
                   f"{t['threshold']:.2f}{t['unit']}). {text}")
    return "\n".join(out)
