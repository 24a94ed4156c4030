"""EXPERIMENT: flash_decode compiled with extra -D macros, timed on a few cells (not a test).

    PYTHONPATH=$PWD python scripts/decode_variants.py NAME=MACRO:VALUE,MACRO:VALUE ...
    (NAME=SOURCE:../old/flash_decode.cu: that file in place of kernels_cu/flash_decode.cu)

Each variant's TB/s (bytes of K and V read once over the median time of timing.do_bench) on
each cell, with the L2 flushed and host work hidden, and without either.
"""

from __future__ import annotations

import os
import sys

import cupy
import ml_dtypes

import cupyflash as cf
from cupyflash import build, plan
from cupyflash.kernels import flash_decode
from cupyflash.timing import do_bench
from profile_cases import profile_once  # scripts/ is on sys.path when a script runs

BF16 = ml_dtypes.bfloat16
CELLS = [(1, 16, 32768, 32, 8), (1, 1, 4096, 32, 8), (1, 1, 4096, 8, 1), (1, 64, 32768, 32, 8),
         (1, 1, 131072, 32, 8), (16, 16, 32768, 32, 8)]
if os.environ.get("DECODE_CELLS"):  # "Q,BATCH,CACHE,HEADS_Q,HEADS_KV;..."
    CELLS = [tuple(int(x) for x in cell.split(",")) for cell in os.environ["DECODE_CELLS"].split(";")]
# DECODE_NCU=1: no timing; each variant's second call runs between cudaProfilerStart and Stop
# (ncu --profile-from-start off sees one call per variant and cell, in the printed order).
NCU = bool(os.environ.get("DECODE_NCU"))


def parse_macros(text: str) -> tuple[tuple[str, str], ...]:
    """"MACRO:VALUE,MACRO:VALUE" as -D pairs."""
    return tuple(tuple(m.split(":")) for m in text.split(","))


def with_macros(spec_of, macros: tuple[tuple[str, str], ...]):
    """spec_of (flash_decode.spec) whose kernels compile with these -D macros as well; the pair
    SOURCE:PATH compiles PATH (relative to kernels_cu/) in place of the kernel's own file, e.g. an
    earlier version of it kept for a comparison."""
    source = dict(macros).get("SOURCE")
    defines = tuple(m for m in macros if m[0] != "SOURCE")

    def patched(*args, **kwargs):
        s = spec_of(*args, **kwargs)
        return build.KernelSpec(source or s.source, s.entry, s.defines + defines, s.arch_suffix)
    return patched


def main() -> None:
    variants = [("baseline", ())]
    for arg in sys.argv[1:]:
        name, macros = arg.split("=")
        if macros.startswith("@"):  # @ROW_WARPS,STAGES: that decode block, no macros
            variants.append((name, tuple(int(x) for x in macros[1:].split(","))))
        else:
            variants.append((name, parse_macros(macros)))
    original, original_config = flash_decode.spec, flash_decode.config
    print("| variant | q | batch | cache | heads | splits | TB/s | TB/s no flush/hide |")
    print("|---|---|---|---|---|---|---|---|")
    for seqlen_q, batch, cache, heads_q, heads_kv in CELLS:
        q = cupy.random.standard_normal((batch, seqlen_q, heads_q, 128), dtype=cupy.float32).astype(BF16)
        k, v = (cupy.random.standard_normal((batch, cache, heads_kv, 128), dtype=cupy.float32).astype(BF16)
                for _ in range(2))
        lengths = cupy.full(batch, cache, cupy.int32)
        kv_bytes = 2 * batch * cache * heads_kv * 128 * 2
        reference = None
        for name, macros in variants:
            if macros and isinstance(macros[0], int):
                block = flash_decode.DecodeConfig(*macros)
                flash_decode.config = lambda *a, block=block: block
                flash_decode.spec = original
            else:
                flash_decode.config = original_config
                flash_decode.spec = with_macros(original, macros)
            plan.clear()
            for splits in (0,):
                def call() -> object:
                    return cf.attention_with_kvcache(q, k, v, cache_seqlens=lengths, num_splits=splits)
                out = call()
                if reference is None:
                    reference = out
                diff = float(cupy.abs(out.astype(cupy.float32) - reference.astype(cupy.float32)).max())
                if NCU:
                    profile_once(call)
                    print(f"profiled {name} {seqlen_q},{batch},{cache},{heads_q},{heads_kv} diff {diff:.1e}", flush=True)
                    continue
                ms = do_bench(call, runs=30).median_ms
                ms2 = do_bench(call, runs=30, flush_l2=False, hide_host=False).median_ms
                print(f"| {name} | {seqlen_q} | {batch} | {cache} | {heads_q}/{heads_kv} | {splits} | "
                      f"{kv_bytes / (ms * 1e-3) / 1e12:.2f} ({ms * 1e3:.1f} us) | "
                      f"{kv_bytes / (ms2 * 1e-3) / 1e12:.2f} ({ms2 * 1e3:.1f} us) | diff {diff:.1e}", flush=True)
        flash_decode.spec, flash_decode.config = original, original_config
        del q, k, v, reference
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
