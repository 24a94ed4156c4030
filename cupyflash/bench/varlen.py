"""What the variable-length benchmark times: packed batches of sequences (cu_seqlens), the FLOPs
of their real tokens, and the bars the issue sets against the dense call.

Two kinds of batch, per dtype and head dim (heads = 2048 // head_dim, as in the paper grid):

    equal   EQUAL_BATCHES: 16 x 1024, 4 x 4096, 2 x 8192 (16384 tokens each), causal and not;
            compared with the dense call on the same tokens, (batch, seqlen) = (sequences,
            length): the bar is EQUAL_BAR of its TFLOP/s, forward and backward
    mixed   MIXED_SEQUENCES lengths uniform in MIXED_LENGTHS (numpy default_rng(MIXED_SEED)),
            causal; compared with the dense call at their mean length on the same total
            tokens, (sequences, tokens // sequences): the bar is MIXED_BAR

Queries and keys share the lengths (self-attention). FLOPs count only real tokens: per
sequence 4·L²·D·H forward, halved when causal as grid.flops halves the dense count, and the
backward 2.5 × the forward. For an equal batch that is exactly the dense call's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..validation import cu_seqlens
from .grid import DTYPES, PASSES, BenchShape, check_dtypes_and_head_dims

EQUAL_BATCHES = ((16, 1024), (4, 4096), (2, 8192))  # (sequences, length)
MIXED_SEQUENCES, MIXED_LENGTHS, MIXED_SEED = 64, (128, 8192), 0
EQUAL_BAR, MIXED_BAR = 0.97, 0.90  # varlen TFLOP/s / dense TFLOP/s the issue asks for
HIDDEN = 2048  # heads * head_dim, as in grid.paper_grid
KINDS = ("equal", "mixed")


@dataclass(frozen=True)
class VarlenBatch:
    """One packed batch: q, k, v are (tokens, heads, head_dim), sequence b owning rows
    cu_seqlens[b]:cu_seqlens[b + 1]; seqlen_q == seqlen_k per sequence."""

    kind: str  # "equal" | "mixed"
    dtype: str
    head_dim: int
    heads: int
    causal: bool
    lengths: tuple[int, ...]
    spec: str  # how the lengths were made: "16x1024", "64x[128,8192]s0"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind is {self.kind!r}; a varlen batch is one of {KINDS}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths are {self.lengths}; a batch needs at least one sequence, each of >= 1 token")
        if self.kind == "equal" and len(set(self.lengths)) != 1:
            raise ValueError(f"an equal batch has one length, got {sorted(set(self.lengths))}")
        if self.tokens % self.sequences:
            raise ValueError(f"{self.tokens} tokens in {self.sequences} sequences: the dense call it is compared "
                             "with, (sequences, tokens // sequences), needs a whole mean length")

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def cu_seqlens(self) -> np.ndarray:
        """int32 (sequences + 1,): 0, then the running sum of the lengths."""
        return cu_seqlens(self.lengths)

    @property
    def dense_shape(self) -> BenchShape:
        """The dense call on the same tokens: (sequences, mean length), heads and head_dim alike."""
        return BenchShape(self.dtype, self.head_dim, self.tokens // self.sequences, self.causal, self.sequences,
                          self.heads)

    @property
    def bar(self) -> float:
        """The varlen / dense TFLOP/s ratio the issue asks for."""
        return EQUAL_BAR if self.kind == "equal" else MIXED_BAR

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.kind}-{self.dtype}-d{self.head_dim}-{mask}-{self.spec}-h{self.heads}"


def mixed_lengths(count: int = MIXED_SEQUENCES, low: int = MIXED_LENGTHS[0], high: int = MIXED_LENGTHS[1],
                  seed: int = MIXED_SEED) -> tuple[int, ...]:
    """`count` lengths drawn uniformly from [low, high] by numpy.random.default_rng(seed), then
    nudged by one token each so that they add up to a multiple of `count` (the dense call's
    tokens): the (total % count) longest lose one, or, when one of those is already `low`, the
    (count - total % count) shortest gain one. Deterministic for a given seed."""
    if count < 1 or not 1 <= low <= high:
        raise ValueError(f"need count >= 1 and 1 <= low <= high, got count={count}, low={low}, high={high}")
    lengths = np.random.default_rng(seed).integers(low, high, endpoint=True, size=count)
    excess = int(lengths.sum()) % count
    order = np.argsort(-lengths, kind="stable")  # longest first
    if excess and lengths[order[excess - 1]] > low:
        lengths[order[:excess]] -= 1
    elif excess:  # the excess-th longest is `low`, so every shorter one is too, and low < high
        lengths[order[excess:]] += 1
    return tuple(int(n) for n in lengths)


def equal_batch(dtype: str, head_dim: int, sequences: int, length: int, causal: bool,
                hidden: int = HIDDEN) -> VarlenBatch:
    return VarlenBatch("equal", dtype, head_dim, hidden // head_dim, causal, (length,) * sequences,
                       f"{sequences}x{length}")


def mixed_batch(dtype: str, head_dim: int, count: int = MIXED_SEQUENCES, low: int = MIXED_LENGTHS[0],
                high: int = MIXED_LENGTHS[1], seed: int = MIXED_SEED, hidden: int = HIDDEN) -> VarlenBatch:
    return VarlenBatch("mixed", dtype, head_dim, hidden // head_dim, True, mixed_lengths(count, low, high, seed),
                       f"{count}x[{low},{high}]s{seed}")


def varlen_batches(dtypes: Sequence[str] = DTYPES, head_dims: Sequence[int] = (128,),
                   causal: Sequence[bool] = (False, True), hidden: int = HIDDEN) -> list[VarlenBatch]:
    """Per dtype and head dim: the EQUAL_BATCHES for each mask in `causal`, then the mixed batch
    (always causal, as the issue defines it)."""
    check_dtypes_and_head_dims(dtypes, head_dims, hidden)
    batches = []
    for dtype in dtypes:
        for head_dim in head_dims:
            batches += [equal_batch(dtype, head_dim, n, length, bool(c), hidden)
                        for c in causal for n, length in EQUAL_BATCHES]
            batches.append(mixed_batch(dtype, head_dim, hidden=hidden))
    return batches


def varlen_flops(lengths_q: Sequence[int], heads: int, head_dim: int, causal: bool, pass_: str,
                 lengths_k: Sequence[int] | None = None) -> float:
    """FLOPs of one pass over the real tokens: sum over sequences of 4·Sq·Sk·D·H forward,
    halved when causal (as grid.flops), backward 2.5 × forward. lengths_k defaults to lengths_q."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    lengths_k = lengths_q if lengths_k is None else lengths_k
    if len(lengths_k) != len(lengths_q):
        raise ValueError(f"{len(lengths_q)} query lengths but {len(lengths_k)} key lengths; one of each per sequence")
    forward = sum(4.0 * sq * sk * head_dim * heads for sq, sk in zip(lengths_q, lengths_k))
    if causal:
        forward /= 2
    return forward if pass_ == "fwd" else 2.5 * forward


def batch_flops(batch: VarlenBatch, pass_: str) -> float:
    return varlen_flops(batch.lengths, batch.heads, batch.head_dim, batch.causal, pass_)


def segments(lengths: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive equal lengths as (first row, stop row, sequences, length): the packed
    rows of each run viewed as one dense (sequences, length, H, D) problem. An equal batch is one
    run, the dense call's own shape."""
    runs: list[tuple[int, int, int, int]] = []
    start = 0
    for length in lengths:
        if runs and runs[-1][3] == length:
            first, _, count, _ = runs[-1]
            runs[-1] = (first, start + length, count + 1, length)
        else:
            runs.append((start, start + length, 1, length))
        start += length
    return runs
