"""Cases for attention_with_kvcache: a cache (contiguous or paged, its pages in shuffled order)
holding random keys past each sequence's length, new keys appended, and the result compared,
sequence by sequence, with float64 attention over the keys that sequence owns (the GPU tests,
the memory sweep and `cupyflash validate` run them).

Three checks per case: out and lse by the tolerance rule against the float64 reference of each
sequence's gathered keys (cache rows [0, length) then the new ones); and the cache after the
call equal, bit for bit, to the cache before with the new rows written where they belong and
nothing else changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import reference, validation
from .tolerance import Comparison, compare


@dataclass(frozen=True)
class DecodeCase:
    dtype: str
    head_dim: int
    seqlen_q: int
    lengths: tuple[int, ...]  # keys cached per sequence before the call (its batch is len(lengths))
    heads_kv: int = 2
    group: int = 4
    seqlen_new: int = 0
    page_size: int = 0  # 0: contiguous cache
    capacity: int = 0  # keys a sequence's cache holds; 0: the longest sequence's needs, rounded up to pages
    num_splits: int = 0
    split_size: int | None = None
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    slots: bool = False  # contiguous: sequences in shuffled cache slots (cache_batch_idx), one spare slot
    host_length: bool = False  # cache_seqlens as a Python int (every length must then be equal)
    tag: str = field(default="", compare=False)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    @property
    def slot_keys(self) -> int:
        need = max((n + self.seqlen_new for n in self.lengths), default=0)
        keys = max(self.capacity, need, 1)
        return -(-keys // self.page_size) * self.page_size if self.page_size else keys

    @property
    def id(self) -> str:
        cache = f"p{self.page_size}" if self.page_size else ("slots" if self.slots else "contig")
        lengths = "+".join(map(str, self.lengths[:4])) + ("+..." if len(self.lengths) > 4 else "")
        splits = f"s{self.num_splits}" if self.split_size is None else f"ss{self.split_size}"
        mask = ("causal" if self.causal else "full") + ("" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}")
        return (f"kv-{self.dtype}-d{self.head_dim}-q{self.seqlen_q}-g{self.group}-h{self.heads_kv}-{cache}-"
                f"n{lengths}-new{self.seqlen_new}-{splits}-{mask}{self.tag}")

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Host arrays: q, the logical caches (batch, slot_keys, heads_kv, head_dim) all random,
        k_new, v_new, lengths, and the physical layout (block_table or slot order)."""
        rng = np.random.default_rng(seed + 1000)
        drawn = validation.random_inputs((self.batch, self.seqlen_q, self.heads_q, self.head_dim),
                                         (self.batch, self.slot_keys + self.seqlen_new, self.heads_kv, self.head_dim),
                                         self.dtype, seed=seed)
        host = {"q": drawn["q"], "k_logical": drawn["k"][:, :self.slot_keys],
                "v_logical": drawn["v"][:, :self.slot_keys], "k_new": drawn["k"][:, self.slot_keys:],
                "v_new": drawn["v"][:, self.slot_keys:], "lengths": np.asarray(self.lengths, np.int32)}
        if self.page_size:
            pages = self.slot_keys // self.page_size
            order = rng.permutation(self.batch * pages + 1).astype(np.int32)  # one page no sequence uses
            host["block_table"] = order[:self.batch * pages].reshape(self.batch, pages)
            host["spare"] = order[self.batch * pages:]
        elif self.slots:
            host["cache_batch_idx"] = rng.permutation(self.batch + 1)[:self.batch].astype(np.int32)
        return host

    def physical_cache(self, logical: np.ndarray, host: dict[str, np.ndarray], seed: int) -> np.ndarray:
        """The cache array as the call sees it; rows no sequence owns (a spare page or slot) are
        random too."""
        if self.page_size:
            pages = self.slot_keys // self.page_size
            shape = (self.batch * pages + 1, self.page_size, self.heads_kv, self.head_dim)
        elif self.slots:
            shape = (self.batch + 1, *logical.shape[1:])
        else:
            return logical.copy()
        physical = validation.random_inputs((1, 1, 1, self.head_dim), shape, self.dtype, seed=seed + 7)["k"]
        if self.page_size:
            physical[host["block_table"].reshape(-1)] = logical.reshape(-1, *shape[1:])
        else:
            physical[host["cache_batch_idx"]] = logical
        return physical


