"""The install split: the base install (numpy, onnxruntime, onnx, tokenizers, click) loads an export
and generates; torch and transformers come only with the ``export`` extra (which ``test``
pulls in). Checked on pyproject.toml, on the installed distribution's requirements, and by
generating in a fresh interpreter where importing torch or transformers fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_runtime_api import MARGIN, export_bundled, torch_greedy  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ONLY = ("torch", "transformers", "safetensors", "huggingface_hub")
BASE = ("numpy", "onnxruntime", "onnx", "tokenizers", "click")
BLOCK = "import sys\nfor m in ('torch', 'transformers'):\n    sys.modules[m] = None  # import fails\n"


def _name(req: str) -> str:
    import re

    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("-", "_")


def _run(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # cwd outside the repository: the installed distribution, not a stale egg-info, answers
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_bundled(tmp_path_factory)


def test_pyproject_puts_torch_in_the_export_extra():
    tomllib = pytest.importorskip("tomllib")
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in proj["dependencies"]}
    assert base >= set(BASE) and not base & set(EXTRA_ONLY), base
    extras = proj["optional-dependencies"]
    assert "torch==2.13.0" in extras["export"]
    assert {_name(r) for r in extras["export"]} >= set(EXTRA_ONLY)
    # README's `pip install -e ".[test]"` installs all that CI needs
    assert any(r.startswith("bsbr-export[") and "export" in r for r in extras["test"]), extras["test"]


def test_installed_distribution_requires_torch_only_in_extras(tmp_path):
    p = _run("import importlib.metadata as m, json; print(json.dumps(m.requires('bsbr-export')))", tmp_path)
    assert p.returncode == 0, p.stderr
    reqs = json.loads(p.stdout)
    base = {_name(r) for r in reqs if "extra ==" not in r}
    assert not base & set(EXTRA_ONLY), (f"the installed bsbr-export requires {sorted(base & set(EXTRA_ONLY))} "
                                         f"without an extra: reinstall it (pip install -e '.[test]')")
    assert base >= set(BASE)
    torch_reqs = [r for r in reqs if _name(r) == "torch"]
    assert torch_reqs and all('extra == "export"' in r for r in torch_reqs), torch_reqs


def test_generation_without_torch_equals_torch_greedy(export_dir, tmp_path, bundled_dir):
    from bsbr_export.convert import load_bsbr

    text = np.load(bundled_dir / "heldout_ids.npy").astype(np.int64)
    prompts = [text[:7].tolist(), text[400:530].tolist(), "def parse(self, text):"]
    n = 16
    code = BLOCK + f"""
import json
from bsbr_export.runtime import load
rt = load({str(export_dir)!r}, threads=2)
out = rt.generate({prompts!r}, max_new_tokens={n})
pieces = list(rt.stream({prompts[2]!r}, max_new_tokens=4))
assert sys.modules['torch'] is None and sys.modules['transformers'] is None
print(json.dumps({{"tokens": out, "ids": rt.tokenizer.encode({prompts[2]!r})}}))
"""
    p = _run(code, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    model = load_bsbr(export_dir / "bsbr")
    for i, prompt in enumerate(prompts[:2] + [got["ids"]]):
        ref, _, margins = torch_greedy(model, prompt, n)
        for s in range(n):
            if margins[s] < MARGIN:
                break
            assert got["tokens"][i][s] == ref[s], f"prompt {i}: step {s} differs from torch"


def test_cli_generate_without_torch(export_dir, tmp_path):
    code = BLOCK + f"""
sys.argv = ['bsbr-export', 'generate', {str(export_dir)!r}, 'def f(', '--max-new-tokens', '4', '--threads', '2']
from bsbr_export.cli import main
main()
"""
    p = _run(code, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("def f(")


@pytest.mark.parametrize("args", [["convert", "MODEL", "--out", "OUT"], ["MODEL", "--out", "OUT"],
                                  ["generate", "EXPORT", "x", "--backend", "torch"]])
def test_torch_commands_without_torch_name_the_extra(args, export_dir, tmp_path, bundled_dir):
    args = [{"MODEL": str(bundled_dir), "OUT": str(tmp_path / "out"), "EXPORT": str(export_dir)}.get(a, a)
            for a in args]
    code = BLOCK + f"sys.argv = ['bsbr-export', *{args!r}]\nfrom bsbr_export.cli import main\nmain()\n"
    p = _run(code, tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bsbr-export[export]" in lines[0], p.stderr[-2000:]
    assert not (tmp_path / "out").exists()
