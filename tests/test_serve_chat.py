"""``bsbr-export serve``: chat completions (with the template in tests/data), /tokenize and
/detokenize, and the sampling fields clients send (logit_bias, min_tokens, ignore_eos,
skip_special_tokens, top_k, repetition_penalty, stream_options), spoken to with the official
``openai`` client and raw HTTP. Greedy outputs are checked against the engine run alone
(``oracle`` of test_serve)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra has it)")
httpx = pytest.importorskip("httpx")
pytest.importorskip("jinja2")

from test_serve import MAX_LEN, MODEL, ROOT, TIMEOUT, Running, assert_same, export_dir, oracle  # noqa: F401

from bsbr_export.runtime.engine import Engine
from bsbr_export.runtime.sampling import SamplingOptions, choose_rows, penalise
from bsbr_export.serve.penalties import apply_penalties, processed_logits
from bsbr_export.serve.scheduler import GenRequest

TEMPLATE = ROOT / "tests" / "data" / "chat_template.jinja"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "read a config file"}]
RENDERED = "# You write Python.\n# Q: read a config file\n# A:"


@pytest.fixture(scope="module")
def chat_server(export_dir):
    s = Running(export_dir, max_batch=4, max_queue=16, prefill_chunk=64, chat_template=str(TEMPLATE))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain_server(export_dir):
    s = Running(export_dir, max_batch=2, max_queue=8, prefill_chunk=64)
    yield s
    s.stop()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT)


def sse(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# --------------------------------------------------------------------------- chat

def test_chat_with_the_openai_client(chat_server, oracle):
    c, tok = chat_server.client(), oracle.tokenizer
    ids = tok.encode(RENDERED)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, logprobs=True,
                                  top_logprobs=2)
    ch = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert ch.message.role == "assistant"
    assert_same(oracle, ids, 24, ch.message.content, ch.finish_reason)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    lps = ch.logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in lps)
    assert all(max(t.logprob for t in e.top_logprobs) == pytest.approx(e.logprob) for e in lps)  # greedy
    assert "".join(e.token for e in lps).startswith(ch.message.content[:8])
    # the same through max_completion_tokens, streamed: the deltas add up to the same text
    pieces, roles, reasons, usage, streamed_lps = [], [], [], None, []
    for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, logprobs=True,
                                           top_logprobs=2):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            d = chunk.choices[0].delta
            roles.append(d.role)
            pieces.append(d.content or "")
            reasons.append(chunk.choices[0].finish_reason)
            streamed_lps += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
        else:
            usage = chunk.usage
    assert "".join(pieces) == ch.message.content
    assert [e.logprob for e in streamed_lps] == pytest.approx([e.logprob for e in lps], abs=1e-5)
    assert roles[0] == "assistant" and reasons[-1] == ch.finish_reason and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == len(ids)
    # vLLM's add_generation_prompt: false renders no "# A:"
    short = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                      extra_body={"add_generation_prompt": False})
    assert short.usage.prompt_tokens == len(tok.encode(RENDERED[:-len("# A:")]))


def test_chat_streams_usage_on_every_chunk(chat_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "sort a list"}]}],
            "max_completion_tokens": 12, "stream": True, "ignore_eos": True, "stop": None,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = sse(chat_server, "/v1/chat/completions", body)
    assert all(e["usage"] is not None for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 12 and counts[0] == 0
    assert {e["usage"]["prompt_tokens"] for e in events} == {events[-1]["usage"]["prompt_tokens"]}
    assert events[-1]["choices"] == [] and events[-2]["choices"][0]["finish_reason"] == "length"
    # without include_usage, continuous_usage_stats adds nothing (as vLLM)
    events = sse(chat_server, "/v1/chat/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in events)


def test_chat_without_a_template_is_400_naming_the_option(plain_server):
    with pytest.raises(openai.BadRequestError) as e:
        plain_server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert "--chat-template" in str(e.value) and e.value.status_code == 400
    r = post(plain_server, "/tokenize", {"messages": MESSAGES})
    assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]


CHAT_BAD = [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}], "foo": 1}, "foo"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content.0"),
    ({"model": MODEL, "messages": MESSAGES, "n": 0}, "n"),
    ({"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": MESSAGES, "max_completion_tokens": MAX_LEN}, "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"99999": 5}}, "logit_bias"),
]


@pytest.mark.parametrize("body,param", CHAT_BAD, ids=[b[1] for b in CHAT_BAD])
def test_bad_chat_requests_name_the_field(chat_server, body, param):
    before = chat_server.sched.steps.copy()
    r = post(chat_server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "\n" not in err["message"]
    assert chat_server.sched.steps == before


def test_chat_n_choices_equal_single_seeded_requests(chat_server):
    c = chat_server.client()
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**args, n=2, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens == 16
    for j, ch in enumerate(r.choices):  # choice j draws what a request seeded seed + j draws
        alone = c.chat.completions.create(**args, seed=5 + j).choices[0].message.content
        assert ch.message.content == alone


def test_chat_ignores_fields_that_change_nothing(chat_server):
    base = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    want = post(chat_server, "/v1/chat/completions", base).json()["choices"][0]["message"]["content"]
    extra = {"user": "u1", "store": False, "metadata": {"k": "v"}, "parallel_tool_calls": False,
             "tool_choice": "none", "response_format": {"type": "text"}, "service_tier": "auto", "top_k": -1}
    r = post(chat_server, "/v1/chat/completions", {**base, **extra})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


# --------------------------------------------------------------------------- tokenize / detokenize

def test_tokenize_then_detokenize_round_trips_heldout_text(chat_server, oracle, heldout_ids):
    tok = oracle.tokenizer
    text = tok.decode(heldout_ids[1000:1700])
    r = post(chat_server, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200
    got = r.json()
    assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"]) and got["max_model_len"] == MAX_LEN
    assert "".join(got["token_strs"]) == text
    back = post(chat_server, "/detokenize", {"model": MODEL, "tokens": got["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # messages: the chat template's prompt, as the chat route counts it
    m = post(chat_server, "/tokenize", {"messages": MESSAGES}).json()
    assert m["tokens"] == tok.encode(RENDERED) and m["token_strs"] is None
    # vLLM's continue_final_message: the prompt ends inside the last (assistant) message
    msgs = [*MESSAGES, {"role": "assistant", "content": "def read("}]
    m = post(chat_server, "/tokenize", {"messages": msgs, "add_generation_prompt": False,
                                        "continue_final_message": True}).json()
    assert m["tokens"] == tok.encode(RENDERED + " def read(")
    # special tokens survive the round trip
    eos = tok.eos_token_id
    assert post(chat_server, "/detokenize", {"tokens": [eos]}).json()["prompt"] == "<|endoftext|>"


@pytest.mark.parametrize("body,param,words", [
    ({"tokens": [1, 8192]}, "tokens", "8192"), ({"tokens": [-1]}, "tokens", "-1"),
    ({"tokens": ["a"]}, "tokens.0", "tokens.0"), ({"tokens": [1], "model": "gpt-4"}, "model", "gpt-4")])
def test_detokenize_bad_ids_are_a_clear_400(chat_server, body, param, words):
    r = post(chat_server, "/detokenize", body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    r = post(chat_server, "/tokenize", {"prompt": "x", "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# --------------------------------------------------------------------------- sampling fields

def _complete(server, **kw):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "def parse(", "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0], r.json()["usage"]


def test_logit_bias_forces_and_forbids_tokens(chat_server, oracle):
    tok = oracle.tokenizer
    forced = tok.encode(" zip")[0]
    for temp in (0, 1.2):
        ch, usage = _complete(chat_server, max_tokens=5, temperature=temp, seed=3, logit_bias={str(forced): 100})
        assert ch["text"] == tok.decode([forced] * 5) and usage["completion_tokens"] == 5
    greedy = oracle(tok.encode("def parse("), 4)[2]
    ch, _ = _complete(chat_server, max_tokens=4, logit_bias={str(greedy[0]): -100}, logprobs=0)
    assert tok.encode(ch["text"])[:1] != greedy[:1] or ch["text"] == ""
    # chat too
    r = post(chat_server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                   "logit_bias": {str(forced): 100}})
    assert r.json()["choices"][0]["message"]["content"] == tok.decode([forced] * 3)


def test_min_tokens_ignore_eos_and_skip_special_tokens(chat_server, oracle):
    tok = oracle.tokenizer
    eos = {str(tok.eos_token_id): 100}  # the model would end at once
    ch, usage = _complete(chat_server, max_tokens=10, logit_bias=eos)
    assert (ch["finish_reason"], ch["text"], usage["completion_tokens"]) == ("stop", "", 1)
    ch, usage = _complete(chat_server, max_tokens=10, logit_bias=eos, min_tokens=4)
    assert ch["finish_reason"] == "stop" and usage["completion_tokens"] == 5 and ch["text"]
    ch, usage = _complete(chat_server, max_tokens=6, logit_bias=eos, ignore_eos=True)
    assert (ch["finish_reason"], ch["text"], usage["completion_tokens"]) == ("length", "", 6)
    ch, _ = _complete(chat_server, max_tokens=3, logit_bias=eos, ignore_eos=True, skip_special_tokens=False)
    assert ch["text"] == "<|endoftext|>" * 3
    # min_tokens holds back stop strings too: the stop counts from the min_tokens-th token on
    x = tok.encode(" zip")[0]
    bias = {str(x): 100}
    ch, usage = _complete(chat_server, max_tokens=8, logit_bias=bias, stop=["zip"])
    assert (ch["finish_reason"], ch["text"], usage["completion_tokens"]) == ("stop", " ", 1)
    ch, usage = _complete(chat_server, max_tokens=8, logit_bias=bias, stop=["zip"], min_tokens=3)
    assert (ch["finish_reason"], ch["text"], usage["completion_tokens"]) == ("stop", " zip zip ", 3)
    events = sse(chat_server, "/v1/completions", {"model": MODEL, "prompt": "def parse(", "max_tokens": 8,
                                                  "logit_bias": bias, "stop": ["zip"], "min_tokens": 3,
                                                  "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == " zip zip "


def test_top_k_and_repetition_penalty_match_the_engine_alone(chat_server, oracle, export_dir):
    tok = oracle.tokenizer
    ids = tok.encode("import os\n")
    greedy = oracle(ids, 16, stop_eos=False)[0]
    ch, _ = _complete(chat_server, prompt=ids, max_tokens=16, temperature=1.5, seed=1, top_k=1, ignore_eos=True)
    assert ch["text"] == greedy
    # repetition penalty 1.3, greedy: the lone engine with the same penalty, step by step
    eng = Engine(export_dir, threads=1)
    st = eng.new_state(1)
    lg, out = eng.extend(st, [0], [np.asarray(ids, np.int64)])[0], []
    for _ in range(16):
        z = penalise(lg, np.asarray(ids + out, np.int64), 1.3)
        out.append(int(z.argmax()))
        lg = eng.decode(st, np.array(out[-1:], np.int64))[0]
    ch, _ = _complete(chat_server, prompt=ids, max_tokens=16, repetition_penalty=1.3, ignore_eos=True)
    assert ch["text"] == tok.decode(out) != greedy


def test_completions_stream_usage_on_every_chunk(chat_server):
    events = sse(chat_server, "/v1/completions", {
        "model": MODEL, "prompt": "x = ", "max_tokens": 5, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in events][-1] == 5
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events) and events[-1]["choices"] == []  # "x", " =", " "


def test_processed_logits_vectorised_equals_row_by_row():
    rng = np.random.default_rng(0)
    V, sink = 50, (lambda ev: None)
    logits = rng.normal(size=(5, V)).astype(np.float32)
    reqs = [GenRequest(np.arange(3), 8, sink) for _ in range(5)]
    reqs[0].counts = rng.integers(0, 3, V)
    reqs[0].presence_penalty, reqs[0].frequency_penalty = 0.5, 0.25
    reqs[1].logit_bias = (np.array([3, 7]), np.array([100, -5], np.float32))
    reqs[2].min_tokens, reqs[2].stop_tokens, reqs[2].tokens = 2, frozenset({4, 9}), [1]
    reqs[3].min_tokens, reqs[3].stop_tokens, reqs[3].tokens = 2, frozenset({4}), [1, 2]  # reached: no change
    reqs[4].counts = np.zeros(V, np.int64)  # asks for nothing
    out = processed_logits(logits, reqs)
    want = logits.copy()
    want[0] = apply_penalties(logits[0], reqs[0].counts, 0.5, 0.25)
    want[1, [3, 7]] += [100, -5]
    want[2, [4, 9]] = -np.inf
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert processed_logits(logits, reqs[3:]) is None
    got = choose_rows(logits, SamplingOptions(), processed=out).tokens  # greedy rows: argmax of what comes out
    assert got[1] == 3 and got[2] not in (4, 9) and list(got) == list(out.argmax(-1))


def test_cli_serve_bad_chat_template_fails_in_one_line(export_dir, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for f, msg in ((bad, "not a valid Jinja template"), (tmp_path / "none.jinja", "cannot be read")):
        r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--chat-template",
                            str(f), "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr[-500:]


def test_chat_template_from_the_tokenizer_config(tmp_path):
    """Without --chat-template the export's tokenizer_config.json gives the template (a string, or
    OpenAI-style named templates: "default"); --chat-template wins over it; none: None."""
    from bsbr_export.serve.app import ServeConfig
    from bsbr_export.serve.chat import load_template

    msgs = [{"role": "user", "content": "hi"}]
    assert load_template(ServeConfig(str(tmp_path))) is None
    cfg = tmp_path / "bsbr" / "tokenizer_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_template(ServeConfig(str(tmp_path))).render(messages=msgs) == "hi!"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D{{ messages|length }}"}]}))
    assert load_template(ServeConfig(str(tmp_path))).render(messages=msgs) == "D1"
    t = load_template(ServeConfig(str(tmp_path), chat_template=str(TEMPLATE)))
    assert t.render(messages=msgs, add_generation_prompt=True) == "# Q: hi\n# A:"


def test_detokenizer_arms_stop_strings_late_and_writes_special_tokens(bundled_dir):
    """``Detokenizer.arm`` looks for stop strings only in the text from then on (min_tokens);
    ``skip_special=False`` writes special tokens' text."""
    from bsbr_export.runtime.text import Tokenizer

    tok = Tokenizer.from_dir(bundled_dir)
    x = tok.encode(" zip")[0]
    d = tok.detokenizer(())
    pieces = [d.push(x)[0] for _ in range(2)]
    d.arm(["zip"])
    piece, hit = d.push(x)
    assert "".join(pieces) + piece == " zip zip " and hit and d.text == " zip zip "
    d = tok.detokenizer((), skip_special=False)
    text = "".join(d.push(t)[0] for t in (x, tok.eos_token_id)) + d.finish()
    assert text == " zip<|endoftext|>"
    d = tok.detokenizer(())
    assert "".join(d.push(t)[0] for t in (x, tok.eos_token_id)) + d.finish() == " zip"
