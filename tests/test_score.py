"""Prompt log-probabilities in Python: ``Runtime.score`` and ``scoring.score_prefill`` against the
converted torch model's log-softmax on the same tokens (bundled model, chunk 32: prompt lengths
that are not multiples of the chunk and longer than one piece)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bsbr_export.errors import InputError
from bsbr_export.runtime import TokenScores, load
from bsbr_export.runtime.scoring import PromptScorer, log_softmax_pick, score_prefill

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "gpt2-pystdlib"
CHUNK, MAX_LEN = 32, 512
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(bundled_dir):
    from bsbr_export.convert import convert

    return convert(bundled_dir, chunk_size=CHUNK).eval()


@pytest.fixture(scope="module")
def score_export(converted, bundled_dir, tmp_path_factory):
    from bsbr_export.convert import save_bsbr
    from bsbr_export.export import ExportSpec, export_onnx

    d = tmp_path_factory.mktemp("score_export")
    save_bsbr(converted, d / "bsbr", tokenizer_from=bundled_dir)
    export_onnx(converted, d, ExportSpec(max_seq_len=MAX_LEN))
    return d


@pytest.fixture(scope="module")
def rt(score_export):
    return load(score_export, threads=1)


def torch_logprobs(model, ids, k=0):
    """log_softmax of the torch model's logits: (T,) log p(ids[t] | ids[:t]) (NaN at 0) and the top k."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.as_tensor(ids)[None].long())[0].double(), -1)
    out = np.full(len(ids), np.nan)
    out[1:] = lp[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:]).long()].numpy()
    top = lp[:-1].topk(k, -1) if k else None
    return out, top


def test_score_equals_torch_log_softmax(rt, converted, heldout_ids):
    # 45: one piece, not a multiple of 32; 300: crosses nine chunk closes; 77 tokens as text
    texts = [heldout_ids[:45], heldout_ids[1000:1300], rt.tokenizer.decode(heldout_ids[5000:5077])]
    got = rt.score([t if isinstance(t, str) else t.tolist() for t in texts], top_logprobs=3)
    assert len(got) == 3 and all(isinstance(s, TokenScores) for s in got)
    for s, t in zip(got, texts):
        ids = np.asarray(rt.tokenizer.encode(t) if isinstance(t, str) else t)
        assert s.tokens.tolist() == ids.tolist() and np.isnan(s.logprobs[0])
        ref, top = torch_logprobs(converted, ids, k=3)
        err = np.abs(s.logprobs[1:] - ref[1:]).max()
        print(f"T={len(ids)}: max|score - torch| = {err:.2e}")
        assert err <= TOL
        assert s.total == pytest.approx(ref[1:].sum(), abs=TOL * len(ids))
        assert np.abs(s.top_logprobs[1:] - top.values.numpy()).max() <= TOL
        # the top token: torch's, or one whose torch log-probability ties it within the tolerance
        for t in np.flatnonzero(s.top_ids[1:, 0] != top.indices[:, 0].numpy()):
            with torch.no_grad():
                row = torch.log_softmax(converted(torch.as_tensor(ids[:t + 1])[None].long())[0, t].double(), -1)
            assert float(top.values[t, 0] - row[int(s.top_ids[t + 1, 0])]) <= 2 * TOL
        assert s.top(0) is None and list(s.top(1)) == s.top_ids[1].tolist()


def test_score_in_small_pieces_and_batched_rows_is_the_same(rt, converted, heldout_ids):
    """Pieces of 50 tokens in all (ragged rows share each call; 50 is no multiple of 32), rows
    scored together equal each row alone, and the last logits equal the plain prefill's."""
    eng = rt.engine
    prompts = [heldout_ids[2000:2213], heldout_ids[3000:3101], heldout_ids[4000:4033]]
    st = eng.new_state(3)
    last, got = score_prefill(eng, st, [0, 1, 2], prompts, top=0, max_tokens=50)
    ref_last = eng.prefill(eng.new_state(3), [0, 1, 2], prompts)
    assert np.abs(last - ref_last).max() <= TOL
    assert st.positions.tolist() == [213, 101, 33]
    for s, ids in zip(got, prompts):
        ref, _ = torch_logprobs(converted, ids)
        assert np.abs(s.logprobs[1:] - ref[1:]).max() <= TOL and s.top_ids is None
    alone = rt.score([prompts[1].tolist()])[0]
    assert np.abs(alone.logprobs[1:] - got[1].logprobs[1:]).max() <= TOL
    # the state after scoring continues generation as after a prefill
    tok = np.array([int(last[i].argmax()) for i in range(3)])
    assert np.abs(eng.decode(st, tok) - eng.decode(_prefilled(eng, prompts), tok)).max() <= TOL


