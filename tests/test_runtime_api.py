"""The Python runtime (``bsbr_export.runtime.load``) on an export of the bundled model: greedy
tokens against torch, seeded sampling alone and in a batch, fp16 against fp32, logprobs, stop
strings and tokens, streaming, every bad input, the README's Python section and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bsbr_export.errors import InputError
from bsbr_export.ops import state
from bsbr_export.runtime import Runtime, TorchStepper, api, load
from bsbr_export.util import log_softmax
from bsbr_export.runtime.text import REPLACEMENT

from test_text import _incomplete  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "gpt2-pystdlib"
MAX_LEN = 512  # of the test export; chunk L = 128
MARGIN = 1e-4  # a step whose top two torch logits lie closer ends a row's token comparison


def export_bundled(tmp_path_factory) -> Path:
    """The bundled model converted and exported (fp32 and fp16 graphs) once per session."""
    d = tmp_path_factory.getbasetemp() / "runtime_export"
    if not (d / ".done").exists():
        from bsbr_export.convert import convert, save_bsbr
        from bsbr_export.export import ExportSpec, export_onnx

        model = convert(BUNDLED)
        save_bsbr(model, d / "bsbr", tokenizer_from=BUNDLED)
        export_onnx(model, d, ExportSpec(max_seq_len=MAX_LEN))
        export_onnx(model, d, ExportSpec(max_seq_len=MAX_LEN, fp16=True))
        (d / ".done").touch()
    return d


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_bundled(tmp_path_factory)


@pytest.fixture(scope="module")
def rt(export_dir):
    return load(export_dir, threads=2)


@pytest.fixture(scope="module")
def torch_model(export_dir):
    from bsbr_export.convert import load_bsbr

    return load_bsbr(export_dir / "bsbr")


@pytest.fixture(scope="module")
def text(bundled_dir):
    return np.load(bundled_dir / "heldout_ids.npy").astype(np.int64)


class Recording:
    """An engine that records every call and the logits it returns."""

    def __init__(self, engine):
        self.engine, self.calls, self.logits = engine, [], []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def new_state(self, batch):
        self.calls.append("new_state")
        return self.engine.new_state(batch)

    def extend(self, st, rows, ids_list):
        self.calls.append("extend")
        z = self.engine.extend(st, rows, ids_list)
        self.logits.append(z.copy())
        return z

    def prefill(self, st, rows, ids_list, **options):
        """The prompts' last logits, recorded as one step (its extend calls are the engine's own)."""
        self.calls.append("prefill")
        z = self.engine.prefill(st, rows, ids_list, **options)
        self.logits.append(z.copy())
        return z

    def decode(self, st, tokens, active=None):
        self.calls.append("decode")
        z = self.engine.decode(st, tokens, active)
        self.logits.append(z.copy())
        return z


def recorded(rt) -> tuple[Runtime, Recording]:
    eng = Recording(rt.engine)
    return Runtime(eng, rt.tokenizer), eng


def torch_greedy(model, ids, n):
    """Torch greedy on one prompt alone: tokens, logits and top-two margin per step."""
    stepper = TorchStepper(model, len(ids) + n)
    z = stepper.prefill(np.asarray(ids, dtype=np.int64)[None])[0]
    toks, logits, margins = [], [], []
    for s in range(n):
        top2 = np.sort(z)[-2:]
        toks.append(int(z.argmax()))
        logits.append(z)
        margins.append(float(top2[1] - top2[0]))
        if s < n - 1:
            z = stepper.decode(np.array([toks[-1]]))[0]
    return toks, logits, margins


# --------------------------------------------------------------------------- parity and batching

def test_greedy_ragged_batch_equals_torch_alone(rt, torch_model, text):
    n = 24  # rows of 110 and 250 tokens cross a chunk boundary (L = 128) while decoding
    prompts = [text[:1], text[1000:1110], text[2000:2127], text[3000:3250]]
    rt_rec, eng = recorded(rt)
    res = rt_rec.generate([p.tolist() for p in prompts], max_new_tokens=n, return_details=True)
    compared = 0
    for i, p in enumerate(prompts):
        ref, ref_logits, margins = torch_greedy(torch_model, p, n)
        assert res[i].finish_reason == "length" and len(res[i].tokens) == n
        for s in range(n):
            err = np.abs(eng.logits[s][i] - ref_logits[s]).max()
            assert err <= 1e-4, f"row {i} step {s}: max|logits - torch| = {err:.2e}"
            if margins[s] < MARGIN:
                break
            assert res[i].tokens[s] == ref[s], f"row {i} (prompt of {len(p)}) differs from torch at step {s}"
            compared += 1
    print(f"[greedy vs torch] {compared} of {n * len(prompts)} tokens compared")
    assert compared >= n * len(prompts) // 2


def test_text_prompts_equal_their_token_ids(rt):
    prompts = ["def parse(self, text):\n", "import os"]
    ids = [rt.tokenizer.encode(p) for p in prompts]
    assert rt.generate(prompts, max_new_tokens=8) == rt.generate(ids, max_new_tokens=8)
    same = [[11, 12, 13], [7, 300, 9]]
    assert rt.generate(np.array(same), max_new_tokens=4) == rt.generate(same, max_new_tokens=4)


def test_seeded_sampling_of_a_row_equal_alone_and_in_a_batch(rt, text):
    prompts = [text[:5].tolist(), "class Parser:", text[100:240].tolist()]
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1)
    batch = rt.generate(prompts, seed=7, **kw)
    for i, p in enumerate(prompts):
        assert rt.generate([p], seed=7, **kw)[0] == batch[i], f"row {i} depends on the batch"
    per_row = rt.generate(prompts, seed=[3, 4, 5], **kw)
    for i, p in enumerate(prompts):
        assert rt.generate([p], seed=3 + i, **kw)[0] == per_row[i]
    assert rt.generate(prompts, seed=8, **kw) != batch  # the seed matters


def test_fp16_greedy_equals_fp32_where_the_margin_allows(rt, export_dir, text):
    rt16 = load(export_dir, precision="fp16", threads=2)
    prompts = [text[i:i + n].tolist() for i, n in ((0, 20), (700, 64), (1500, 130), (4000, 200))]
    n = 32
    r32, e32 = recorded(rt)
    r16, e16 = recorded(rt16)
    a, b = r32.generate(prompts, max_new_tokens=n), r16.generate(prompts, max_new_tokens=n)
    tol = max(4 * float(np.abs(e16.logits[0] - e32.logits[0]).max()), 1e-3)  # from the prompts' logits
    compared = 0
    for i in range(len(prompts)):
        for s in range(n):
            top2 = np.sort(e32.logits[s][i])[-2:]
            if top2[1] - top2[0] <= tol:
                break
            assert a[i][s] == b[i][s], f"row {i} step {s}: fp16 {b[i][s]} != fp32 {a[i][s]} (tol {tol:.3g})"
            compared += 1
    print(f"[fp16 vs fp32] tolerance {tol:.3g}: {compared} of {n * len(prompts)} tokens compared")
    assert compared >= n  # the comparison is not vacuous


def test_logprobs_are_log_softmax_of_the_logits_at_the_chosen_token(rt):
    r, eng = recorded(rt)
    res = r.generate(["def f(x):", "import"], max_new_tokens=12, temperature=1.0, top_k=20, seed=1,
                     return_details=True)
    for i, c in enumerate(res):
        for s, (t, lp) in enumerate(zip(c.tokens, c.logprobs)):
            # float32 exponentials (sampling.logsumexp): float32 rounding
            assert lp == pytest.approx(log_softmax(eng.logits[s][i])[t], abs=1e-6)
        assert c.prompt_tokens == len(rt.tokenizer.encode(["def f(x):", "import"][i]))


# --------------------------------------------------------------------------- stop, stream, text

def test_stop_strings_and_stop_tokens_with_finish_reason(rt):
    prompts = ["def parse(self, text):", "import os\nimport sys\n"]
    full = rt.generate(prompts, max_new_tokens=32, return_details=True)
    t0 = full[0].text
    stop = t0[len(t0) // 2:len(t0) // 2 + 3]
    cut = t0.find(stop)
    res = rt.generate(prompts, max_new_tokens=32, stop=[stop], return_details=True)
    assert res[0].finish_reason == "stop" and res[0].text == t0[:cut]
    assert res[0].tokens == full[0].tokens[:len(res[0].tokens)] and len(res[0].tokens) < 32
    assert stop in rt.tokenizer.decode(res[0].tokens)  # the token completing the stop string is kept
    if stop not in full[1].text:
        assert res[1].finish_reason == "length" and res[1].tokens == full[1].tokens
    tok = full[0].tokens[5]
    res = rt.generate(prompts[:1], max_new_tokens=32, stop_tokens=[tok], return_details=True)[0]
    k = full[0].tokens.index(tok)
    assert res.finish_reason == "stop" and res.tokens == full[0].tokens[:k + 1]
    assert res.text == rt.tokenizer.decode(full[0].tokens[:k])  # the stop token adds no text
    streamed = "".join(rt.stream(prompts[0], max_new_tokens=32, stop=[stop]))
    assert streamed == t0[:cut]


def test_stream_equals_generate(rt):
    kw = dict(max_new_tokens=20, temperature=0.8, seed=2)
    pieces = list(rt.stream("def main():", **kw))
    res = rt.generate(["def main():"], return_details=True, **kw)[0]
    assert "".join(pieces) == res.text and all(pieces)


class Scripted:
    """An engine that emits a fixed token sequence (one-hot logits)."""

    def __init__(self, tokens, vocab, max_len=512):
        self.tokens, self.vocab_size, self.max_len, self.config = list(tokens), vocab, max_len, {}

    def _z(self, st):
        z = np.zeros((len(st), self.vocab_size), np.float32)
        for r in range(len(st)):
            z[r, self.tokens[min(st[r], len(self.tokens) - 1)]] = 10
            st[r] += 1
        return z

    def new_state(self, batch):
        return [0] * batch

    def extend(self, st, rows, ids_list):
        return self._z(st)

    prefill = extend

    def decode(self, st, tokens, active=None):
        return self._z(st)


def test_streamed_pieces_never_split_a_utf8_character(rt):
    text = "déjà vu — 日本語 🙂🐍 ∑x²"
    ids = rt.tokenizer.encode(text)
    assert any(_incomplete(rt.tokenizer.token_bytes(t)) for t in ids)  # some token holds part of a character
    r = Runtime(Scripted(ids, rt.vocab_size), rt.tokenizer)
    pieces = list(r.stream([1, 2], max_new_tokens=len(ids)))
    assert "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces)


def test_zero_new_tokens(rt):
    assert rt.generate(["x", [1, 2]], max_new_tokens=0) == [[], []]
    res = rt.generate(["x"], max_new_tokens=0, return_details=True)[0]
    assert res.finish_reason == "length" and res.tokens == [] and res.prompt_tokens == 1


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("prompts, kw, msg", [
    ([""], {}, "empty"),
    ([[]], {}, "empty"),
    (["x", []], {}, "empty"),
    ([[1] * (MAX_LEN + 1)], {}, "over the export's maximum"),
    ([[1] * 500], dict(max_new_tokens=20), "would overflow the state capacity"),
    (["x"], dict(temperature=-0.5), "temperature"),
    (["x"], dict(temperature=1.0, top_p=0.0), "top_p"),
    (["x"], dict(temperature=1.0, top_p=1.2), "top_p"),
    (["x"], dict(temperature=1.0, top_k=0), "top_k"),
    ([[9999999]], {}, "token ids must lie"),
    ("a bare str", {}, "list"),
    (["x"], dict(stop=[""]), "stop"),
    (["x"], dict(stop_tokens=[-1]), "stop tokens"),
])
def test_bad_generation_input_one_line_before_any_ort_call(rt, prompts, kw, msg):
    r, eng = recorded(rt)
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(InputError) as e:
        r.generate(prompts, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)
    if isinstance(prompts, list) and len(prompts) == 1:
        with pytest.raises(InputError):
            next(r.stream(prompts[0], **kw))
    assert eng.calls == []  # nothing ran, nothing came out


def _linked_copy(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip and not f.name.startswith("."):
            (dst / f.name).symlink_to(f)
    return dst


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if load reaches ONNX Runtime."""
    def boom(*a, **k):
        raise AssertionError("load opened ONNX Runtime before rejecting its input")
    monkeypatch.setattr(api, "Engine", boom)


