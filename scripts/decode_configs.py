"""Decode blocks and split counts against each other on a few cells, for choosing what
kernels/flash_decode.py's config() and choose_splits() should pick (a measurement, not a test):

    PYTHONPATH=$PWD python scripts/decode_configs.py

For each cell: the default (config() and the heuristic's split count), then every DecodeConfig
of 1 or 2 row warps and 2 or 3 stages that holds the cell's packed rows and fits the GPU, each at
the heuristic's split count, half of it and twice it. TB/s = bytes of K and V read once over the
median time (timing.do_bench: L2 flushed, host work hidden).
"""

from __future__ import annotations

import itertools

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash import kvcache, plan
from cupyflash.device import device_limits
from cupyflash.kernels import flash_decode
from cupyflash.timing import do_bench

BF16 = ml_dtypes.bfloat16
CELLS = [(1, 16, 4096, 32, 8), (1, 64, 32768, 32, 8), (1, 1, 32768, 8, 1), (1, 1, 4096, 32, 8),
         (16, 16, 32768, 32, 8)]  # (q tokens, batch, cache, heads q, heads kv)


def main() -> None:
    limits = device_limits(0)
    default_config, default_splits = flash_decode.config, kvcache.split_plan
    print("| q | batch | cache | heads | block (row warps, stages) | splits | TB/s |")
    print("|---|---|---|---|---|---|---|")
    for seqlen_q, batch, cache, heads_q, heads_kv in CELLS:
        q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(BF16)
        k, v = (cupy.random.standard_normal((batch, cache, heads_kv, 128), dtype=cupy.float32).astype(BF16)
                for _ in range(2))
        lengths = cupy.full(batch, cache, cupy.int32)
        rows = seqlen_q * heads_q // heads_kv
        chosen = default_config(rows, 128, limits)
        problem = kvcache.DecodeProblem(batch, seqlen_q, heads_q, heads_kv, 128, "bfloat16", 0, cache, False, cache,
                                        0, batch, None, 128 ** -0.5, (-1, 0), 0, None)
        heuristic = default_splits(problem, chosen, 0)[0]
        configs = [chosen] + [c for c in (flash_decode.DecodeConfig(w, s) for w, s in itertools.product((1, 2), (2, 3)))
                              if c != chosen and 16 * c.row_warps >= min(rows, 32) and c.fits(128, limits)]
        kv_bytes = 2 * batch * cache * heads_kv * 128 * 2
        for cfg, splits in itertools.product(configs, sorted({heuristic, max(1, heuristic // 2),
                                                              min(256, 2 * heuristic)})):
            flash_decode.config = lambda packed_rows, head_dim, limits, cfg=cfg: cfg
            plan.clear()
            try:
                def call() -> object:
                    return cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, num_splits=splits)
                call()
                ms = do_bench(call, runs=20).median_ms
                result = f"{kv_bytes / (ms * 1e-3) / 1e12:.2f}"
            except Exception as exc:  # a config that does not fit: say so, go on
                result = f"failed: {str(exc)[:60]}"
            finally:
                flash_decode.config = default_config
            mark = " (default)" if cfg == chosen and splits == heuristic else ""
            print(f"| {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {cfg.row_warps}, {cfg.stages}{mark} | "
                  f"{splits} | {result} |", flush=True)
        del q, k, v
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
