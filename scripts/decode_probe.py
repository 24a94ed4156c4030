"""A few decode cells timed quickly against torch's cuDNN SDPA, for kernel work between full
`cupyflash bench --decode` runs: TB/s (K and V bytes read once over the time), and the copy
bandwidth of the GPU measured in the same process.

    PYTHONPATH=$PWD python scripts/decode_probe.py [--paged 16] [--splits N]
"""

from __future__ import annotations

import argparse
import time

import cupy
import ml_dtypes
import numpy as np

import cupyflash as cf
from cupyflash.timing import do_bench

bf = ml_dtypes.bfloat16

CELLS = [  # (q tokens, batch, cache, heads q, heads kv)
    (1, 16, 4096, 32, 8), (1, 16, 32768, 32, 8), (1, 2, 131072, 32, 8), (1, 1, 262144, 8, 1), (1, 64, 32768, 32, 8),
    (4, 64, 8192, 32, 8), (8, 16, 32768, 32, 8), (16, 16, 32768, 32, 8), (16, 1, 131072, 8, 1), (1, 1, 4096, 8, 1),
]


def copy_bandwidth() -> float:
    src = cupy.empty(2 << 30, cupy.uint8)
    dst = cupy.empty_like(src)
    ms = do_bench(lambda: dst.__setitem__(Ellipsis, src), flush_l2=False).median_ms
    return 2 * src.nbytes / (ms * 1e-3) / 1e12


def torch_cudnn(q: cupy.ndarray, k: cupy.ndarray, v: cupy.ndarray):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (torch.from_dlpack(x.view(cupy.int16)).view(torch.bfloat16).transpose(1, 2) for x in (q, k, v))

    def run() -> object:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paged", type=int, default=0)
    parser.add_argument("--splits", type=int, default=0)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth:.2f} TB/s (read + write)")
    print("| q | batch | cache | heads | cupyflash TB/s | of copy | cuDNN TB/s | ours / cuDNN | ms | host us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for seqlen_q, batch, cache, heads_q, heads_kv in CELLS:
        q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(bf)
        k = cupy.random.standard_normal((batch, cache, heads_kv, 128), dtype=cupy.float32).astype(bf)
        v = cupy.random.standard_normal((batch, cache, heads_kv, 128), dtype=cupy.float32).astype(bf)
        options = {}
        if args.paged:
            pages = cache // args.paged
            order = cupy.asarray(rng.permutation(batch * pages).astype(np.int32))
            kp, vp = (cupy.empty((batch * pages, args.paged, heads_kv, 128), bf) for _ in range(2))
            kp[order] = k.reshape(batch * pages, args.paged, heads_kv, 128)
            vp[order] = v.reshape(batch * pages, args.paged, heads_kv, 128)
            options["block_table"] = order.reshape(batch, pages)
            kc, vc = kp, vp
        else:
            kc, vc = k, v
        lengths = cupy.full(batch, cache, cupy.int32)
        ours = lambda: cf.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, num_splits=args.splits, **options)
        out = ours()
        ms = do_bench(ours, runs=30).median_ms
        cupy.cuda.get_current_stream().synchronize()
        started = time.perf_counter()
        for _ in range(200):  # the cached plan's host time per call (the launches queue behind each other)
            ours()
        host_us = (time.perf_counter() - started) / 200 * 1e6
        cupy.cuda.get_current_stream().synchronize()
        kv_bytes = 2 * batch * cache * heads_kv * 128 * 2
        tbps = kv_bytes / (ms * 1e-3) / 1e12
        peer, ratio, err = "-", "-", ""
        try:
            run = torch_cudnn(q, k, v)
            ref = run()
            import torch
            diff = (torch.from_dlpack(out.view(cupy.int16)).view(torch.bfloat16).float() - ref.transpose(1, 2).float())
            err = f" (max |ours - cudnn| {diff.abs().max().item():.3g})"
            peer_ms = do_bench(run, runs=30).median_ms
            peer, ratio = f"{kv_bytes / (peer_ms * 1e-3) / 1e12:.2f}", f"{peer_ms / ms:.2f}"
        except Exception as exc:
            err = f" cuDNN failed: {str(exc)[:80]}"
        print(f"| {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {tbps:.2f} | {tbps / bandwidth:.2f} | {peer} | "
              f"{ratio} | {ms:.3f} | {host_us:.1f} |{err}")
        del q, k, v, kc, vc
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
