"""Split counts against each other on small decode cells, each merged in a cluster (2, 4, 8 on
sm_90 and up) and by flash_decode_combine, for choosing kvcache.split_plan's count (a
measurement, not a test):

    PYTHONPATH=$PWD [DECODE_SPLITS=0,8,16] python scripts/decode_splits.py [Q,BATCH,CACHE,HEADS_Q,HEADS_KV ...]

TB/s = bytes of K and V read once over the median time (timing.do_bench: L2 flushed, host work
hidden); "heuristic" is num_splits=0, whatever split_plan picks.
"""

from __future__ import annotations

import os
import sys

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash import kvcache, plan
from cupyflash.device import device_limits
from cupyflash.kernels import flash_decode
from cupyflash.timing import do_bench

BF16 = ml_dtypes.bfloat16
CELLS = [(1, 1, 4096, 32, 8), (1, 1, 4096, 8, 1), (1, 1, 32768, 32, 8), (1, 1, 32768, 8, 1),
         (1, 1, 131072, 8, 1), (1, 16, 4096, 32, 8), (1, 16, 4096, 8, 1), (1, 64, 4096, 8, 1),
         (4, 1, 4096, 32, 8), (16, 1, 4096, 32, 8), (16, 1, 32768, 8, 1)]  # (q, batch, cache, heads q, kv)
# DECODE_SPLITS="0,8,14,16": other counts (0 is the library's choice)
SPLITS = tuple(int(n) for n in os.environ.get("DECODE_SPLITS", "0,1,2,4,8,16,32").split(","))


def main() -> None:
    cells = [tuple(int(x) for x in arg.split(",")) for arg in sys.argv[1:]] or CELLS
    limits = device_limits(0)
    cluster_size = flash_decode.cluster_size
    print("| q | batch | cache | heads | splits | merge | TB/s | us |")
    print("|---|---|---|---|---|---|---|---|")
    for seqlen_q, batch, cache, heads_q, heads_kv in cells:
        q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(BF16)
        k, v = (cupy.random.standard_normal((batch, cache, heads_kv, 128), dtype=cupy.float32).astype(BF16)
                for _ in range(2))
        lengths = cupy.full(batch, cache, cupy.int32)
        kv_bytes = 2 * batch * cache * heads_kv * 128 * 2
        problem = kvcache.DecodeProblem(batch, seqlen_q, heads_q, heads_kv, 128, "bfloat16", 0, cache, False, cache,
                                        0, batch, None, 128 ** -0.5, (-1, 0), 0, None)
        chosen = kvcache.split_plan(problem, flash_decode.config(problem.packed_rows, 128, limits), 0)[0]
        for splits in SPLITS:
            count = splits or chosen
            merges = (("library's choice", cluster_size),) if splits == 0 else \
                (("-", cluster_size),) if count == 1 else \
                (("combine", lambda n, b, s, lim: 0),) + ((("cluster", lambda n, b, s, lim: n),)
                                                          if count in flash_decode.CLUSTER_SPLITS else ())
            for merge, rule in merges:
                flash_decode.cluster_size = rule
                plan.clear()

                def call() -> object:
                    return cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, num_splits=splits)
                call()
                ms = do_bench(call, runs=30).median_ms
                name = f"heuristic ({chosen})" if splits == 0 else str(splits)
                print(f"| {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {name} | {merge} | "
                      f"{kv_bytes / (ms * 1e-3) / 1e12:.2f} | {ms * 1e3:.1f} |", flush=True)
        flash_decode.cluster_size = cluster_size
        del q, k, v
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
