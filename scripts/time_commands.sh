#!/usr/bin/env bash
# Wall time of each command of the README on this machine (the README's "Expected run
# times"), one after another on the bundled model, alone on the machine:
#     flock /tmp/bsbr-cpu.lock bash scripts/time_commands.sh WORKDIR > times.log 2>&1
set -euo pipefail
W=${1:?usage: time_commands.sh WORKDIR}
M=models/gpt2-pystdlib
mkdir -p "$W"
rm -rf "$W"/out "$W"/out16 "$W"/conv "$W"/exp "$W"/bq
t() { local s rc=0; s=$(date +%s.%N); "$@" > /dev/null 2>&1 || rc=$?; [ $rc = 0 ] || { echo "FAILED ($rc): $*"; exit 1; }
      printf '%6.1f s  %s\n' "$(echo "$(date +%s.%N) - $s" | bc)" "$*"; }
t bsbr-export "$M" --engine onnx --out "$W/out"
t bsbr-export "$M" --engine fp16 --onnx-only --out "$W/out16"
t bsbr-export convert "$M" --out "$W/conv"
t bsbr-export export "$M" --out "$W/exp"
t bsbr-export check "$W/out/model.onnx" --model "$W/out/bsbr"
t bsbr-export generate "$W/out" "def parse(" --max-new-tokens 64
t bsbr-export generate "$W/out" "def parse(" --max-new-tokens 64 --backend torch
t bsbr-export bench --quick --out "$W/bq"
