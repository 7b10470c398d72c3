"""``bsbr-export export`` writes a directory that ``load(DIR)`` takes as it is: the graphs and the
model's tokenizer."""

from __future__ import annotations

from click.testing import CliRunner

from bsbr_export.cli import main
from bsbr_export.runtime import load

from test_runtime_api import BUNDLED


def test_export_writes_the_tokenizer_and_loads_as_it_is(tmp_path):
    out = tmp_path / "e"
    res = CliRunner().invoke(main, ["export", str(BUNDLED), "--out", str(out), "--max-seq-len", "256"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'tokenizer.json'}" in res.output
    rt = load(out, threads=1)
    text = rt.generate(["def parse("], max_new_tokens=3, return_details=True)[0].text
    assert isinstance(text, str) and len(rt.generate(["import os\n"], max_new_tokens=3)[0]) == 3
