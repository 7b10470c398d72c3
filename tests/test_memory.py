"""Linear memory: a 32k-token forward stays far below one T x T fp32 score matrix."""

import json
import subprocess
import sys

CHILD = r"""
import json, torch
from bsbr_export.config import BSBRConfig
from bsbr_export.modeling import BSBRGPT2

def hwm_kib():
    # VmHWM belongs to this process image: unlike ru_maxrss it does not inherit the
    # high-water mark of the (large) pytest process that forked us.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

torch.manual_seed(0)
cfg = BSBRConfig(vocab_size=101, n_positions=256, n_embd=32, n_layer=2, n_head=2, chunk_size=128)
model = BSBRGPT2(cfg).eval()
base = hwm_kib()
ids = torch.randint(0, 101, (1, 32768))
with torch.no_grad():
    out = model(ids)
peak = hwm_kib()
print(json.dumps({"base_kib": base, "peak_kib": peak, "finite": bool(torch.isfinite(out).all())}))
"""


def test_32k_forward_memory_is_linear():
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    T = 32768
    score_matrix = T * T * 4  # bytes of one fp32 T x T matrix: 4 GiB
    peak = m["peak_kib"] * 1024
    print(f"peak RSS {peak / 2**20:.0f} MiB (process before forward {m['base_kib'] / 1024:.0f} MiB); "
          f"one T x T fp32 matrix: {score_matrix / 2**30:.0f} GiB")
    assert m["finite"]
    assert peak < score_matrix / 4, f"peak {peak / 2**30:.2f} GiB is not far below {score_matrix / 2**30:.0f} GiB"
