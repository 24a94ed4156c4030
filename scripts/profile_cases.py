"""One call of a case, twice (a warm-up and the one to profile), for running under ncu or nsys.
The decode kinds run their second call between cudaProfilerStart and Stop, so
`ncu --profile-from-start off` sees that call's kernels alone (scripts/ncu_decode.sh):

    ncu --clock-control none --profile-from-start off python scripts/profile_cases.py decode 1 16 4096 32 8 [PAGE]
    ncu --clock-control none --metrics gpu__time_duration.sum python scripts/profile_cases.py varlen-bwd 16 1024

decode Q BATCH CACHE HEADS_Q HEADS_KV [PAGE]: attention_with_kvcache, bf16, head_dim 128, a full
cache (paged with pages of PAGE keys in shuffled order when given). decode-cudnn and decode-flash
Q BATCH CACHE HEADS_Q HEADS_KV: torch SDPA's cuDNN or flash backend on the same shapes, the
cache (B, S, H, D) in memory and viewed as (B, H, S, D), as bench --decode gives it (needs
torch; Q must be 1: no mask is passed). varlen-bwd COUNT LENGTH: the
backward of attention_varlen over COUNT equal sequences, then of attention on the same tokens
(bf16, 16 heads, head_dim 128, not causal), so their kernels can be compared one by one.
bwd BATCH SEQLEN HEADS HEAD_DIM CAUSAL and bwd-cudnn (the same through torch SDPA's cuDNN
backend): the second backward of a dense bf16 call alone between cudaProfilerStart and Stop, the
forward outside it, so `ncu --profile-from-start off --set full` reports the backward's kernels.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash.bench.decode import block_table
from cupyflash.bench.decode_run import paged_cache

BF16 = ml_dtypes.bfloat16


def _normal(*shape: int) -> cupy.ndarray:
    return cupy.random.standard_normal(shape, dtype=cupy.float32).astype(BF16)


def profile_once(call: Callable[[], object]) -> None:
    """call() once between cudaProfilerStart and Stop, the device idle before and after, so that
    `ncu --profile-from-start off` sees its kernels alone. The profiler range and the device
    synchronisation are the process's, so torch's kernels (the peers) are profiled the same way."""
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStart()
    call()
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStop()


def decode(seqlen_q: int, batch: int, cache: int, heads_q: int, heads_kv: int, page: int = 0) -> None:
    q, k, v = _normal(batch, seqlen_q, heads_q, 128), _normal(batch, cache, heads_kv, 128), _normal(batch, cache, heads_kv, 128)
    options = {}
    if page:  # the layout bench --decode times: pages in one shuffled order (bench/decode.py)
        table = cupy.asarray(block_table(batch, cache // page))
        k, v, options["block_table"] = paged_cache(k, page, table, cupy), paged_cache(v, page, table, cupy), table
    lengths = cupy.full(batch, cache, cupy.int32)
    cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, **options)
    profile_once(lambda: cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, **options))


def decode_torch(backend: str, seqlen_q: int, batch: int, cache: int, heads_q: int, heads_kv: int) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if seqlen_q != 1:
        raise SystemExit("decode-cudnn / decode-flash: one query token (no mask is passed)")
    q = torch.randn(batch, seqlen_q, heads_q, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(batch, cache, heads_kv, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    with sdpa_kernel(getattr(SDPBackend, backend)):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        profile_once(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def varlen_bwd(count: int, length: int) -> None:
    q, k, v, dout = (_normal(count * length, 16, 128) for _ in range(4))
    cu = cupy.arange(0, count * length + 1, length, dtype=cupy.int32)
    for _ in range(2):
        out, lse = cf.attention_varlen(q, k, v, cu, cu, length, length, return_lse=True)
        cf.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, length, length)
    dense = [x.reshape(count, length, 16, 128) for x in (q, k, v, dout)]
    for _ in range(2):
        out, lse = cf.attention(*dense[:3], return_lse=True)
        cf.attention_backward(dense[3], *dense[:3], out, lse)
    cupy.cuda.runtime.deviceSynchronize()


def backward(batch: int, seqlen: int, heads: int, head_dim: int, causal: int) -> None:
    q, k, v, dout = (_normal(batch, seqlen, heads, head_dim) for _ in range(4))
    out, lse = cf.attention(q, k, v, causal=bool(causal), return_lse=True)
    cf.attention_backward(dout, q, k, v, out, lse, causal=bool(causal))
    profile_once(lambda: cf.attention_backward(dout, q, k, v, out, lse, causal=bool(causal)))


def backward_cudnn(batch: int, seqlen: int, heads: int, head_dim: int, causal: int) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, dout = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        profile_once(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


if __name__ == "__main__":
    kind, numbers = sys.argv[1], [int(x) for x in sys.argv[2:]]
    kinds = {"decode": decode, "varlen-bwd": varlen_bwd, "bwd": backward, "bwd-cudnn": backward_cudnn,
             "decode-cudnn": functools.partial(decode_torch, "CUDNN_ATTENTION"),
             "decode-flash": functools.partial(decode_torch, "FLASH_ATTENTION")}
    kinds[kind](*numbers)