def _load_error(path, **kw) -> str:
    with pytest.raises(InputError) as e:
        load(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_provider(export_dir, no_engine):
    assert "unknown execution provider 'NoSuchExecutionProvider'" in _load_error(
        export_dir, providers=["NoSuchExecutionProvider"])


def test_state_memory_is_checked(export_dir, rt):
    """load's state_memory: a bad value fails before ORT; a generate whose rows would hold more
    state than it allows fails in one line before any ORT call; one that fits runs."""
    assert "state_memory" in _load_error(export_dir, state_memory=-1)
    eng = Recording(rt.engine)
    row = rt.engine.row_bytes(0) + rt.engine.bank_bytes(3 + 40)
    small = api.Runtime(eng, rt.tokenizer, state_memory=2 * row - 1)
    with pytest.raises(InputError, match="state_memory") as e:
        small.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=40)
    assert "\n" not in str(e.value) and eng.calls == []
    assert len(small.generate([[1, 2, 3]], max_new_tokens=40)[0]) == 40


def test_missing_graph(export_dir, tmp_path, no_engine):
    d = _linked_copy(export_dir, tmp_path / "x", skip=("decode.onnx",))
    assert "missing graph decode.onnx" in _load_error(d)


def test_empty_graph_file(export_dir, tmp_path, no_engine):
    """A 0-byte graph (an interrupted copy) is named as such, through load and the generate command."""
    d = _linked_copy(export_dir, tmp_path / "x", skip=("decode.onnx",))
    (d / "decode.onnx").write_bytes(b"")
    assert _load_error(d).startswith(f"{d / 'decode.onnx'}: empty file (0 bytes)")
    r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "generate", str(d), "def f("], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stdout[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {d / 'decode.onnx'}: empty file (0 bytes)"), lines


def _weights_file(export_dir, graph: str) -> str:
    """The weights file a graph's external-data records name (one file per export and precision)."""
    (name,) = {loc for loc, _, _ in api._external_data(export_dir / graph)}
    return name


def test_missing_weights_file(export_dir, tmp_path, no_engine):
    name = _weights_file(export_dir, "close.onnx")
    d = _linked_copy(export_dir, tmp_path / "x", skip=(name,))
    assert f"missing weights file {name}" in _load_error(d)


@pytest.mark.parametrize("delta", [-4096, 1])
def test_weights_file_of_the_wrong_size(export_dir, tmp_path, no_engine, delta):
    name = _weights_file(export_dir, "decode.onnx")
    d = _linked_copy(export_dir, tmp_path / "x", skip=(name,))
    data = (export_dir / name).read_bytes()
    (d / name).write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    msg = _load_error(d)
    assert name in msg and f"{len(data) + delta} bytes" in msg and str(len(data)) in msg


def test_export_of_another_format_version_refused(export_dir, tmp_path, no_engine):
    import onnx

    d = tmp_path / "x"
    graphs = [f.name for f in export_dir.glob("*.onnx")]
    _linked_copy(export_dir, d, skip=graphs)
    for g in graphs:
        m = onnx.load(str(export_dir / g), load_external_data=False)
        for p in m.metadata_props:
            if p.key == "bsbr_export":
                meta = json.loads(p.value)
                meta["state"]["format"] = state.FORMAT + 1
                p.value = json.dumps(meta)
        (d / g).write_bytes(m.SerializeToString())
    msg = _load_error(d)
    assert f"state format {state.FORMAT + 1}" in msg and f"reads format {state.FORMAT}" in msg


def test_other_load_errors(export_dir, tmp_path, no_engine):
    assert "no such export directory" in _load_error(tmp_path / "nowhere")
    assert "precision" in _load_error(export_dir, precision="int4")
    assert "threads" in _load_error(export_dir, threads=0)
    assert "optimization" in _load_error(export_dir, optimization="max")
    d = _linked_copy(export_dir, tmp_path / "fp32only", skip=("decode_fp16.onnx",))
    assert "missing graph decode_fp16.onnx" in _load_error(d, precision="fp16")


# --------------------------------------------------------------------------- README and CLI

def first_code_block(path, heading: str) -> str:
    """The first code block (indented four spaces) under ``heading`` in the Markdown file ``path``."""
    s = "\n" + (ROOT / path).read_text()
    sec = s[s.index(f"\n{heading}\n"):]
    lines, started = [], False
    for line in sec.splitlines()[2:]:
        if line.startswith("    "):
            started = True
            lines.append(line[4:])
        elif started and not line.strip():
            lines.append("")
        elif started:
            break
    return "\n".join(lines)


@pytest.mark.parametrize("path, heading", [("README.md", "## Python"), ("docs/python.md", "# The Python runtime")])
def test_python_examples_run_as_written(export_dir, tmp_path, path, heading):
    code = first_code_block(path, heading)
    assert "from bsbr_export.runtime import load" in code
    env = {**os.environ, "BSBR_EXPORT_DIR": str(export_dir)}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "length" in p.stdout or "stop" in p.stdout


def test_cli_generate_streams_and_batches(export_dir, rt, tmp_path):
    from click.testing import CliRunner

    from bsbr_export.cli import main

    out = CliRunner().invoke(main, ["generate", str(export_dir), "def parse(", "--max-new-tokens", "12",
                                    "--threads", "2"])
    assert out.exit_code == 0, out.output
    ref = rt.generate(["def parse("], max_new_tokens=12, stop_tokens=[rt.eos_token_id], return_details=True)[0]
    assert out.output == "def parse(" + ref.text + "\n"
    torch_out = CliRunner().invoke(main, ["generate", str(export_dir), "def parse(", "--max-new-tokens", "12",
                                          "--backend", "torch"])
    assert torch_out.exit_code == 0 and torch_out.output == out.output
    f = tmp_path / "prompts.txt"
    f.write_text("def f(\nimport os\n")
    out = CliRunner().invoke(main, ["generate", str(export_dir), "--prompts-file", str(f), "--max-new-tokens", "6",
                                    "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"])
    assert out.exit_code == 0, out.output
    assert sorted(line[:3] for line in out.output.splitlines() if line.startswith("[")) == ["[0]", "[1]"]
    out = CliRunner().invoke(main, ["generate", str(export_dir), "x", "--max-new-tokens", str(MAX_LEN)])
    assert out.exit_code == 1 and "would overflow the state capacity" in out.output


def test_external_data_records_of_every_tensor(tmp_path):
    """A graph's external-data records: initializers (of the graph and of subgraphs) and tensor
    attributes (of nodes, subgraph nodes and functions); tensors stored inline are not records."""
    import onnx
    from onnx import TensorProto, helper

    def ext(name, loc, off, length):
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", off), ("length", length)):
            t.external_data.add(key=k, value=str(v))
        return t

    then = helper.make_graph([helper.make_node("Constant", [], ["c"], value=ext("sub_attr", "w.data", 32, 4))],
                             "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
                             initializer=[ext("sub_init", "w.data", 16, 4)])
    nodes = [helper.make_node("Constant", [], ["k"], value=ext("attr", "w.data", 8, 4)),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then),
             helper.make_node("F", ["y"], ["z"], domain="local")]
    fn = helper.make_function("local", "F", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["b"], value=ext("fn_attr", "v.data", 0, 8))],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
                              initializer=[ext("init", "w.data", 0, 8), helper.make_tensor("inline", 1, [1], [1.0])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("local", 1)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert sorted(api._external_data(tmp_path / "g.onnx")) == sorted([
        ("w.data", 0, 8), ("w.data", 16, 4), ("w.data", 16, 4), ("w.data", 8, 4), ("w.data", 32, 4),
        ("w.data", 32, 4), ("v.data", 0, 8)])
    for key, value, msg in (("offset", "-8", "offset must be non-negative"), ("length", None, "without a length")):
        bad = ext("bad", "w.data", 0, 8)
        entry = next(e for e in bad.external_data if e.key == key)
        if value is None:
            bad.external_data.remove(entry)
        else:
            entry.value = value
        model.graph.initializer.append(bad)
        onnx.save(model, str(tmp_path / "bad.onnx"))
        with pytest.raises(InputError, match=msg):
            api._external_data(tmp_path / "bad.onnx")
        model.graph.initializer.pop()
