#!/usr/bin/env bash
# Nsight Compute's full report of one decode call, ours beside torch SDPA's cuDNN and flash
# backends, for each case given as "Q BATCH CACHE HEADS_Q HEADS_KV" (bf16, head_dim 128):
#   scripts/ncu_decode.sh "1 16 32768 32 8" "1 1 4096 32 8"
# One text report per case and implementation under $OUT/ncu (or ./ncu), and the kernel table
# (name, time, DRAM throughput, achieved occupancy, registers) on stdout. Clocks are left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${OUT:-.}/ncu
mkdir -p "$dir"
export PYTHONPATH=$PWD
for case in "$@"; do
  name=$(echo "$case" | tr ' ' '_')
  python3 scripts/profile_cases.py decode $case >/dev/null  # compile outside ncu
  for kind in decode decode-cudnn decode-flash; do
    ncu --clock-control none --profile-from-start off --set full \
      python3 scripts/profile_cases.py $kind $case >"$dir/$kind-$name.txt" 2>&1
    echo "== $kind $case"
    grep -E "^  [A-Za-z_].*\(|Duration  |DRAM Throughput|Achieved Occupancy|Registers Per Thread|Block Size|Grid Size|Dynamic Shared" \
      "$dir/$kind-$name.txt" | sed 's/  */ /g'
  done
done
