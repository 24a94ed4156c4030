"""Cases for merge_attention: attention over disjoint slices of the keys, each part computed by
cupyflash.attention, merged by merge_attention, and compared with the float64 reference (the
memory sweep and tests/test_gpu_merge.py run them).

Two comparisons per case: the merge of the 16-bit parts with the float64 merge of the very same
parts (the merge kernel alone: its error is the rounding of its result), and the merged result
with float64 attention over all the keys (the whole path), both by the tolerance rule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, validation
from .tolerance import Comparison, compare


@dataclass(frozen=True)
class MergeCase:
    dtype: str
    head_dim: int
    seqlen_q: int
    splits: tuple[int, ...]  # keys per part, in order (0: a part that saw no key)
    batch: int = 2
    heads_kv: int = 2
    group: int = 1

    @property
    def seqlen_k(self) -> int:
        return sum(self.splits)

    @property
    def id(self) -> str:
        return (f"merge-{self.dtype}-d{self.head_dim}-b{self.batch}-q{self.seqlen_q}-g{self.group}-"
                f"k{'+'.join(map(str, self.splits))}")

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return validation.random_inputs((self.batch, self.seqlen_q, self.heads_kv * self.group, self.head_dim),
                                        (self.batch, self.seqlen_k, self.heads_kv, self.head_dim), self.dtype,
                                        seed=seed)

    def bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of each part's keys."""
        edges = [0, *itertools.accumulate(self.splits)]
        return list(zip(edges[:-1], edges[1:]))


def run_merge(case: MergeCase, host: dict[str, np.ndarray], *, poison: bool = True) -> dict[str, Any]:
    """The parts (out, lse per key slice, from cupyflash.attention) and their merge, as CuPy arrays;
    with `poison`, the merge's outputs land in NaN-filled pool blocks."""
    import cupy

    from . import api

    q, k, v = (cupy.asarray(host[name]) for name in "qkv")
    parts = [api.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in case.bounds()]
    outs, lses = [o for o, _ in parts], [s for _, s in parts]
    if poison:
        validation.poison_pool((q.shape, q.dtype), ((q.shape[0], q.shape[2], q.shape[1]), np.float32))
    out, lse = api.merge_attention(outs, lses)
    return {"outs": outs, "lses": lses, "out": out, "lse": lse}


def compare_merge(case: MergeCase, host: dict[str, np.ndarray], results: dict[str, Any]) -> list[Comparison]:
    """The merge against the float64 merge of the same parts, and against float64 attention."""
    import cupy

    outs = [cupy.asnumpy(o).astype(np.float64) for o in results["outs"]]
    lses = [cupy.asnumpy(s).astype(np.float64) for s in results["lses"]]
    out, lse = (cupy.asnumpy(results[name]).astype(np.float64) for name in ("out", "lse"))
    merged64, merged_lse64 = reference.merge_attention(outs, lses)
    rounded = reference.round_to(merged64, case.dtype)  # the best a 16-bit result can be
    q, k, v = (host[name].astype(np.float64) for name in "qkv")
    full64, full_lse64 = reference.attention_forward(q, k, v)
    base, base_lse = reference.attention_forward(q, k, v, compute_dtype=case.dtype)
    return [compare(f"{case.id} out vs merge64", out, merged64, rounded, case.dtype),
            compare(f"{case.id} lse vs merge64", lse, merged_lse64, merged_lse64, "lse"),
            compare(f"{case.id} out vs attention64", out, full64, base, case.dtype),
            compare(f"{case.id} lse vs attention64", lse, full_lse64, base_lse, "lse")]
