"""Every study script runs with --quick on a tiny GPT-2 (own tokenizer, fake held-out
stream) and writes its fragment; make_results assembles them into one document."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("study_*.py"))
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["bisect.py", "heapq.py", "keyword.py", "colorsys.py"]
HELDOUT_FILES = ["textwrap.py", "fnmatch.py"]


def tiny_model_with_tokenizer(d: Path) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [(STDLIB / f).read_text() for f in TRAIN_FILES]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for f in HELDOUT_FILES:
        ids += tok((STDLIB / f).read_text())["input_ids"] + [eot]
    np.save(d / "heldout_ids.npy", np.asarray(ids, dtype=np.int32))
    manifest = [{"path": f, "sha256": "", "split": "train"} for f in TRAIN_FILES]
    manifest += [{"path": f, "sha256": "", "split": "heldout"} for f in HELDOUT_FILES]
    (d / "corpus_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_study_model")
    tiny_model_with_tokenizer(d)
    return d


def test_every_study_script_and_assembly_quick(tiny_dir, tmp_path):
    assert {p.stem for p in SCRIPTS} >= {"study_fidelity", "study_attention", "study_sweeps", "study_retrieval",
                                         "study_calibration", "study_external"}
    results, figures = tmp_path / "docs" / "results", tmp_path / "docs" / "figures"
    cmd = [sys.executable, str(ROOT / "scripts" / "make_results.py"), "--run", "--quick", "--bench", "--model", str(tiny_dir),
           "--results", str(results), "--figures", str(figures)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for p in SCRIPTS:
        frag = results / f"{p.stem}.md"
        assert frag.is_file(), p.stem
        text = frag.read_text()
        assert "- command: `python scripts/" in text and "- machine:" in text, p.stem
    assert len(list(figures.glob("attention_layer*.png"))) == 2
    doc = (tmp_path / "docs" / "RESULTS.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "Table 8",
                  "Table 9", "table 10"):
        assert title.lower() in doc.lower(), title
    assert "](figures/attention_layer0.png)" in doc
    # The run's own timing closes the document, one row per script plus the total.
    tail = doc[doc.index("## Regeneration"):]
    assert all(f"`{p.stem}`" in tail for p in SCRIPTS) and "`bench --quick`" in tail and "**total**" in tail
    # --bench: the benchmark section is rebuilt by the same command.
    assert "## Benchmark" in doc and (results / ".bench-quick" / "bench.json").is_file()


def test_full_profile_names_every_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_results

    assert set(make_results.FULL_ARGS) == set(make_results.RUN_ORDER)


def test_study_script_bad_model_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_external.py"), "--model", str(missing),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and str(missing.name) in res.stderr
    assert not (tmp_path / "out").exists()
