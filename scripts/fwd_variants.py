"""EXPERIMENT: forward kernels forced against each other and torch's cuDNN backend on a few
cells of the paper grid (not a test; `cupyflash bench` is the record).

    PYTHONPATH=$PWD [FWD_ONLY_WIDE=1] python scripts/fwd_variants.py [CELL ...]   CELL = DTYPE,HEAD_DIM,SEQLEN,CAUSAL (0/1)

FWD_ONLY_WIDE=1 times only the default TMA config and its wide_pv twin.

For each cell: the default config, every flash_fwd_tma candidate, and cuDNN (when torch has it),
in TFLOP/s from the median of timing.do_bench (L2 flushed), batch = 16384 / seqlen and
heads = 2048 / head_dim as in the paper grid; plus each forced config's largest error against
the default one's output (both exact attention: expect a few ulps of the dtype).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import cupy

import cupyflash as cf
from cupyflash import plan
from cupyflash.device import device_limits
from cupyflash.kernels import flash_fwd_tma
from cupyflash.kernels.common import kernel_head_dim
from cupyflash.problem import Problem
from cupyflash.timing import do_bench
from variant_cells import HEADER, paper_grid_arrays, parse, print_rows

CELLS = ["bfloat16,128,8192,0", "bfloat16,128,8192,1", "float16,64,4096,0", "bfloat16,256,4096,1",
         "bfloat16,96,4096,0", "bfloat16,160,4096,0"]


def cudnn(q, k, v, causal):
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    from cupyflash.bench.peers import _to_torch
    tq, tk, tv = (_to_torch(torch, x, contiguous=True) for x in (q, k, v))

    def run():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    try:
        run()
    except RuntimeError as error:
        print(f"  cuDNN: {str(error).splitlines()[0]}")
        return None
    return run


def main() -> None:
    cells = sys.argv[1:] or CELLS
    limits = device_limits(0)
    print(f"{limits.name}")
    print(HEADER)
    for cell in cells:
        dtype, dim, seqlen, causal = parse(cell)
        q, k, v = paper_grid_arrays(dtype, dim, seqlen, 3)
        flops = 4 * q.size * seqlen // (2 if causal else 1)
        base_out = cf.attention(q, k, v, causal=causal)
        base_ms = do_bench(lambda: cf.attention(q, k, v, causal=causal), runs=30).median_ms
        rows = [("default " + str(plan.choose("fwd", Problem.from_arrays(q, k, v, causal=causal), limits)),
                 base_ms, 0.0)]
        configs = flash_fwd_tma.candidates(kernel_head_dim(dim), limits)  # (80 runs on the 96 kernel)
        if os.environ.get("FWD_ONLY_WIDE"):  # the default TMA config against its wide-P V twin only
            default = flash_fwd_tma.default(kernel_head_dim(dim), limits)
            configs = [c for c in configs if dataclasses.replace(c, wide_pv=False) == default]
        for config in configs:
            with plan.forced(fwd=config):
                out = cf.attention(q, k, v, causal=causal)
                diff = float(cupy.abs(out.astype(cupy.float32) - base_out.astype(cupy.float32)).max())
                ms = do_bench(lambda: cf.attention(q, k, v, causal=causal), runs=30).median_ms
            name = (f"tma n{config.block_n} s{config.stages}" + (" pingpong" if config.pingpong else "")
                    + (" wide-pv" if config.wide_pv else ""))
            rows.append((name, ms, diff))
        run = cudnn(q, k, v, causal)
        if run is not None:
            rows.append(("cuDNN", do_bench(run, runs=30).median_ms, float("nan")))
        print_rows((dtype, dim, seqlen, causal), flops, rows)


if __name__ == "__main__":
    main()
