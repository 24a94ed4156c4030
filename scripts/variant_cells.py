"""What scripts/fwd_variants.py and scripts/bwd_variants.py share: their cells of the paper grid,
random inputs for one, and the table they print (experiments, not tests)."""

from __future__ import annotations

import sys

import cupy

from cupyflash.problem import numpy_dtype

HEADER = ("| dtype | d | S | causal | kernel | TFLOP/s | vs default | max diff |\n"
          "|---|---|---|---|---|---|---|---|")


def parse(cell: str) -> tuple[str, int, int, bool]:
    """DTYPE,HEAD_DIM,SEQLEN,CAUSAL (0/1)."""
    dtype, dim, seqlen, causal = cell.split(",")
    return dtype, int(dim), int(seqlen), bool(int(causal))


def paper_grid_arrays(dtype: str, dim: int, seqlen: int, count: int) -> list[cupy.ndarray]:
    """count random (batch, seqlen, heads, dim) arrays, batch = 16384 / seqlen and heads = 2048 / dim."""
    batch, heads = max(1, 16384 // seqlen), 2048 // dim
    return [cupy.random.standard_normal((batch, seqlen, heads, dim), dtype=cupy.float32).astype(numpy_dtype(dtype))
            for _ in range(count)]


def print_rows(cell: tuple[str, int, int, bool], flops: float, rows: list[tuple[str, float, float]]) -> None:
    """One table row per (name, median ms, max diff); the first row is the default every ratio is against."""
    dtype, dim, seqlen, causal = cell
    base_ms = rows[0][1]
    for name, ms, diff in rows:
        print(f"| {dtype} | {dim} | {seqlen} | {int(causal)} | {name} | {flops / ms / 1e9:.0f} | "
              f"{base_ms / ms:.2f} | {diff:.3g} |")
    sys.stdout.flush()
