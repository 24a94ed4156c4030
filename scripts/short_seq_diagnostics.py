#!/usr/bin/env python3
"""Short-sequence diagnostics: where the forward's host time goes, stage by stage, and the
kernel-only speed of the S = 1024 causal cells (CUDA events around 50 back-to-back calls, no L2
flush) beside three runs of the benchmark's own method, for cupyflash and torch's flash backend.

    python scripts/short_seq_diagnostics.py     (needs a GPU and PyTorch)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

import cupy  # noqa: E402
import torch  # noqa: E402

import cupyflash  # noqa: E402
from cupyflash import api, launch, plan, timing  # noqa: E402
from cupyflash.arrays import kernel_ready, wrap_all  # noqa: E402
from cupyflash.device import device_limits  # noqa: E402
from cupyflash.problem import Problem  # noqa: E402
from host_overhead import per_call_us  # noqa: E402  (scripts/, beside this file)


def per_call(fn, calls=3000):
    return per_call_us(fn, calls, cupy.cuda.Device().synchronize)


q = cupy.random.standard_normal((1, 128, 2, 64)).astype(cupy.float16)
placement = wrap_all(q=q)[1]


def _enter_exit():
    with api._device_of(placement):
        pass


limits = device_limits(0)
p = Problem.from_arrays(q, q, q, causal=True)
cfg = plan.choose("fwd", p, limits)
stream = cupy.cuda.get_current_stream()
t = {"q": q, "k": q, "v": q}
forward_plan = plan.build_forward(p, t, 0)
stages = {
    "attention(), cached plan": lambda: cupyflash.attention(q, q, q, causal=True),
    "attention(), full path": lambda: (plan.clear(), cupyflash.attention(q, q, q, causal=True)),
    "plan.find": lambda: plan.find("fwd", (q, q, q), (True, None, (-1, -1)), (0.0, None, 0.0, None)),
    "wrap_all": lambda: wrap_all(q=q, k=q, v=q, alibi_slopes=None),
    "Problem.from_arrays": lambda: Problem.from_arrays(q, q, q, causal=True),
    "_device_of enter/exit": lambda: _enter_exit(),
    "kernel_ready x3": lambda: [kernel_ready(q) for _ in range(3)],
    "cupy.empty x2": lambda: (cupy.empty(q.shape, q.dtype), cupy.empty((1, 2, 128), cupy.float32)),
    "plan.choose": lambda: plan.choose("fwd", p, limits),
    "launch.forward_params": lambda: launch.forward_params(p, t),
    "plan.build_forward": lambda: plan.build_forward(p, dict(t), 0),
    "Plan.launch (pointers, 1 launch)": lambda: forward_plan.launch(t),
}
for name, fn in stages.items():
    print(f"{name:28s} {per_call(fn):7.1f} us", flush=True)

# Kernel-only time vs the bench method, S = 1024 causal.
from torch.nn.attention import SDPBackend, sdpa_kernel
for dtype in ("float16", "bfloat16"):
    for d in (64, 128):
        S, B, H = 1024, 16, 2048 // d
        flops = 4 * B * H * S * S * d / 2
        tq = torch.randn(B, S, H, d, device="cuda", dtype=getattr(torch, dtype))
        cq = cupy.from_dlpack(tq)
        ours = lambda: cupyflash.attention(cq, cq, cq, causal=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            theirs = lambda: torch.nn.functional.scaled_dot_product_attention(
                tq.transpose(1, 2), tq.transpose(1, 2), tq.transpose(1, 2), is_causal=True)
            row = []
            for name, f in (("ours", ours), ("fa2", theirs)):
                bench = [flops / timing.do_bench(f, runs=20).median_ms / 1e9 for _ in range(3)]
                for _ in range(5):
                    f()
                cupy.cuda.Device().synchronize()
                s, e = cupy.cuda.Event(), cupy.cuda.Event()
                s.record()
                for _ in range(50):
                    f()
                e.record()
                e.synchronize()
                loop = flops / (cupy.cuda.get_elapsed_time(s, e) / 50) / 1e9
                row.append(f"{name}: bench x3 {[round(b) for b in bench]}, 50 back-to-back {loop:.0f}")
        print(dtype, d, " | ".join(row), flush=True)