def run_case(case: DecodeCase, host: dict[str, np.ndarray], *, poison: bool = True, check: bool = False,
             seed: int = 0) -> dict[str, Any]:
    """attention_with_kvcache on the case's device arrays; the results and the caches after."""
    import cupy

    from .kvcache import attention_with_kvcache

    k_cache = cupy.asarray(case.physical_cache(host["k_logical"], host, seed))
    v_cache = cupy.asarray(case.physical_cache(host["v_logical"], host, seed + 1))
    before = {"k_cache": k_cache.get(), "v_cache": v_cache.get()}
    q = cupy.asarray(host["q"])
    new = {}
    if case.seqlen_new:
        new = {"k": cupy.asarray(host["k_new"]), "v": cupy.asarray(host["v_new"])}
    lengths = int(case.lengths[0]) if case.host_length else cupy.asarray(host["lengths"])
    options = {"block_table": cupy.asarray(host["block_table"]) if case.page_size else None,
               "cache_batch_idx": cupy.asarray(host["cache_batch_idx"]) if case.slots else None}
    if poison:
        validation.poison_pool((q.shape, q.dtype), ((case.batch, case.heads_q, case.seqlen_q), np.float32))
    out, lse = attention_with_kvcache(q, k_cache, v_cache, **new, cache_seqlens=lengths, causal=case.causal,
                                      window_size=case.window, num_splits=case.num_splits,
                                      split_size=case.split_size, return_lse=True, check=check, **options)
    return {"out": out, "lse": lse, "k_cache": k_cache, "v_cache": v_cache, "before": before}


def expected_caches(case: DecodeCase, host: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> dict[str, Any]:
    """The caches after a correct call: the new rows at keys [length, length + seqlen_new)."""
    expect = {name: array.copy() for name, array in before.items()}
    for name, new in (("k_cache", host["k_new"]), ("v_cache", host["v_new"])):
        for b, length in enumerate(case.lengths):
            for j in range(case.seqlen_new):
                key = length + j
                if case.page_size:
                    page = host["block_table"][b, key // case.page_size]
                    expect[name][page, key % case.page_size] = new[b, j]
                else:
                    slot = host["cache_batch_idx"][b] if case.slots else b
                    expect[name][slot, key] = new[b, j]
    return expect


def compare_case(case: DecodeCase, host: dict[str, np.ndarray], results: dict[str, Any], *,
                 caches: bool = True) -> list[Comparison]:
    """out and lse against float64 attention per sequence; with `caches`, the caches' bits as a
    Comparison that counts wrongly changed elements (0 allowed)."""
    import cupy

    out, lse = cupy.asnumpy(results["out"]), cupy.asnumpy(results["lse"])
    refs, bases = [], []
    for b, length in enumerate(case.lengths):
        keys = [np.concatenate([host[f"{n}_logical"][b:b + 1, :length], host[f"{n}_new"][b:b + 1]], axis=1)
                for n in "kv"]
        q = host["q"][b:b + 1]
        options = {"causal": case.causal, "window_size": case.window}
        refs.append(reference.attention_forward(*(x.astype(np.float64) for x in (q, *keys)), **options))
        bases.append(reference.attention_forward(*(x.astype(np.float64) for x in (q, *keys)), **options,
                                                 compute_dtype=case.dtype))
    ref_out, ref_lse = (np.concatenate([r[i] for r in refs]) for i in (0, 1))
    base_out, base_lse = (np.concatenate([r[i] for r in bases]) for i in (0, 1))
    comparisons = [compare("out", out, ref_out, base_out, case.dtype), compare("lse", lse, ref_lse, base_lse, "lse")]
    if not caches:
        return comparisons
    expect = expected_caches(case, host, results["before"])
    for name in ("k_cache", "v_cache"):
        got = cupy.asnumpy(results[name])
        differing = int(np.count_nonzero(got.view(np.uint16) != expect[name].view(np.uint16)))
        first = tuple(int(i) for i in np.argwhere(got.view(np.uint16) != expect[name].view(np.uint16))[0]) \
            if differing else ()
        # error: how many elements differ from the expected cache (0 allowed)
        comparisons.append(Comparison(name.replace("_", ""), float(differing), 0.0, 0.0, first, float(differing), 0.0))
    return comparisons


def decode_matrix(quick: bool = False) -> list[DecodeCase]:
    """`cupyflash validate`'s cache cases: contiguous, slotted and paged caches, appends, split
    counts from the heuristic, forced ones and split_size, both dtypes; more head dims, page
    sizes and masks unless quick."""
    cases = [DecodeCase("bfloat16", 128, 1, (0, 1, 255, 4097)),
             DecodeCase("float16", 128, 4, (1000, 17), page_size=16, seqlen_new=4),
             DecodeCase("float16", 64, 16, (300, 2000), group=8, slots=True, seqlen_new=1, num_splits=7),
             DecodeCase("bfloat16", 128, 1, (4097, 20000), split_size=1024, page_size=256)]
    if not quick:
        cases += [DecodeCase("bfloat16", 256, 2, (255, 4097), heads_kv=4, group=1, seqlen_new=2),
                  DecodeCase("float16", 72, 3, (500, 33), group=2, page_size=1, seqlen_new=3),
                  DecodeCase("bfloat16", 192, 8, (3000,), group=8, heads_kv=1, window=(256, 0)),
                  DecodeCase("float16", 128, 8, (3000, 100), causal=False, window=(64, 8), num_splits=2),
                  DecodeCase("bfloat16", 128, 17, (65536,), group=4, page_size=64, seqlen_new=17)]
    return cases
