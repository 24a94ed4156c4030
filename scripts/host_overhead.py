#!/usr/bin/env python3
"""Host time per call: cupyflash.attention / attention_backward against PyTorch SDPA, on a shape
so small that the GPU work is negligible, calls queued back to back (no sync in between).

This is the time Python spends before the kernels are queued. For short sequences it shows up
in every timing that brackets one call with CUDA events (ours and the peers'), so it is part of
the speed a user sees.

The decode rows time attention_with_kvcache on a tiny cache (one token, 8 q heads over 1 kv
head, 64 cached keys, cache_seqlens on the device) with its cached plan: one launch (no split),
two (appending one token) and three (appending, 4 splits, the combine); then the parts of the
one-launch call's cached plan, each timed alone (allocating the outputs, writing the pointers
and launching, launching alone); the rest of the call is the argument handling and the lookup.

Two rows per function: a repeat call with the same arrays and options, served by its cached
launch plan (cupyflash/plan.py), and the full path that a call takes when no plan serves it
(DLPack or NumPy inputs, a forced config, new shapes), timed by forgetting the plans before
each call (the kernels stay loaded). Two more rows time the forward's allocations: two
cupy.empty calls against one cupy.cuda.alloc split into out and lse by two views.

    python scripts/host_overhead.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

import cupy  # noqa: E402

import cupyflash  # noqa: E402
from cupyflash import environment, plan  # noqa: E402


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def check_repeat_equals_first(q, k, v, dout, first) -> None:
    """Validate before timing: repeat calls (cached plans) give bitwise the first calls' results."""
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, (out, lse, *grads)):
        unsigned = cupy.uint16 if a.dtype.itemsize == 2 else cupy.uint32
        if not cupy.array_equal(a.view(unsigned), b.view(unsigned)):
            raise SystemExit(f"{name} of a repeat call differs from the first call's: not timing")


def allocation_rows(shape: tuple[int, ...], calls: int, sync) -> dict[str, float]:
    """Two cupy.empty (what a plan does) against one allocation split by two ndarray views."""
    lse_shape = (shape[0], shape[2], shape[1])
    out_bytes = -(-math.prod(shape) * 2 // 256) * 256  # lse starts 256-byte aligned
    total = out_bytes + math.prod(lse_shape) * 4

    def one_alloc():
        memory = cupy.cuda.alloc(total)
        return (cupy.ndarray(shape, cupy.float16, memptr=memory),
                cupy.ndarray(lse_shape, cupy.float32, memptr=memory + out_bytes))

    return {"alloc: 2 x cupy.empty": per_call_us(lambda: (cupy.empty(shape, cupy.float16),
                                                          cupy.empty(lse_shape, cupy.float32)), calls, sync),
            "alloc: 1 alloc + 2 views": per_call_us(one_alloc, calls, sync)}


def decode_rows(calls: int, sync) -> dict[str, float]:
    """attention_with_kvcache's cached plan with 1, 2 and 3 launches (module docstring)."""
    q = cupy.random.standard_normal((1, 1, 8, 64)).astype(cupy.float16)
    k_cache, v_cache = (cupy.random.standard_normal((1, 256, 1, 64)).astype(cupy.float16) for _ in range(2))
    k_new, v_new = (cupy.random.standard_normal((1, 1, 1, 64)).astype(cupy.float16) for _ in range(2))
    lengths = cupy.full(1, 64, cupy.int32)

    def attend():
        return cupyflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, num_splits=1)

    def append():
        return cupyflash.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                                num_splits=1)

    def split():
        return cupyflash.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                                num_splits=4)

    rows = {"decode, 1 launch": per_call_us(attend, calls, sync),
            "decode, append: 2 launches": per_call_us(append, calls, sync),
            "decode, append+split: 3": per_call_us(split, calls, sync)}
    # Where the one-launch call's time goes: its cached plan's parts, each timed alone.
    plan.clear()
    attend()
    (decode_plan,) = plan._local.plans.values()
    given = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": lengths}
    stream_ptr = cupy.cuda.get_current_stream().ptr
    filled = dict(given)
    plan.allocate(decode_plan.buffers, filled)
    rows.update({
        "  of it: plan.run": per_call_us(lambda: decode_plan.run(dict(given)), calls, sync),
        "  of it: outputs allocated": per_call_us(lambda: plan.allocate(decode_plan.buffers, {}), calls, sync),
        "  of it: pointers + launch": per_call_us(lambda: decode_plan.launch(filled), calls, sync),
        "  of it: launch alone": per_call_us(lambda: [k.run(stream_ptr) for k in decode_plan.launches], calls, sync),
    })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    shape = (1, 128, 2, 64)  # (batch, seqlen, heads, head_dim)
    q, k, v, dout = (cupy.random.standard_normal(shape).astype(cupy.float16) for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    grads = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    check_repeat_equals_first(q, k, v, dout, (out, lse, *grads))
    sync = cupy.cuda.Device().synchronize

    def fwd():
        return cupyflash.attention(q, k, v, causal=True)

    def bwd():
        return cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)

    def full_path(fn):
        return lambda: (plan.clear(), fn())

    rows = {"cupyflash fwd": per_call_us(fwd, args.calls, sync),
            "cupyflash fwd, full path": per_call_us(full_path(fwd), args.calls, sync),
            "cupyflash bwd": per_call_us(bwd, args.calls, sync),
            "cupyflash bwd, full path": per_call_us(full_path(bwd), args.calls, sync)}
    rows.update(allocation_rows(shape, args.calls, sync))
    rows.update(decode_rows(args.calls, sync))
    try:
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16, requires_grad=True)
                      for _ in range(3))
        rows["torch sdpa fwd"] = per_call_us(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True),
                                             args.calls, torch.cuda.synchronize)
        tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        grad = torch.randn_like(tout)
        rows["torch sdpa fwd+bwd"] = per_call_us(
            lambda: torch.autograd.grad(F.scaled_dot_product_attention(tq, tk, tv, is_causal=True), (tq, tk, tv),
                                        grad), args.calls, torch.cuda.synchronize)
    except ImportError:
        pass
    print(f"host microseconds per call, shape {shape} float16 causal, {args.calls} calls queued back to back")
    print(environment.describe(environment.record()))
    for label, us in rows.items():
        print(f"  {label:28s} {us:8.1f}")
    print(json.dumps({k: round(v, 1) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
