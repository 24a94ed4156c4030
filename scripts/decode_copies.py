"""flash_decode's two kinds of K/V copies against each other in one process: bulk tensor copies
(flash_decode.bulk_copies_enabled, sm_90) and cp.async, on one-token cells and a few speculative
ones, contiguous and in shuffled pages of 16 and 256 keys (a measurement, not a test):

    PYTHONPATH=$PWD [DECODE_COPIES_ALL_PAGES=1] python scripts/decode_copies.py [Q,BATCH,CACHE,HEADS_Q,HEADS_KV ...]

DECODE_COPIES_ALL_PAGES=1 runs every cell in pages too (else only the (batch, cache) of PAGED): the
grid run of 2026-12-07 (two processes) had bulk copies slower in 16-key pages at 16 query tokens
with one kv head, e.g. `16,16,32768,8,1 16,1,131072,8,1 16,16,131072,8,1`, which this checks in one.

Each sequence holds CACHE - 3 keys, so its last tile is cut short. TB/s = bytes of K and V read
once over the median time (timing.do_bench: L2 flushed, host work hidden); "ratio" is the
cp.async time over the bulk one; "max diff" compares the two outputs (the same products in the
same order: expect 0).
"""

from __future__ import annotations

import os
import sys

import cupy
import ml_dtypes
import numpy as np

import cupyflash as cf
from cupyflash import kvcache
from cupyflash.timing import do_bench

BF16 = ml_dtypes.bfloat16
CELLS = [(1, 16, 4096, 8, 1), (1, 16, 32768, 8, 1), (1, 16, 131072, 8, 1), (1, 64, 32768, 8, 1),
         (1, 16, 32768, 32, 8), (1, 64, 4096, 32, 8), (1, 1, 4096, 32, 8), (1, 1, 4096, 8, 1),
         (1, 1, 131072, 32, 8), (1, 1, 131072, 8, 1), (1, 64, 32768, 32, 8), (16, 16, 32768, 32, 8),
         (4, 64, 4096, 32, 8)]  # (q, batch, cache, heads q, kv)
PAGED = {(16, 32768), (64, 32768), (1, 4096)}  # (batch, cache) also run in pages of 16 and 256 keys


def cache_arrays(batch: int, cache: int, heads_kv: int, page: int) -> tuple:
    """k_cache, v_cache and the block table (None: contiguous), random bf16, pages shuffled."""
    if not page:
        shape, table = (batch, cache, heads_kv, 128), None
    else:
        pages = batch * cache // page
        shape = (pages, page, heads_kv, 128)
        table = cupy.random.permutation(pages).astype(cupy.int32).reshape(batch, cache // page)
    k, v = (cupy.random.standard_normal(shape, dtype=cupy.float32).astype(BF16) for _ in range(2))
    return k, v, table


def main() -> None:
    cells = [tuple(int(x) for x in arg.split(",")) for arg in sys.argv[1:]] or CELLS
    print("| q | batch | cache | heads | page | cp.async TB/s (us) | bulk TB/s (us) | ratio | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seqlen_q, batch, cache, heads_q, heads_kv in cells:
        paged = (batch, cache) in PAGED or os.environ.get("DECODE_COPIES_ALL_PAGES") == "1"
        for page in (0, 16, 256) if paged else (0,):
            q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(BF16)
            k, v, table = cache_arrays(batch, cache, heads_kv, page)
            lengths = cupy.full(batch, cache - 3, cupy.int32)
            kv_bytes = 2 * batch * (cache - 3) * heads_kv * 128 * 2
            results = {}
            for bulk in (False, True):
                with kvcache.decode_copies(bulk):
                    def call() -> object:
                        return cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, block_table=table)
                    out = cupy.asnumpy(call().astype(cupy.float32))
                    results[bulk] = (out, do_bench(call, runs=30).median_ms)
            diff = float(np.max(np.abs(results[False][0] - results[True][0])))
            (_, slow), (_, fast) = results[False], results[True]
            print(f"| {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {page or '-'} | "
                  f"{kv_bytes / slow / 1e9:.2f} ({slow * 1e3:.1f}) | {kv_bytes / fast / 1e9:.2f} ({fast * 1e3:.1f}) | "
                  f"{slow / fast:.3f} | {diff:.1e} |", flush=True)
            del q, k, v, table
            cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
