#!/usr/bin/env python3
"""Tune a subset of autotune buckets and print heuristic vs tuned TFLOP/s (a scripting front
end to cupyflash.autotune; `cupyflash autotune` is the user-facing command).

    python scripts/tune.py --dtype float16 --head-dim 64 --head-dim 128 --seqlen 2048 --kind fwd
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

from cupyflash import autotune, build, tuning  # noqa: E402
from cupyflash.device import current_device_id, device_limits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", action="append", choices=("fwd", "bwd"))
    parser.add_argument("--dtype", action="append", choices=("float16", "bfloat16"))
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--seqlen", action="append", type=int)
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    args = parser.parse_args()
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    buckets = [autotune.Bucket(kind, dtype, dim, c, seqlen) for kind, dtype, dim, c, seqlen in itertools.product(
        args.kind or ("fwd", "bwd"), args.dtype or ("float16", "bfloat16"), args.head_dim or (64, 128, 256),
        causal, args.seqlen or (2048, 8192))]
    limits = device_limits(current_device_id())
    print(f"{limits.name} ({limits.arch}), kernel source {build.source_hash()}, {len(buckets)} buckets")
    start = time.time()
    print(f"{'bucket':45s} {'heuristic':>10s} {'tuned':>8s}  winner")

    def show(result: autotune.BucketResult) -> None:
        h, t = result.tflops(result.heuristic_ms), result.tflops(result.best_ms)
        print(f"{result.bucket.key:45s} {h:10.1f} {t:8.1f}  {result.best}  ({len(result.rejected)} rejected)",
              flush=True)

    autotune.tune(buckets, on_result=show)
    print(f"done in {time.time() - start:.0f} s; stored in {tuning.tuning_file(limits)}")


if __name__ == "__main__":
    main()
