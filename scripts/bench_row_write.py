"""How the decode step's new k/v rows get into the state: the two ways, measured side by side.

The per-token graph must put each row's new key and value (one row of ``head_dim`` floats per
head and layer) at the row's slot of its open chunk. Two ways keep the rest of the state still:

  engine     the graph returns the rows (``state_row_k.i``) and the engine writes them with one
             numpy assignment per tensor and layer (``runtime.engine.write_rows``);
  scatter    a ScatterND node per tensor and layer whose data input and output are bound to the
             same buffer (onnxruntime-genai's ``past_present_share_buffer`` idea): the kernel
             skips its copy only when input and output are one buffer.

Both run here at GPT-2 small shape (12 layers, 12 heads, chunk 128, head_dim 64) for batch 1,
16 and 32, timed round-robin in one process (median of ``--runs``); each checks that the state
holds exactly the written rows afterwards and that no other byte changed. Writes a Markdown
fragment (default docs/results/row-write.md) with the CPU flags and the command.

    python scripts/bench_row_write.py [--runs 200] [--out docs/results/row-write.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

LAYERS, HEADS, CHUNK, HEAD_DIM = 12, 12, 128, 64


def scatter_session(batch: int, threads: int):
    """One graph: per layer and tensor, out = ScatterND(state, idx, rows)."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    ins = [helper.make_tensor_value_info("idx", T.INT64, [batch, HEADS, 3])]
    outs, nodes = [], []
    for n in range(2 * LAYERS):
        ins += [helper.make_tensor_value_info(f"s{n}", T.FLOAT, [batch, HEADS, CHUNK, HEAD_DIM]),
                helper.make_tensor_value_info(f"r{n}", T.FLOAT, [batch, HEADS, HEAD_DIM])]
        outs.append(helper.make_tensor_value_info(f"o{n}", T.FLOAT, [batch, HEADS, CHUNK, HEAD_DIM]))
        nodes.append(helper.make_node("ScatterND", [f"s{n}", "idx", f"r{n}"], [f"o{n}"]))
    model = helper.make_model(helper.make_graph(nodes, "rows", ins, outs), opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(batch: int, runs: int, threads: int) -> dict:
    import onnxruntime as ort

    from bsbr_export.runtime.engine import write_rows

    rng = np.random.default_rng(0)
    state = [np.zeros((batch, HEADS, CHUNK, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
    rows = [rng.standard_normal((batch, HEADS, 1, HEAD_DIM), dtype=np.float32) for _ in range(2 * LAYERS)]
    slot = rng.integers(0, CHUNK, batch)
    b = np.arange(batch)

    def engine():
        write_rows(state, rows, b, slot)

    sess = scatter_session(batch, threads)
    io = sess.io_binding()
    idx = np.stack(np.broadcast_arrays(b[:, None], np.arange(HEADS)[None], slot[:, None]), -1).astype(np.int64)
    io.bind_cpu_input("idx", idx)
    for n, (s, r) in enumerate(zip(state, rows)):
        v = ort.OrtValue.ortvalue_from_numpy(s)
        io.bind_ortvalue_input(f"s{n}", v)
        io.bind_ortvalue_output(f"o{n}", v)  # the same buffer: in place
        io.bind_cpu_input(f"r{n}", np.ascontiguousarray(r[:, :, 0]))

    def scatter():
        sess.run_with_iobinding(io)

    times = {"engine": [], "scatter": []}
    for i in range(runs + 5):
        for name, fn in (("engine", engine), ("scatter", scatter)):
            for s in state:
                s[:] = 0.0
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            expect = np.zeros_like(state[0])
            for n, (s, r) in enumerate(zip(state, rows)):
                expect[:] = 0.0
                expect[b, :, slot] = r[b, :, 0]
                if not np.array_equal(s, expect):
                    raise SystemExit(f"{name}: batch {batch}: the state is not the written rows (tensor {n})")
            if i >= 5:
                times[name].append(dt)
    return {"batch": batch} | {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per way and batch [200]")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads [2]")
    ap.add_argument("--batches", default="1,16,32", help="comma-separated batch sizes [1,16,32]")
    ap.add_argument("--out", type=Path, default=Path("docs/results/row-write.md"), help="Markdown fragment to write")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.threads < 1:
        ap.error("--runs and --threads must be >= 1")
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        ap.error(f"--batches must be integers separated by commas, got {a.batches!r}")
    results = []
    for batch in batches:
        results.append(run(batch, a.runs, a.threads))
        print(f"batch {batch}: engine {results[-1]['engine']:.3f} ms, scatter {results[-1]['scatter']:.3f} ms",
              flush=True)
    import onnxruntime as ort

    from bsbr_export.util import machine_line, markdown_table

    lines = ["## Writing the decode step's k/v rows: engine write against ScatterND in place", "",
             f"`python {' '.join(['scripts/bench_row_write.py', *(argv if argv is not None else sys.argv[1:])])}`: "
             f"GPT-2 small shape (K and V of {LAYERS} layers, {HEADS} heads, chunk {CHUNK}, head_dim {HEAD_DIM}), "
             f"one new row per sequence, median of {a.runs} runs each, the two alternating; {machine_line()}; "
             f"onnxruntime {ort.__version__}, {a.threads} threads. Both leave exactly the written rows in the state "
             f"(checked every run).", "",
             markdown_table(["batch", "engine write (ms per step)", "ScatterND in place (ms per step)",
                             "ScatterND / engine"],
                            [[r["batch"], f"{r['engine']:.3f}", f"{r['scatter']:.3f}",
                              f"{r['scatter'] / r['engine']:.2f}x"] for r in results])]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
