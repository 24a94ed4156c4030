#!/usr/bin/env python3
"""Run one attention call (forward, or forward then backward) a few times on random inputs: a
target for profilers (ncu, nsys, compute-sanitizer) that want the kernels of one shape and
nothing else. Works on any checkout (without --varlen it uses only attention and attention_backward).

    python scripts/one_call.py --pass bwd --shape 2,8192,16,128 --dtype bfloat16 [--causal] [--deterministic] [--repeat 3]
        [--varlen]   (the same tokens as B packed sequences: attention_varlen)
"""
import argparse

import cupy
import numpy as np

import cupyflash as cf
from cupyflash.problem import numpy_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pass", dest="which", choices=("fwd", "bwd"), default="bwd")
    parser.add_argument("--shape", default="2,8192,16,128", help="B,S,H,D")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--varlen", action="store_true",
                        help="the same tokens as a packed batch of B sequences of S (attention_varlen)")
    args = parser.parse_args()
    batch, seqlen, heads, head_dim = (int(x) for x in args.shape.split(","))
    dtype = numpy_dtype(args.dtype)
    rng = cupy.random.default_rng(0)

    def draw():  # signed normal; bfloat16 as the top half of float32 (CuPy has no bfloat16 cast)
        x = rng.standard_normal((batch, seqlen, heads, head_dim), dtype=np.float32)
        if args.dtype == "float16":
            return x.astype(dtype)
        return (x.view(cupy.uint32) >> 16).astype(cupy.uint16).view(dtype)

    q, k, v, dout = draw(), draw(), draw(), draw()
    if args.varlen:
        q, k, v, dout = (x.reshape(batch * seqlen, heads, head_dim) for x in (q, k, v, dout))
        cu = cupy.arange(0, batch * seqlen + 1, seqlen, dtype=cupy.int32)
        lengths = (cu, cu, seqlen, seqlen)
    for _ in range(args.repeat):
        if args.varlen:
            out, lse = cf.attention_varlen(q, k, v, *lengths, causal=args.causal, return_lse=True)
            if args.which == "bwd":
                cf.attention_varlen_backward(dout, q, k, v, out, lse, *lengths, causal=args.causal,
                                             deterministic=args.deterministic)
            continue
        out, lse = cf.attention(q, k, v, causal=args.causal, return_lse=True)
        if args.which == "bwd":
            cf.attention_backward(dout, q, k, v, out, lse, causal=args.causal, deterministic=args.deterministic)
    cupy.cuda.runtime.deviceSynchronize()


if __name__ == "__main__":
    main()
