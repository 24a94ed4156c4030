#!/usr/bin/env bash
# Same-machine A/B of two source trees: `cupyflash bench` on OLD_TREE and on this checkout, in the
# order old, new, old, new (ROUNDS pairs), each tree with its own kernel cache, so that a
# difference between them is not a difference between machines or moments. Then the SASS of every
# cubin each tree built (cuobjdump), to compare instruction by instruction. Everything is packed
# into $OUT/ab.tar.gz (or ./ab_out without $OUT); compare with scripts/compare_runs.py.
#   scripts/ab_bench.sh OLD_TREE [cupyflash bench options...]
#   e.g. scripts/ab_bench.sh ab_old --pass bwd --head-dim 128 --seqlen 2048 --seqlen 8192
# OLD_TREE is a copy of another commit's tree (git archive COMMIT | tar -x -C OLD_TREE), placed in
# this checkout as an untracked folder so the device tool carries it.
set -uo pipefail
cd "$(dirname "$0")/.."
old_tree=$(cd "$1" && pwd); shift
new_tree=$PWD
PACK=${OUT:+$OUT/ab.tar.gz}
work=$(mktemp -d "${TMPDIR:-/tmp}/ab.XXXXXX")
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
bench() {  # tree name, round
  local tree=$1 name=$2 round=$3
  shift 3
  echo "== $name round $round"
  (cd "$tree" && PYTHONPATH=$tree CUPYFLASH_CACHE_DIR=$work/cache-$name \
     $PY -m cupyflash bench --runs "${BENCH_RUNS:-10}" "$@" --out "$work/$name-$round" >"$work/$name-$round.log" 2>&1)
  echo "   exit $?"; tail -n 30 "$work/$name-$round.log"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  bench "$old_tree" old "$round" "${@}"
  bench "$new_tree" new "$round" "${@}"
done
for name in old new; do
  mkdir -p "$work/sass-$name"
  for cubin in "$work"/cache-"$name"/kernels/*.cubin; do
    [[ -e $cubin ]] && cuobjdump -sass "$cubin" >"$work/sass-$name/$(basename "$cubin" .cubin).sass" 2>&1
  done
done
for round in $(seq 1 "${ROUNDS:-2}"); do
  for name in old new; do
    echo "== compare old-1 with $name-$round"
    $PY scripts/compare_runs.py "$work"/old-1/*.json "$work"/$name-$round/*.json
  done
done | tee "$work/compare.txt"
rm -rf "$work"/cache-*
if [[ -n $PACK ]]; then tar -czf "$PACK" -C "$work" .; else rm -rf ab_out && mv "$work" ab_out; fi
