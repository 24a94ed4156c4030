"""EXPERIMENT: the backward pass with its default dK/dV kernel against every Hopper (wgmma) dK/dV
candidate forced, and torch's cuDNN backward, on a few cells of the paper grid (not a test;
`cupyflash bench` is the record). It answers whether the wgmma dK/dV should become the default at
head dims 80, 96, 160 and 192, where the mma.sync kernel runs today. It also times
deterministic=True with its default dQ pass and with the mma.sync one (flash_bwd_dq) forced.

    PYTHONPATH=$PWD [BWD_VARIANTS_DKDV=0] [BWD_VARIANTS_DQ=1] python scripts/bwd_variants.py [CELL ...]
    CELL = DTYPE,HEAD_DIM,SEQLEN,CAUSAL (0/1); BWD_VARIANTS_DKDV=0 leaves out the forced dK/dV
    candidates, BWD_VARIANTS_DQ=1 adds every wgmma dQ-pass candidate (flash_bwd_dq_sm90) forced.

For each cell: TFLOP/s (2.5x the forward's matrix work, as the bench counts it) from the median of
timing.do_bench (L2 flushed), batch = 16384 / seqlen and heads = 2048 / head_dim as in the paper
grid; each forced config's largest dq/dk/dv difference from the default config's (both exact:
expect float32-atomic noise of a few ulps of the dtype).
"""

from __future__ import annotations

import contextlib
import os
import sys

import cupy
import numpy

import cupyflash as cf
from cupyflash import autotune, plan
from cupyflash.device import device_limits
from cupyflash.kernels import flash_bwd_dkdv_sm90, flash_bwd_dq, flash_bwd_dq_sm90
from cupyflash.kernels.common import kernel_head_dim
from cupyflash.problem import Problem, numpy_dtype
from cupyflash.timing import do_bench
from variant_cells import HEADER, paper_grid_arrays, parse, print_rows

CELLS = [f"bfloat16,{d},4096,{c}" for d in (80, 96, 160, 192) for c in (0, 1)] + ["bfloat16,128,4096,0"]


def max_diff(grads, base) -> float:
    """The largest difference between two sets of gradients, in float32."""
    return max(float(cupy.abs(g.astype(cupy.float32) - b.astype(cupy.float32)).max()) for g, b in zip(grads, base))


def cudnn_backward(q, k, v, dout, causal):
    """torch's cuDNN SDPA backward on contiguous (B, H, S, D) copies, or None without it."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    from cupyflash.bench.peers import _to_torch
    tq, tk, tv, tdo = (_to_torch(torch, x, contiguous=True) for x in (q, k, v, dout))
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (tq, tk, tv))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    except RuntimeError as error:
        print(f"  cuDNN: {str(error).splitlines()[0]}")
        return None
    return lambda: torch.autograd.grad(out, (qg, kg, vg), tdo, retain_graph=True)


def configs_of(dim: int, limits) -> list[plan.BwdConfig]:
    """Every wgmma dK/dV candidate at dim's kernel head dim (80 runs on 96's), with atomic dQ."""
    if os.environ.get("BWD_VARIANTS_DKDV", "1") == "0":
        return []
    kdim = kernel_head_dim(dim)
    dq = plan.default_bwd_config(kdim, limits).dq
    return [plan.BwdConfig(c, dq, dq_atomic=True) for c in flash_bwd_dkdv_sm90.candidates(kdim, limits)]


def dq_pass_configs_of(dim: int, limits) -> list[plan.BwdConfig]:
    """The default dK/dV with each wgmma dQ-pass candidate (BWD_VARIANTS_DQ=1), else none."""
    if os.environ.get("BWD_VARIANTS_DQ", "0") != "1":
        return []
    kdim = kernel_head_dim(dim)
    dkdv = plan.default_bwd_config(kdim, limits).dkdv
    return [plan.BwdConfig(dkdv, c, False) for c in flash_bwd_dq_sm90.candidates(kdim, limits)]


def mma_sync_dq_config(dim: int, limits) -> plan.BwdConfig:
    """The default dK/dV with the mma.sync dQ pass (deterministic=True before flash_bwd_dq_sm90)."""
    kdim = kernel_head_dim(dim)
    return plan.BwdConfig(plan.default_bwd_config(kdim, limits).dkdv, flash_bwd_dq.default(kdim, limits), False)


def precompile(cells: list[str], limits) -> None:
    """Every kernel the cells run, compiled into the disk cache in parallel first: one process
    would spend minutes in NVRTC between the timings."""
    specs = []
    for cell in cells:
        dtype, dim, seqlen, causal = parse(cell)
        problem = Problem.from_arrays(*(numpy.empty((1, 64, 2048 // dim, dim), numpy_dtype(dtype)),) * 3,
                                      causal=causal)
        specs += [c.spec for c in plan.forward_kernels(problem, plan.choose("fwd", problem, limits))]
        for config in [plan.choose("bwd", problem, limits), *configs_of(dim, limits)]:
            specs += [c.spec for c in plan.backward_kernels(problem, config, deterministic=False)]
        for config in (plan.choose("bwd", problem, limits), mma_sync_dq_config(dim, limits),
                       *dq_pass_configs_of(dim, limits)):
            specs += [c.spec for c in plan.backward_kernels(problem, config, deterministic=True)]
    autotune.precompile(specs, limits.arch)


def main() -> None:
    cells = sys.argv[1:] or CELLS
    limits = device_limits(0)
    print(limits.name)
    precompile(cells, limits)
    print(HEADER)
    for cell in cells:
        dtype, dim, seqlen, causal = parse(cell)
        q, k, v, dout = paper_grid_arrays(dtype, dim, seqlen, 4)
        flops = 2.5 * 4 * q.size * seqlen / (2 if causal else 1)
        out, lse = cf.attention(q, k, v, causal=causal, return_lse=True)

        def backward(deterministic=False):
            return cf.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=deterministic)

        base = backward()
        base_ms = do_bench(backward, runs=30).median_ms
        default = plan.choose("bwd", Problem.from_arrays(q, k, v, causal=causal), limits)
        rows = [(f"default {default.dkdv}", base_ms, 0.0)]
        for config in configs_of(dim, limits):
            with plan.forced(bwd=config):
                diff = max_diff(backward(), base)
                ms = do_bench(backward, runs=30).median_ms
            dkdv = config.dkdv
            rows.append((f"wgmma m{dkdv.block_m} n{dkdv.block_n} s{dkdv.stages}", ms, diff))
        for name, config in (("deterministic", None), ("deterministic, mma.sync dQ", mma_sync_dq_config(dim, limits))):
            with plan.forced(bwd=config) if config else contextlib.nullcontext():
                diff = max_diff(backward(True), base)
                ms = do_bench(lambda: backward(True), runs=30).median_ms
            rows.append((name, ms, diff))
        for config in dq_pass_configs_of(dim, limits):
            with plan.forced(bwd=config):
                ms = do_bench(lambda: backward(True), runs=30).median_ms
            dq = config.dq
            rows.append((f"dq pass m{dq.block_m} n{dq.block_n} s{dq.stages}", ms, float("nan")))
        run = cudnn_backward(q, k, v, dout, causal)
        if run is not None:
            rows.append(("cuDNN", do_bench(run, runs=30).median_ms, float("nan")))
        print_rows((dtype, dim, seqlen, causal), flops, rows)


if __name__ == "__main__":
    main()