def _prefilled(eng, prompts):
    st = eng.new_state(len(prompts))
    eng.prefill(st, list(range(len(prompts))), prompts)
    return st


def test_scorer_log_softmax_blocks_and_tops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(150, 40)).astype(np.float32) * 4
    targets = rng.integers(0, 40, 150)
    lp, ids, tops = log_softmax_pick(logits, targets, 5)  # 150 rows: three blocks of 64
    ref = torch.log_softmax(torch.as_tensor(logits).double(), -1)
    assert np.abs(lp - ref[torch.arange(150), torch.as_tensor(targets)].numpy()).max() < 1e-5
    assert np.abs(tops - ref.topk(5, -1).values.numpy()).max() < 1e-5
    assert (ids == ref.topk(5, -1).indices.numpy()).all()
    lp1, ids1, tops1 = log_softmax_pick(logits, targets, 1)  # the argmax path
    assert (lp1 == lp).all() and (ids1[:, 0] == ids[:, 0]).all() and np.abs(tops1[:, 0] - tops[:, 0]).max() < 1e-12
    s = PromptScorer(np.arange(10) % 40, top=2)
    s.add(logits[:4])
    s.add(logits[4:10])  # the last position predicts what follows the prompt: not scored
    r = s.result()
    assert np.isnan(r.logprobs[0]) and not np.isnan(r.logprobs[1:]).any()
    assert r.logprobs[4] == pytest.approx(ref[3, 4].item(), abs=1e-5)  # position 3's logits score token 4


def test_score_refuses_bad_input_in_one_line(rt, monkeypatch):
    for kwargs, word in (({"top_logprobs": -1}, "top_logprobs"), ({"batch": 0}, "batch")):
        with pytest.raises(InputError, match=word) as e:
            rt.score(["x = 1"], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="empty"):
        rt.score([[]])
    from bsbr_export.runtime import scoring

    monkeypatch.setattr(scoring, "can_score", lambda engine: False)  # an export made before extend took logit_rows
    with pytest.raises(InputError, match="re-export") as e:
        rt.score(["x = 1"])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the server: echo with logprobs

@pytest.fixture(scope="module")
def server(score_export):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from test_serve import Running

    s = Running(score_export, max_batch=4, max_queue=16, prefill_chunk=64)
    yield s
    s.stop()


def _post(server, body):
    r = server.post(body)
    assert r.status_code == 200, r.text
    return r.json()


def _token_bytes(s: str) -> bytes:
    """A token string back to its bytes ("bytes:\\xNN..." or text)."""
    return bytes(int(h, 16) for h in s[len("bytes:"):].split("\\x")[1:]) if s.startswith("bytes:") else s.encode()


