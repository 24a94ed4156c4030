"""EXPERIMENT: flash_decode's speed against where v_cache lies after k_cache (a measurement, not a
test). Both caches are views of one buffer, v starting GAP bytes after k's last byte; a cache
allocated by itself usually ends up with v at k + its size, and every size in the decode grid is a
power of two.

    PYTHONPATH=$PWD python scripts/decode_placement.py [NAME=MACRO:VALUE,... ...]

Each given variant (flash_decode compiled with those -D macros, as in decode_variants.py) is timed
beside the baseline at gaps 0 and 68 KiB, and at gap 0 also with the same buffer read as shuffled
pages of PAGE keys. TB/s = K and V bytes read once over the median of
timing.do_bench (L2 flushed, host work hidden); one query token, bf16, d 128, full caches.
"""

from __future__ import annotations

import itertools
import sys

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash import plan
from cupyflash.bench import block_table
from cupyflash.kernels import flash_decode
from cupyflash.timing import do_bench
from decode_variants import parse_macros, with_macros  # scripts/ is on sys.path when a script runs

BF16 = ml_dtypes.bfloat16
CELLS = [(1, 64, 32768, 8, 1), (1, 16, 131072, 8, 1), (1, 16, 32768, 32, 8), (1, 64, 4096, 32, 8),
         (1, 16, 32768, 8, 1)]  # (q tokens, batch, cache, heads q, heads kv)
GAPS = (0, 4096, 65536 + 4096, 1 << 20, 3 << 20)  # bytes between k's end and v's start
VARIANT_GAPS = (0, 65536 + 4096)
PAGE = 16  # keys per page of the paged layout timed at gap 0


def main() -> None:
    variants = [("baseline", ())]
    for arg in sys.argv[1:]:
        name, macros = arg.split("=")
        variants.append((name, parse_macros(macros)))
    original = flash_decode.spec
    print("| q | batch | cache | heads | gap (bytes) | variant | TB/s | us |")
    print("|---|---|---|---|---|---|---|---|")
    for seqlen_q, batch, cache, heads_q, heads_kv in CELLS:
        q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(BF16)
        n = batch * cache * heads_kv * 128
        lengths = cupy.full(batch, cache, cupy.int32)
        for gap in GAPS:
            buffer = cupy.empty(2 * n + gap // 2, BF16)
            k = buffer[:n].reshape(batch, cache, heads_kv, 128)
            v = buffer[n + gap // 2:].reshape(batch, cache, heads_kv, 128)
            for cache_view in (k, v):
                cache_view[...] = cupy.random.standard_normal(cache_view.shape, dtype=cupy.float32).astype(BF16)
            # The same buffer as pages of PAGE keys in bench.block_table's shuffled order (gap 0 only).
            layouts = [("", k, v, None)]
            if gap == 0:
                layouts.append((f" paged{PAGE}", k.reshape(-1, PAGE, heads_kv, 128), v.reshape(-1, PAGE, heads_kv, 128),
                                cupy.asarray(block_table(batch, cache // PAGE))))
            for (layout, k_view, v_view, table), (name, macros) in itertools.product(layouts, variants):
                if macros and gap not in VARIANT_GAPS:
                    continue
                flash_decode.spec = with_macros(original, macros) if macros else original
                plan.clear()

                def call() -> object:
                    return cf.attention_with_kvcache(q, k_view, v_view, cache_seqlens=lengths, block_table=table)
                call()
                ms = do_bench(call, runs=20).median_ms
                print(f"| {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {gap}{layout} | {name} | "
                      f"{2 * n * 2 / (ms * 1e-3) / 1e12:.2f} | {ms * 1e3:.1f} |", flush=True)
            flash_decode.spec = original
            del buffer, k, v
            cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
