#!/usr/bin/env bash
# Per-kernel GPU time (ncu's gpu__time_duration, median of REPEAT calls) of one attention call in
# each of several source trees, on one machine: which kernel a change made faster or slower.
#   scripts/kernel_times.sh "TREE..." [scripts/one_call.py options...]
#   e.g. scripts/kernel_times.sh ". ab_old" --pass bwd --shape 2,8192,16,128 --dtype bfloat16
# Each tree compiles into its own kernel cache, first outside ncu. The table goes to stdout; the
# raw CSVs and the ptxas reports (the cache's metadata) into $OUT/kernel_times.tar.gz when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
trees=($1); shift
here=$PWD work=$(mktemp -d "${TMPDIR:-/tmp}/ktimes.XXXXXX")
for tree in "${trees[@]}"; do
  name=$(echo "$tree" | tr -c 'a-zA-Z0-9\n' '_')
  run() { (cd "$tree" && PYTHONPATH=$PWD CUPYFLASH_CACHE_DIR=$work/cache-$name "$@"); }
  run python3 "$here/scripts/one_call.py" --repeat 1 "$@" || { echo "$tree: the call failed"; continue; }
  run ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 "$here/scripts/one_call.py" --repeat "${REPEAT:-3}" "$@" >"$work/$name.csv" 2>"$work/$name.err"
  python3 - "$tree" "$work/$name.csv" <<'PY'
import collections, csv, statistics, sys
rows = [r for r in csv.reader(open(sys.argv[2])) if len(r) > 10]
head = rows[0]
name, value = head.index("Kernel Name"), head.index("Metric Value")
times = collections.defaultdict(list)
for r in rows[1:]:
    if r[name].startswith("flash_"):
        times[r[name]].append(float(r[value].replace(",", "")) / 1e3)
print(f"{sys.argv[1]:>12}  " + "  ".join(f"{k} {statistics.median(v):8.1f} us" for k, v in times.items()))
PY
  python3 - "$work/cache-$name/kernels" >"$work/$name-registers.txt" <<'PY'
import json, pathlib, re, sys
for meta in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    log = json.loads(meta.read_text()).get("log", "")
    for entry, regs in re.findall(r"entry function '(\w+)'.*?Used (\d+) registers", log, re.S):
        print(meta.stem, entry, regs, "registers")
PY
  rm -rf "$work/cache-$name"
done
[[ -n ${OUT:-} ]] && tar -czf "$OUT/kernel_times.tar.gz" -C "$work" .
