"""What the decode benchmark times: a few query tokens against a long KV cache
(cupyflash.attention_with_kvcache), the bytes such a call must read, the memory a cell needs,
and the bars the issue sets.

The grid (issue 14): QUERY_TOKENS x BATCHES x CACHES x HEADS (q heads / kv heads), head_dim
128, bfloat16, causal, every sequence's cache full (cache_seqlens = cache). Paged caches of
PAGE_SIZES tokens are timed beside the contiguous one on the PAGED_QUERY_TOKENS cells.

Decoding is bound by memory, not arithmetic: a call must read all of K and V once, which is

    kv_bytes = batch x cache x heads_kv x head_dim x itemsize x 2      (K and V)

while q and out are a few tokens (at most 3% of it in the grid: 16 tokens, 8 query heads per
kv head, 4k keys). So a row's rate is kv_bytes over its time, in TB/s, and it is compared with
the GPU's copy bandwidth (bytes read + bytes written by one large device-to-device copy)
measured in the same run.

The bars:

    copy    one query token, batch x cache >= BANDWIDTH_MIN_TOKENS: cupyflash reads K and V at
            >= BANDWIDTH_BAR of the copy bandwidth
    cudnn   every cell: cupyflash >= CUDNN_BAR x torch-cudnn's speed (the ratio of their
            times, or of their TB/s: the bytes are the same); >= CUDNN_BAR_MANY at
            MANY_QUERY_TOKENS query tokens
    paged   every page size >= PAGED_MIN_PAGE: paged TB/s >= PAGED_BAR x contiguous TB/s
            (the issue's "within 10%")
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..problem import numpy_dtype
from .grid import DTYPES

QUERY_TOKENS = (1, 2, 4, 8, 16)
BATCHES = (1, 16, 64)
CACHES = (4096, 32768, 131072)
HEADS = ((32, 8), (8, 1))  # (q heads, kv heads): GQA 4, and one kv head for 8 q heads
PAGE_SIZES = (16, 256)
PAGED_QUERY_TOKENS = (1, 16)  # the paged layouts are timed on these cells (both ends of QUERY_TOKENS)
# --quick: both head layouts, the bars' corners (1 token on >= 256k tokens; 8 tokens for the 2x bar).
QUICK = {"query_tokens": (1, 8), "batches": (1, 64), "caches": (4096, 32768), "paged_query_tokens": (1,)}

BANDWIDTH_BAR, BANDWIDTH_MIN_TOKENS = 0.85, 256 * 1024
CUDNN_BAR, CUDNN_BAR_MANY, MANY_QUERY_TOKENS = 1.0, 2.0, (8, 16)
PAGED_BAR, PAGED_MIN_PAGE = 0.90, 16
# The caches (contiguous and paged copies) are the only large arrays alive while cupyflash is
# timed: the reference is computed, in pieces sized to what is left, before the paged copies
# are made, and the torch peers run after those are freed. So they may take most of the memory.
CACHE_MEMORY_FRACTION = 0.8
OURS = "cupyflash"
TORCH_PEERS = ("torch-cudnn", "torch-flash")
GB = 1e9


@dataclass(frozen=True)
class DecodeCell:
    """One decode problem: q (batch, seqlen_q, heads_q, head_dim) against a full cache k, v of
    (batch, cache, heads_kv, head_dim), causal (query t sees keys < cache - seqlen_q + t + 1);
    page_sizes: the paged layouts timed beside the contiguous cache."""

    dtype: str
    head_dim: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    batch: int
    cache: int
    page_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not benchmarked; choose from {DTYPES}")
        sizes = {"head_dim": self.head_dim, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
                 "seqlen_q": self.seqlen_q, "batch": self.batch, "cache": self.cache}
        small = [f"{name} = {value}" for name, value in sizes.items() if value < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: every size of a decode cell must be >= 1")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q is {self.heads_q} but heads_kv is {self.heads_kv}; heads_kv must divide "
                             "heads_q (each kv head serves heads_q // heads_kv query heads)")
        if self.seqlen_q > self.cache:
            raise ValueError(f"seqlen_q is {self.seqlen_q} but the cache holds {self.cache} keys; the query tokens' "
                             "own keys are in the cache, so seqlen_q <= cache")
        for page in self.page_sizes:
            if page < 1 or self.cache % page:
                raise ValueError(f"page size {page} does not divide the cache length {self.cache}; a paged cell's "
                                 "sequences fill whole pages")

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.heads_q // self.heads_kv

    @property
    def tokens(self) -> int:
        """Keys in the cache over the whole batch."""
        return self.batch * self.cache

    @property
    def q_dims(self) -> tuple[int, int, int, int]:
        return self.batch, self.seqlen_q, self.heads_q, self.head_dim

    @property
    def cache_dims(self) -> tuple[int, int, int, int]:
        return self.batch, self.cache, self.heads_kv, self.head_dim

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V, each read once by a decode call."""
        return kv_bytes(self.batch, self.cache, self.heads_kv, self.head_dim, numpy_dtype(self.dtype).itemsize)

    @property
    def flops(self) -> float:
        """4 x D x Hq x B x (query-key pairs visible under the causal mask): each visible pair
        costs one multiply-add in Q.K^T and one in P.V."""
        return 4.0 * self.head_dim * self.heads_q * self.batch * visible_pairs(self.seqlen_q, self.cache)

    @property
    def cudnn_bar(self) -> float:
        return cudnn_bar(self.seqlen_q)

    @property
    def has_copy_bar(self) -> bool:
        return has_copy_bar(self.seqlen_q, self.tokens)

    @property
    def id(self) -> str:
        return (f"{self.dtype}-d{self.head_dim}-q{self.seqlen_q}-b{self.batch}-c{self.cache}-"
                f"h{self.heads_q}x{self.heads_kv}")