def test_echo_logprobs_as_lm_eval_sends_them(server, rt, converted, heldout_ids):
    """lm-eval's loglikelihood body, on a 200-token prompt fed in pieces of 64 while other
    requests run: the prompt's log-probabilities equal torch's, null first, then the generated
    token's (greedy: the prefill's argmax); max_tokens 0 gives the prompt's alone."""
    from concurrent.futures import ThreadPoolExecutor

    ids = heldout_ids[7000:7200]
    body = {"model": "pystdlib", "prompt": ids.tolist(), "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}
    with ThreadPoolExecutor(3) as ex:  # batched with a plain generation and a second echo
        other = ex.submit(_post, server, {"model": "pystdlib", "prompt": "def f(", "max_tokens": 20})
        zero = ex.submit(_post, server, body | {"max_tokens": 0})
        out = _post(server, body)
    assert other.result()["choices"][0]["finish_reason"] in ("stop", "length")
    ch = out["choices"][0]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 201
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref, top = torch_logprobs(converted, ids, k=1)
    err = np.abs(np.array(lp["token_logprobs"][1:200]) - ref[1:]).max()
    print(f"server echo: max|logprob - torch| = {err:.2e}")
    assert err <= TOL
    for t in range(1, 200):  # top-1 and the prompt's own token (when it is not the top one)
        d = lp["top_logprobs"][t]
        assert lp["tokens"][t] in d and len(d) == (1 if d[lp["tokens"][t]] == max(d.values()) else 2)
        assert max(d.values()) == pytest.approx(float(top.values[t - 1, 0]), abs=TOL)
    st = rt.engine.new_state(1)
    assert lp["tokens"][200] == rt.tokenizer.decode([int(rt.engine.extend(st, [0], [ids])[0].argmax())])
    assert ch["text"].startswith(rt.tokenizer.decode(ids.tolist()))
    assert {k: out["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
        {"prompt_tokens": 200, "completion_tokens": 1, "total_tokens": 201}
    # the prefix cache now holds this prompt; a scored prompt is computed whole all the same
    again = _post(server, body)
    assert again["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) == 0
    assert np.abs(np.array(again["choices"][0]["logprobs"]["token_logprobs"][1:200]) - ref[1:]).max() <= TOL
    z = zero.result()
    assert z["choices"][0]["finish_reason"] == "length" and z["usage"]["completion_tokens"] == 0
    assert z["choices"][0]["text"] == rt.tokenizer.decode(ids.tolist())
    zl = z["choices"][0]["logprobs"]
    assert zl["tokens"] == lp["tokens"][:200] and zl["token_logprobs"][0] is None  # pieces differ: rounding only
    assert np.abs(np.array(zl["token_logprobs"][1:]) - lp["token_logprobs"][1:200]).max() <= TOL


def test_echo_logprobs_streamed_equal_the_answer(server):
    httpx = pytest.importorskip("httpx")
    body = {"model": "pystdlib", "prompt": "import os\nimport sys\n", "echo": True, "logprobs": 2, "max_tokens": 6,
            "temperature": 0}
    whole = _post(server, body)["choices"][0]
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:])["choices"][0])
    assert events[0]["text"] == "import os\nimport sys\n" and events[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(e["text"] for e in events) == whole["text"]
    merged = {k: sum((e["logprobs"][k] for e in events if e["logprobs"]), []) for k in whole["logprobs"]}
    assert merged == whole["logprobs"]


def test_logprob_tokens_are_their_own_strings(server, rt):
    """Byte fragments as "bytes:\\xNN" (not U+FFFD), the special token by its name (not ""),
    and the tokens' bytes make up the prompt; every top entry keeps 5 distinct tokens."""
    text = "s = 'café ☃ 日本語'\n"
    ids = [rt.eos_token_id] + rt.tokenizer.encode(text)
    lp = _post(server, {"model": "pystdlib", "prompt": ids, "echo": True, "logprobs": 5, "max_tokens": 0})[
        "choices"][0]["logprobs"]
    assert lp["tokens"][0] == "<|endoftext|>"
    assert not any("\ufffd" in t for t in lp["tokens"])
    assert sum(t.startswith("bytes:\\x") for t in lp["tokens"]) >= 10
    assert b"".join(_token_bytes(t) for t in lp["tokens"][1:]) == text.encode()
    assert all(len(d) in (5, 6) for d in lp["top_logprobs"][1:])  # distinct ids that decode alike stay apart
    # offsets: where each token's text begins in the echoed text (a fragment: its character's)
    assert lp["text_offset"][:4] == [0, 0, 1, 3] and lp["text_offset"][-1] == len(text) - 1


def test_top_entry_keeps_ids_that_decode_alike_and_the_chosen_one(rt):
    from bsbr_export.serve.logprobs import token_string, top_entry

    tok = rt.tokenizer
    frags = [i for i in range(200) if token_string(tok, i).startswith("bytes:")][:3]
    assert len({tok.decode([i]) for i in frags}) == 1  # all decode to U+FFFD alone
    d = top_entry(tok, {frags[0]: -0.5, frags[1]: -1.0}, frags[2], -3.0)
    assert list(d.values()) == [-0.5, -1.0, -3.0] and len(set(d)) == 3


def test_sampled_token_is_in_its_top_logprobs(server):
    out = _post(server, {"model": "pystdlib", "prompt": "def main(", "max_tokens": 24, "temperature": 2.0,
                         "seed": 3, "logprobs": 1})
    lp = out["choices"][0]["logprobs"]
    below = 0
    for t, x, d in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert d[t] == pytest.approx(x) and len(d) in (1, 2)
        below += x < max(d.values()) - 1e-9
    assert below >= 1  # at temperature 2 some sampled tokens are not the most likely one


def test_text_offsets_count_held_back_text(server, rt):
    """A stop string that begins with a generated token's text holds that text back until the
    next token shows it is no stop: offsets still advance by each token's text."""
    body = {"model": "pystdlib", "prompt": "def parse(", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    plain = _post(server, body)["choices"][0]["logprobs"]
    toks = plain["tokens"]
    k = next(i for i in range(2, len(toks) - 2) if toks[i].strip() and not toks[i].startswith("bytes:"))
    held = _post(server, body | {"stop": [toks[k] + "\x00"]})["choices"][0]
    lp = held["logprobs"]
    assert lp["tokens"] == toks  # the stop never matches: same tokens
    want = [len("".join(toks[:i])) for i in range(len(toks))]  # ASCII text: offsets are prefix lengths
    assert lp["text_offset"] == plain["text_offset"] == want
    for t, o in zip(lp["tokens"], lp["text_offset"]):
        assert held["text"][o:o + len(t)] == t
    httpx = pytest.importorskip("httpx")  # the trigger happened: token k's text came with token k + 1's
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json=body | {"stop": [toks[k] + "\x00"], "stream": True}) as r:
        chunks = [json.loads(x[6:])["choices"][0] for x in r.iter_lines() if x.startswith("data: {")]
    texts = [c["text"] for c in chunks if c["logprobs"]]
    assert texts[k] == "" and texts[k + 1] == toks[k] + toks[k + 1]


# --------------------------------------------------------------------------- lm-evaluation-harness against the server

DATA = Path(__file__).resolve().parent / "data" / "lm_eval"
TASKS = ("pystdlib_nextline", "pystdlib_heldout", "pystdlib_complete")


@pytest.fixture(scope="module")
def lm_eval_run(server, tmp_path_factory):
    """lm-eval's local-completions model over the server on the three local tasks (a subprocess,
    offline: the tokenizer is the bundled model's directory, the data local JSONL)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the test extra has lm-eval[api])")
    out = tmp_path_factory.mktemp("lm_eval")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(out / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    args = (f"model=pystdlib,base_url={server.url}/v1/completions,tokenizer={BUNDLED},tokenizer_backend=huggingface,"
            f"max_length={MAX_LEN},num_concurrent=2,max_retries=1,timeout=120")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                        "--batch_size", "4", "--tasks", ",".join(TASKS), "--include_path", str(DATA),
                        "--output_path", str(out), "--log_samples"], cwd=DATA, env=env, capture_output=True,
                       text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next((out / "pystdlib").glob("results_*.json")).read_text())["results"]
    samples = {t: [json.loads(x) for x in next((out / "pystdlib").glob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in TASKS}
    return res, samples


@pytest.fixture(scope="module")
def lm(server):
    """lm-eval's own tokenization of requests (what it sends), for the direct computation."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(model="pystdlib", base_url=server.url + "/v1/completions", tokenizer=str(BUNDLED),
                               tokenizer_backend="huggingface", max_length=MAX_LEN)


def _torch_ll(converted, lm, context_enc, continuation_enc) -> float:
    """The log-likelihood lm-eval asks for, from the torch model: its continuation's tokens
    given what precedes them in the (left-truncated) input."""
    inp = (context_enc + continuation_enc)[-lm.max_length:]
    ctxlen = len(context_enc) - max(0, len(context_enc) + len(continuation_enc) - lm.max_length)
    return float(torch_logprobs(converted, np.asarray(inp))[0][ctxlen:].sum())


def test_lm_eval_multiple_choice_equals_torch(lm_eval_run, lm, converted):
    res, samples = lm_eval_run
    acc, acc_norm, worst = [], [], 0.0
    for s in samples["pystdlib_nextline"]:
        doc = s["doc"]
        got = [float(r[0][0]) for r in s["resps"]]
        ref = [_torch_ll(converted, lm, *lm._encode_pair(doc["context"], c)) for c in doc["choices"]]
        worst = max(worst, np.abs(np.array(got) - ref).max())
        acc.append(float(np.argmax(ref) == doc["gold"]))
        acc_norm.append(float(np.argmax(np.array(ref) / [len(c) for c in doc["choices"]]) == doc["gold"]))
    print(f"lm-eval multiple choice: 48 requests, max|server - torch| = {worst:.2e}, acc {np.mean(acc):.3f}")
    assert len(acc) == 12 and worst <= TOL
    assert res["pystdlib_nextline"]["acc,none"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert res["pystdlib_nextline"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert 0.25 < np.mean(acc) < 1  # above chance on held-out code, and not trivially right


def test_lm_eval_rolling_perplexity_equals_torch(lm_eval_run, lm, converted):
    from lm_eval import utils as lu

    res, samples = lm_eval_run
    lls, words, nbytes, windows = [], 0, 0, 0
    for s in samples["pystdlib_heldout"]:
        text = s["doc"]["text"]
        wins = [lu.make_disjoint_window(w) for w in lu.get_rolling_token_windows(
            lm.tok_encode(text), lm.prefix_token_id, lm.max_length - 1, 1)]
        windows += len(wins)
        ref = sum(_torch_ll(converted, lm, c, t) for c, t in wins)
        got = float(s["resps"][0][0])
        n = len(lm.tok_encode(text))
        print(f"rolling doc: {n} tokens, {len(wins)} windows, server {got:.6f}, torch {ref:.6f}")
        assert abs(got - ref) <= TOL * len(wins)  # each window (one request) within 1e-4
        lls.append(ref)
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode())
    assert windows > len(lls)  # the longest passage spans several 512-token windows
    r = res["pystdlib_heldout"]
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-5)
    assert r["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-5)


def test_lm_eval_generate_until_completes(lm_eval_run, rt):
    res, samples = lm_eval_run
    assert "exact_match,none" in res["pystdlib_complete"]
    outs = [s["resps"][0][0] for s in samples["pystdlib_complete"]]
    assert len(outs) == 3 and all(isinstance(o, str) and "\n" not in o for o in outs) and any(outs)
    for s, o in zip(samples["pystdlib_complete"], outs):  # greedy: the runtime's own greedy text
        ref = rt.generate([s["doc"]["context"]], max_new_tokens=256, stop=["\n"], return_details=True)[0].text
        assert ref.startswith(o) or o.startswith(ref)


def test_echo_logprobs_on_an_export_without_logit_rows_is_a_clear_400(server, monkeypatch):
    from bsbr_export.runtime import scoring

    monkeypatch.setattr(scoring, "can_score", lambda engine: False)
    r = server.post({"model": "pystdlib", "prompt": "x = 1", "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "re-export" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
    monkeypatch.undo()
    one = _post(server, {"model": "pystdlib", "prompt": [5], "echo": True, "logprobs": 1, "max_tokens": 0})
    assert one["choices"][0]["logprobs"]["token_logprobs"] == [None]  # a one-token prompt: nothing to score


def test_echo_logprobs_with_n_completions(server, heldout_ids):
    """n completions of one prompt: the leader is prefilled (and scored) once, its followers take
    its state and get its prompt's entries too; with max_tokens 0 every choice ends there."""
    ids = heldout_ids[9000:9070].tolist()
    for max_tokens in (3, 0):
        out = _post(server, {"model": "pystdlib", "prompt": ids, "echo": True, "logprobs": 1, "n": 2,
                             "max_tokens": max_tokens, "temperature": 0})
        a, b = (ch["logprobs"] for ch in out["choices"])
        assert len(a["tokens"]) == len(b["tokens"]) == 70 + max_tokens
        assert a["token_logprobs"][:70] == b["token_logprobs"][:70] and a["token_logprobs"][0] is None
        assert all(ch["finish_reason"] == "length" for ch in out["choices"])


def test_generated_tokens_format_as_their_own_strings(rt):
    """The generated-token path of the format (events as the scheduler sends them): a character
    split over two tokens, the end-of-text token, two fragments that decode alike in one top entry."""
    from types import SimpleNamespace

    from bsbr_export.serve.logprobs import Choice
    from bsbr_export.serve.scheduler import Event

    tok = rt.tokenizer
    ids = tok.encode("é=1")  # "é" is two byte tokens
    c3, a9 = ids[0], ids[1]
    assert tok.token_bytes(c3) == b"\xc3" and tok.token_bytes(a9) == b"\xa9"
    ch = Choice(SimpleNamespace(tokenizer=tok), SimpleNamespace(echo=True, logprobs=2), 0, np.array([5]))
    base = len(ch.echo)
    pieces = ["", "é"] + [tok.decode([t]) for t in ids[2:]] + [""]
    for t, piece in zip([*ids, rt.eos_token_id], pieces):
        ch.add(Event(token=t, piece=piece, logprob=-1.5, top={c3: -0.1, a9: -0.2}))
    lp = ch.json()["logprobs"]
    assert lp["tokens"] == ["bytes:\\xc3", "bytes:\\xa9", *[tok.decode([t]) for t in ids[2:]], "<|endoftext|>"]
    assert lp["text_offset"] == [base, base, base + 1, base + 2, base + 3]
    assert lp["top_logprobs"][0] == {"bytes:\\xc3": -0.1, "bytes:\\xa9": -0.2}  # chosen among them: 2 entries
    assert lp["top_logprobs"][2] == {"bytes:\\xc3": -0.1, "bytes:\\xa9": -0.2, "=": -1.5}  # + the chosen one
    assert ch.text == ch.echo + "é=1" and ch.logprob_sum == pytest.approx(-1.5 * 5)
