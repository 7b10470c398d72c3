#!/usr/bin/env bash
# Kernel checks on one CUDA GPU with only PyTorch and Triton installed (about 3-5 minutes
# on an H100): the kernel tests (CUDA tests included), then the benchmark, which checks
# the fused kernel against the reference at every length before it reports a speed.
# Both ops are benchmarked (plain, and normalised: the default conversion's); the Markdown
# tables go to $OUT/kernel_bench{,_normalised}.md when $OUT is set, else under docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name())"

if python -c "import pytest" 2>/dev/null; then
    timeout 300 python -m pytest tests/test_kernel.py -q -rs -p no:cacheprovider
else
    echo "pytest is not installed: tests/test_kernel.py skipped (the benchmark below still gates every speed on parity)"
fi

out_dir="${OUT:-docs}"
mkdir -p "$out_dir"
timeout 240 python scripts/bench_kernel.py --device cuda --output "$out_dir/kernel_bench.md"
timeout 240 python scripts/bench_kernel.py --device cuda --op normalised --output "$out_dir/kernel_bench_normalised.md"