def kv_bytes(batch: int, cache: int, heads_kv: int, head_dim: int, itemsize: int) -> int:
    """Bytes of a K and a V cache of (batch, cache, heads_kv, head_dim) elements of itemsize bytes."""
    return batch * cache * heads_kv * head_dim * itemsize * 2


def visible_pairs(seqlen_q: int, cache: int) -> int:
    """(query, key) pairs of one sequence and head under the bottom-right causal mask: query t
    sees cache - seqlen_q + t + 1 keys, so seqlen_q x cache less the triangle above the diagonal."""
    return seqlen_q * cache - seqlen_q * (seqlen_q - 1) // 2


def has_copy_bar(seqlen_q: int, tokens: int) -> bool:
    """Whether the copy-bandwidth bar applies: one query token on >= BANDWIDTH_MIN_TOKENS cached keys."""
    return seqlen_q == 1 and tokens >= BANDWIDTH_MIN_TOKENS


def cudnn_bar(seqlen_q: int) -> float:
    """The cupyflash / torch-cudnn speed the issue asks for at seqlen_q query tokens."""
    return CUDNN_BAR_MANY if seqlen_q in MANY_QUERY_TOKENS else CUDNN_BAR


def tbps(nbytes: float, ms: float) -> float:
    """Terabytes per second of nbytes moved in ms milliseconds."""
    return nbytes / (ms * 1e-3) / 1e12


def paged_impl(page_size: int) -> str:
    """The impl name of cupyflash on a paged cache: "cupyflash-paged16"."""
    return f"{OURS}-paged{page_size}"


def page_size_of(impl: str) -> int | None:
    """The page size of a paged impl name, None for any other impl."""
    prefix = f"{OURS}-paged"
    return int(impl[len(prefix):]) if impl.startswith(prefix) and impl[len(prefix):].isdigit() else None


def cell_impls(cell: DecodeCell, torch_peers: Sequence[str]) -> list[str]:
    """The rows of a cell, in the order they are made: cupyflash, its paged layouts, the torch peers."""
    return [OURS, *(paged_impl(p) for p in cell.page_sizes), *torch_peers]


def block_table(batch: int, pages: int, seed: int = 0) -> np.ndarray:
    """int32 (batch, pages): row b holds the physical page of each of sequence b's logical
    pages, rows of one random permutation of range(batch x pages) (numpy default_rng(seed)),
    so that neither a sequence's pages nor the sequences lie in memory order."""
    if batch < 1 or pages < 1:
        raise ValueError(f"batch is {batch} and pages is {pages}; a block table needs at least one of each")
    order = np.random.default_rng(seed).permutation(batch * pages)
    return order.astype(np.int32).reshape(batch, pages)


def memory_plan(cell: DecodeCell, free_bytes: int,
                fraction: float = CACHE_MEMORY_FRACTION) -> tuple[bool, tuple[int, ...], str | None]:
    """What of the cell fits `fraction` of `free_bytes`: (contiguous cache fits, the page sizes
    whose paged copies fit beside it, taken in order while the total stays within the budget,
    and a "skipped: memory: ..." note naming what did not fit, or None)."""
    budget = fraction * free_bytes
    allowed = f"{fraction:.0%} of {free_bytes / GB:.1f} GB free"
    if cell.kv_bytes > budget:
        return False, (), f"skipped: memory: the K and V cache needs {cell.kv_bytes / GB:.1f} GB (allowed: {allowed})"
    kept: list[int] = []
    for page in cell.page_sizes:
        if (len(kept) + 2) * cell.kv_bytes <= budget:
            kept.append(page)
    dropped = [p for p in cell.page_sizes if p not in kept]
    if not dropped:
        return True, tuple(kept), None
    return True, tuple(kept), (f"skipped: memory: a paged copy (page size {', '.join(map(str, dropped))}) would "
                               f"make {2 + len(kept)} caches of {cell.kv_bytes / GB:.1f} GB (allowed: {allowed})")


def _axis(name: str, full: Sequence[int], given: Sequence[int] | None, quick: bool) -> tuple[int, ...]:
    """One axis of the grid: as given, else QUICK's with quick=True (where QUICK names it), else the full one."""
    if given is not None:
        return tuple(given)
    return tuple(QUICK.get(name, full)) if quick else tuple(full)


def decode_grid(dtypes: Sequence[str] = ("bfloat16",), head_dims: Sequence[int] = (128,),
                page_sizes: Sequence[int] = PAGE_SIZES, *, quick: bool = False,
                query_tokens: Sequence[int] | None = None, batches: Sequence[int] | None = None,
                caches: Sequence[int] | None = None, heads: Sequence[tuple[int, int]] = HEADS,
                paged_query_tokens: Sequence[int] | None = None) -> list[DecodeCell]:
    """The issue's grid (or with quick=True the QUICK corners of it), ordered dtype, head_dim,
    heads, query tokens, batch, cache; cells whose query tokens are in paged_query_tokens carry
    page_sizes. Any of the axes may be given instead."""
    query_tokens = _axis("query_tokens", QUERY_TOKENS, query_tokens, quick)
    batches, caches = _axis("batches", BATCHES, batches, quick), _axis("caches", CACHES, caches, quick)
    paged_at = _axis("paged_query_tokens", PAGED_QUERY_TOKENS, paged_query_tokens, quick)
    return [DecodeCell(dtype, d, hq, hkv, sq, b, c, tuple(page_sizes) if sq in paged_at else ())
            for dtype, d, (hq, hkv), sq, b, c in itertools.product(dtypes, head_dims, heads, query_tokens, batches,
                                                                    caches)]
