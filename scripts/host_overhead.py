#!/usr/bin/env python3
"""Host time per call: cupyflash.attention / attention_backward against PyTorch SDPA, on a shape
so small that the GPU work is negligible, calls queued back to back (no sync in between).

This is the time Python spends before the kernels are queued. For short sequences it shows up
in every timing that brackets one call with CUDA events (ours and the peers'), so it is part of
the speed a user sees.

    python scripts/host_overhead.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

import cupy  # noqa: E402

import cupyflash  # noqa: E402
from cupyflash import build  # noqa: E402


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    shape = (1, 128, 2, 64)  # (batch, seqlen, heads, head_dim)
    q, k, v, dout = (cupy.random.standard_normal(shape).astype(cupy.float16) for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    sync = cupy.cuda.Device().synchronize
    rows = {"cupyflash fwd": per_call_us(lambda: cupyflash.attention(q, k, v, causal=True), args.calls, sync),
            "cupyflash bwd": per_call_us(lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True),
                                         args.calls, sync)}
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
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"host microseconds per call, shape {shape} float16 causal, {args.calls} calls queued back to back")
    print(f"{name.decode() if isinstance(name, bytes) else name} · kernel source {build.source_hash()}")
    for label, us in rows.items():
        print(f"  {label:20s} {us:8.1f}")
    print(json.dumps({k: round(v, 1) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
