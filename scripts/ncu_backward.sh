#!/usr/bin/env bash
# Nsight Compute's full report of one dense backward call, ours beside torch SDPA's cuDNN
# backend, for each case given as "BATCH SEQLEN HEADS HEAD_DIM CAUSAL" (bf16):
#   scripts/ncu_backward.sh "4 4096 16 128 0" "4 4096 11 192 0"
# One report (.ncu-rep, its details and raw pages as text) per case and implementation under
# $OUT/ncu (or ./ncu), and per kernel the lines that say where its time goes (duration, tensor
# pipe, issue slots, stall reasons) on stdout.
# Clocks are left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${OUT:-.}/ncu
mkdir -p "$dir"
export PYTHONPATH=$PWD
for case in "$@"; do
  name=bwd-$(echo "$case" | tr ' ' '_')
  python3 scripts/profile_cases.py bwd $case >/dev/null  # compile outside ncu
  for kind in bwd bwd-cudnn; do
    ncu --clock-control none --profile-from-start off --set full -f -o "$dir/$kind-$name" \
      python3 scripts/profile_cases.py $kind $case >"$dir/$kind-$name.log" 2>&1
    ncu --import "$dir/$kind-$name.ncu-rep" --print-details all >"$dir/$kind-$name.txt" 2>&1
    ncu --import "$dir/$kind-$name.ncu-rep" --page raw >"$dir/$kind-$name-raw.txt" 2>&1
    echo "== $kind $case"
    grep -E "^  [A-Za-z_].*\(|Duration  |Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Registers Per Thread|Block Size|Grid Size|Achieved Occupancy|Dynamic Shared|L2 Cache Throughput" \
      "$dir/$kind-$name.txt" | sed 's/  */ /g'
    python3 - "$dir/$kind-$name-raw.txt" | tee "$dir/$kind-$name-summary.txt" <<'PY'
import re, sys
# Per kernel (the raw page names each before its metrics): time, tensor-pipe use, stall samples.
for line in open(sys.argv[1]):
    if re.match(r"  \S+ \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line):
        print("== " + line.strip())
    elif re.search(r"gpu__time_duration.sum |sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active "
                   r"|pcsamp_warps_issue_stalled_[a-z_]+ ", line) and "not_issued" not in line:
        parts = line.split()
        print(parts[0], " ".join(parts[1:]))  # unit, value
PY
  done
done
# The device tool brings back at most 8 files: with $OUT set, the text reports go back as one tar
# (the .ncu-rep files, 6-7 MB each, stay behind).
if [[ -n ${OUT:-} ]]; then
  tar -czf "$OUT/ncu-backward.tar.gz" -C "$dir" --exclude='*.ncu-rep' . && rm -rf "$dir"
fi
