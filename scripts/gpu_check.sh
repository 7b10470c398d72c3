#!/usr/bin/env bash
# GPU check for a fresh machine that has only this repository and its own Python (torch,
# triton, numpy, pytest, onnx, onnxruntime; no TensorRT, no network needed): installs
# nothing, runs the package from the source tree (PYTHONPATH; `pip install -e .` would pull
# the pinned torch), runs every step even when one fails, and writes one report,
# gpu_check.json + gpu_check.md (card, versions, each step's result and numbers), plus
# each step's log, under $OUT when set, else out/gpu-report/ (or --out DIR). Steps and time
# limits: scripts/gpu_check.py (under 9 minutes on a GPU; without one, every GPU step is
# reported "no CUDA device" within seconds). Exit status 1 when a step failed.
cd "$(dirname "$0")/.." || exit 2
PY="$(command -v python3 || command -v python)"
if [ -z "$PY" ]; then
    echo "gpu_check: no python3 on PATH" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
