#!/usr/bin/env bash
# Everything a GPU machine must run before kernel work is called done, in one call ($OUT here is
# the results folder, see below):
#   info     cupyflash info                                  -> $OUT/info.txt
#   tests    the GPU test suite (tests/test_gpu_*.py)         -> $OUT/gpu_tests.log
#   tests-shuffled  the same in a shuffled order (TEST_SEED, default 2026): no test may depend on
#            what ran before it                                -> $OUT/gpu_tests_shuffled.log
#   sanitize scripts/sanitize.py: compute-sanitizer memcheck over the memory-safety sweep, racecheck
#            and synccheck over its small set, one process per case (SANITIZE_MATCH=TEXT: only the
#            cases whose id contains TEXT)                     -> $OUT/sanitize.log
#   validate cupyflash validate --quick                       -> $OUT/validate.log
#   bench    cupyflash bench: the paper grid against naive CuPy and PyTorch, one dtype per step
#            (bench-fp16 / bench-bf16; BENCH_RUNS timed runs, default 10; BENCH_HEAD_DIMS="80 96 160 192"
#            for other head dims than the papers' 64, 128, 256; BENCH_SEQLENS="4096" for fewer lengths)
#                                                              -> $OUT/bench-*.log, .png, bench-*/*.json/.md
#   bench-varlen  cupyflash bench --varlen (VARLEN_DTYPE, default bfloat16) -> $OUT/bench-varlen.log, bench-varlen/
#   bench-decode  cupyflash bench --decode: attention_with_kvcache in TB/s beside the copy bandwidth and torch
#            (DECODE_QUICK=1 for --quick)                      -> $OUT/bench-decode.log, bench-decode/
#   decode-copies  scripts/decode_copies.py: decoding's bulk tensor copies against cp.async, same process
#            (run the other steps with CUPYFLASH_DECODE_BULK_COPIES=1 to test and bench the bulk ones)
#                                                              -> $OUT/decode-copies.md
#   bwd-variants  scripts/bwd_variants.py: the backward with its default dK/dV kernel against every
#            forced wgmma dK/dV candidate, deterministic=True on both dQ passes, and cuDNN (BWD_CELLS,
#            default the script's; BWD_VARIANTS_DKDV=0, BWD_VARIANTS_DQ=1 as in the script) -> $OUT/bwd-variants.md
#   overhead scripts/host_overhead.py: host time per call against PyTorch -> $OUT/overhead.log
#   tune     cupyflash autotune on the default buckets        -> $OUT/tune.log
# Usage: scripts/gpu_check.sh [STEP ...]   (default: info tests sanitize validate bench-fp16 bench-bf16 overhead)
# Writes into ./gpu_check_out, or, when $OUT is set (the device tool, which brings back at most 8
# files), into a scratch folder that is packed into $OUT/gpu_check.tar.gz after every step, so a
# run cut short still returns the steps it finished. Kernels compile into $CUPYFLASH_CACHE_DIR
# (default /tmp/cupyflash-cache): the first step pays for NVRTC.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${OUT:+$OUT/gpu_check.tar.gz}
OUT=${OUT:+$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPYFLASH_CACHE_DIR=${CUPYFLASH_CACHE_DIR:-/tmp/cupyflash-cache}
PY=${PYTHON:-python3}
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(info tests sanitize validate bench-fp16 bench-bf16 overhead)
# GPU_TESTS="FILE ...": run only these test files (a subset, e.g. the decoding ones); default all.
read -r -a GPU_TESTS <<<"${GPU_TESTS:-$(echo tests/test_gpu_*.py)}"
# PYTEST_JOBS=N spreads the GPU tests over N processes on the one GPU (pytest-xdist, when installed).
JOBS=()
[[ -n ${PYTEST_JOBS:-} ]] && $PY -c "import xdist" 2>/dev/null && JOBS=(-n "$PYTEST_JOBS")
# TEST_SHARDS=N (default 6) runs the GPU suite as N pytest processes at once, each one contiguous
# slice (--test-shard, tests/conftest.py), sharing one fresh cache folder: the suite's time is
# mostly NVRTC on a cold cache, which one process does one kernel at a time.
SHARDS=${TEST_SHARDS:-6}
[[ ${#JOBS[@]} -gt 0 ]] && SHARDS=1
status=0

run_step() {  # name, log file, command...: runs, logs, records a failure without stopping
  local name=$1 log=$2
  shift 2
  echo "== $name: $* (log: $log)"
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc -ne 0 ]] && status=1
  if [[ -n $PACK ]]; then tar -czf "$PACK.tmp" -C "$OUT" . && mv "$PACK.tmp" "$PACK"; fi
  return 0
}

run_suite() {  # order: the GPU suite in $SHARDS processes; every shard's log, one after another
  local cache rc=0 i
  cache=$(mktemp -d "${TMPDIR:-/tmp}/cupyflash-tests.XXXXXX")
  local pids=()
  for ((i = 1; i <= SHARDS; i++)); do
    CUPYFLASH_TEST_CACHE_DIR=$cache $PY -m pytest -q -rfE --tb=short -p no:cacheprovider --test-order "$1" \
      --test-shard "$i/$SHARDS" "${JOBS[@]}" "${GPU_TESTS[@]}" >"$cache.shard$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 1; i <= SHARDS; i++)); do
    wait "${pids[i - 1]}" || rc=1
    echo "---- shard $i/$SHARDS"
    cat "$cache.shard$i.log"
    rm -f "$cache.shard$i.log"
  done
  rm -rf "$cache"
  return $rc
}

for step in "${steps[@]}"; do
  case $step in
    info) run_step info "$OUT/info.txt" $PY -m cupyflash info; cat "$OUT/info.txt" ;;
    tests|tests-shuffled)
      order=collected log=$OUT/gpu_tests.log
      [[ $step == tests-shuffled ]] && order=random:${TEST_SEED:-2026} log=$OUT/gpu_tests_shuffled.log
      run_step "$step" "$log" run_suite "$order"
      grep -E "passed|failed|error" "$log" | tail -n $((SHARDS + 2))
      grep -E "^FAILED|^ERROR" "$log" | head -n 40 ;;
    tests-quick)
      run_step tests-quick "$OUT/gpu_tests.log" $PY -m pytest -q -rfE --tb=short -p no:cacheprovider \
        -k "not 4097 and not 1023 and not 1024x1023" "${GPU_TESTS[@]}"
      grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 3
      grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -n 40 ;;
    sanitize)
      run_step sanitize "$OUT/sanitize-summary.txt" $PY scripts/sanitize.py --jobs "${SANITIZE_JOBS:-12}" \
        --match="${SANITIZE_MATCH:-}" --log "$OUT/sanitize.log"
      cat "$OUT/sanitize-summary.txt" ;;
    validate) run_step validate "$OUT/validate.log" $PY -m cupyflash validate --quick --require-gpu; tail -n 5 "$OUT/validate.log" ;;
    bench-fp16|bench-bf16)
      dtype=$([[ $step == bench-fp16 ]] && echo float16 || echo bfloat16)
      dims=()
      for d in ${BENCH_HEAD_DIMS:-}; do dims+=(--head-dim "$d"); done
      for s in ${BENCH_SEQLENS:-}; do dims+=(--seqlen "$s"); done
      run_step "$step" "$OUT/$step.log" $PY -m cupyflash bench --dtype "$dtype" --runs "${BENCH_RUNS:-10}" \
        "${dims[@]}" --out "$OUT/$step" --plot "$OUT/$step.png"
      tail -n 100 "$OUT/$step.log" ;;
    bench-varlen)  # attention_varlen against the dense call and the peer (VARLEN_DTYPE, default bfloat16)
      run_step bench-varlen "$OUT/bench-varlen.log" $PY -m cupyflash bench --varlen --dtype "${VARLEN_DTYPE:-bfloat16}" \
        --runs "${BENCH_RUNS:-10}" --out "$OUT/bench-varlen"
      tail -n 40 "$OUT/bench-varlen.log" ;;
    bench-decode)  # attention_with_kvcache on full caches, contiguous and paged, against torch's cuDNN and flash SDPA
      run_step bench-decode "$OUT/bench-decode.log" $PY -m cupyflash bench --decode ${DECODE_QUICK:+--quick} \
        --runs "${BENCH_RUNS:-10}" --out "$OUT/bench-decode"
      tail -n 120 "$OUT/bench-decode.log" ;;
    decode-copies) run_step decode-copies "$OUT/decode-copies.md" $PY scripts/decode_copies.py; cat "$OUT/decode-copies.md" ;;
    bwd-variants) run_step bwd-variants "$OUT/bwd-variants.md" $PY scripts/bwd_variants.py ${BWD_CELLS:-}
                  cat "$OUT/bwd-variants.md" ;;
    overhead) run_step overhead "$OUT/overhead.log" $PY scripts/host_overhead.py; cat "$OUT/overhead.log" ;;
    bench-quick) run_step bench-quick "$OUT/bench.log" $PY scripts/bench.py --quick --out "$OUT"
                 tail -n 60 "$OUT/bench.log" ;;
    tune) run_step tune "$OUT/tune.log" $PY -m cupyflash autotune; tail -n 60 "$OUT/tune.log" ;;
    *) echo "unknown step: $step"; status=2 ;;
  esac
done
exit $status
