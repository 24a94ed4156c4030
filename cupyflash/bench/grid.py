"""What is benchmarked: the shapes (the FlashAttention papers' grid), the passes, the names of
the implementations, and the FLOP count that turns a time into TFLOP/s.

FLOPs follow the FlashAttention papers: fwd = 4·B·H·S²·D, halved when causal; bwd = 2.5 × fwd.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

DTYPES = ("float16", "bfloat16")
PASSES = ("fwd", "bwd")
IMPLS = ("cupyflash", "cupyflash-det", "naive-cupy", "torch-flash", "torch-cudnn", "torch-efficient", "flash-attn-4")
IMPL_PASSES = {"cupyflash-det": ("bwd",)}  # every other impl runs both passes
RATIO_PEERS = ("torch-flash", "torch-cudnn", "flash-attn-4")  # the table's "cupyflash / peer" columns, where present
PASS_TENSORS = {"fwd": ("out",), "bwd": ("dq", "dk", "dv")}  # what each pass returns, in order


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked problem: q, k, v are (batch, seqlen, heads, head_dim); seqlen_q == seqlen_k."""

    dtype: str  # "float16" | "bfloat16"
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.dtype}-d{self.head_dim}-s{self.seqlen}-{mask}-b{self.batch}h{self.heads}"

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(batch, seqlen, heads, head_dim): the shape of q, k, v and dout."""
        return self.batch, self.seqlen, self.heads, self.head_dim


def check_dtypes_and_head_dims(dtypes: Sequence[str], head_dims: Sequence[int], hidden: int) -> None:
    """Benchmarked dtypes, and head dims that leave at least one head: heads = hidden // head_dim."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not benchmarked; choose from {DTYPES}")
    for head_dim in head_dims:
        if not 0 < head_dim <= hidden:
            raise ValueError(f"head_dim {head_dim} must be in [1, hidden = {hidden}]: heads = hidden // head_dim")


def paper_grid(dtypes: Sequence[str] = DTYPES, head_dims: Sequence[int] = (64, 128, 256),
               seqlens: Sequence[int] = (512, 1024, 2048, 4096, 8192, 16384),
               causal: Sequence[bool] = (False, True), tokens: int = 16384, hidden: int = 2048) -> list[BenchShape]:
    """The FlashAttention papers' grid: batch = tokens // seqlen, heads = hidden // head_dim.

    Ordered dtype, head_dim, seqlen, causal (the order of PEERS.md's table).
    """
    check_dtypes_and_head_dims(dtypes, head_dims, hidden)
    for seqlen in seqlens:
        if not 0 < seqlen <= tokens:
            raise ValueError(f"seqlen {seqlen} must be in [1, tokens = {tokens}]: batch = tokens // seqlen")
    return [BenchShape(dtype, d, s, bool(c), tokens // s, hidden // d)
            for dtype, d, s, c in itertools.product(dtypes, head_dims, seqlens, causal)]


def quick_grid() -> list[BenchShape]:
    """A few minutes' worth: float16, head_dim 64 and 128, seqlen 1024 and 4096, causal and not."""
    return paper_grid(dtypes=("float16",), head_dims=(64, 128), seqlens=(1024, 4096))


def flops(shape: BenchShape, pass_: str) -> float:
    """Floating-point operations of one pass: fwd = 4·B·H·S²·D (halved when causal), bwd = 2.5 × fwd."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    forward = 4.0 * shape.batch * shape.heads * shape.seqlen * shape.seqlen * shape.head_dim
    if shape.causal:
        forward /= 2
    return forward if pass_ == "fwd" else 2.5 * forward


def tflops(shape: BenchShape, pass_: str, ms: float) -> float:
    """TFLOP/s of one pass that took `ms` milliseconds."""
    return flops(shape, pass_) / (ms * 1e-3) / 1e12
