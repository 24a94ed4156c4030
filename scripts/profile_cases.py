"""One call of a case, twice (a warm-up and the one to profile), for running under ncu or nsys:

    ncu --clock-control none --launch-skip K -k regex:flash_decode python scripts/profile_cases.py decode 1 16 4096 32 8 [PAGE]
    ncu --clock-control none --metrics gpu__time_duration.sum python scripts/profile_cases.py varlen-bwd 16 1024

decode Q BATCH CACHE HEADS_Q HEADS_KV [PAGE]: attention_with_kvcache, bf16, head_dim 128, a full
cache (paged with pages of PAGE keys in shuffled order when given). varlen-bwd COUNT LENGTH: the
backward of attention_varlen over COUNT equal sequences, then of attention on the same tokens
(bf16, 16 heads, head_dim 128, not causal), so their kernels can be compared one by one.
"""

from __future__ import annotations

import sys

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash.bench.decode import block_table
from cupyflash.bench.decode_run import paged_cache

BF16 = ml_dtypes.bfloat16


def _normal(*shape: int) -> cupy.ndarray:
    return cupy.random.standard_normal(shape, dtype=cupy.float32).astype(BF16)


def decode(seqlen_q: int, batch: int, cache: int, heads_q: int, heads_kv: int, page: int = 0) -> None:
    q, k, v = _normal(batch, seqlen_q, heads_q, 128), _normal(batch, cache, heads_kv, 128), _normal(batch, cache, heads_kv, 128)
    options = {}
    if page:  # the layout bench --decode times: pages in one shuffled order (bench/decode.py)
        table = cupy.asarray(block_table(batch, cache // page))
        k, v, options["block_table"] = paged_cache(k, page, table, cupy), paged_cache(v, page, table, cupy), table
    lengths = cupy.full(batch, cache, cupy.int32)
    for _ in range(2):
        cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, **options)
    cupy.cuda.runtime.deviceSynchronize()


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


if __name__ == "__main__":
    kind, numbers = sys.argv[1], [int(x) for x in sys.argv[2:]]
    {"decode": decode, "varlen-bwd": varlen_bwd}[kind](*numbers)
