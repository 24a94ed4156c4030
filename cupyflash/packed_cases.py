"""A packed (variable-length) batch to check attention_varlen on: the case, its inputs, the
two calls, and each sequence's part of the results against the float64 reference of that
sequence alone. `cupyflash validate` (validation.run_varlen_gpu_case), the memory-safety sweep
(memory_sweep.py) and tests/test_gpu_varlen.py all check packed batches through these."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import reference, validation
from .tolerance import Comparison, compare

GRADIENTS = ("dq", "dk", "dv")


@dataclass(frozen=True)
class PackedCase:
    """One packed batch for attention_varlen (`cupyflash validate`'s validation.VarlenCase is one
    without seqused_k or spare keys: VarlenCase.packed): sequence b owns query rows cu_q[b]:cu_q[b+1] and
    keys cu_k[b]:cu_k[b+1] (cu_* the running sums of seqlens_q and seqlens_k), and uses the first
    seqused_k[b] of its keys (all of them when seqused_k is None). spare_k keys that no sequence
    owns follow cu_k[-1]; max_seqlen_q and max_seqlen_k are the longest lengths plus max_slack."""

    dtype: str
    head_dim: int
    causal: bool
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]  # the keys each sequence owns: the steps of cu_seqlens_k
    seqused_k: tuple[int, ...] | None = None  # the keys each one uses (<= seqlens_k), passed as seqused_k
    group: int = 1  # heads_q / heads_kv
    heads_kv: int = 2
    window: tuple[int, int] = (-1, -1)
    spare_k: int = 0  # keys after cu_seqlens_k[-1]: total_k = cu_seqlens_k[-1] + spare_k
    max_slack: int = 0  # max_seqlen_q, max_seqlen_k above the longest sequence by this much

    def __post_init__(self) -> None:
        if len(self.seqlens_k) != len(self.seqlens_q) or (self.seqused_k is not None
                                                           and len(self.seqused_k) != len(self.seqlens_q)):
            raise ValueError(f"seqlens_q {self.seqlens_q}, seqlens_k {self.seqlens_k} and seqused_k "
                             f"{self.seqused_k} must have one entry per sequence")
        if any(not 0 <= used <= owned for used, owned in zip(self.used_k, self.seqlens_k)):
            raise ValueError(f"seqused_k {self.seqused_k}: each entry must be in [0, seqlens_k[b]] "
                             f"(seqlens_k {self.seqlens_k})")

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)

    @property
    def used_k(self) -> tuple[int, ...]:
        """len_k[b]: the keys sequence b attends to."""
        return self.seqlens_k if self.seqused_k is None else self.seqused_k

    @property
    def cu_seqlens_q(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(self.seqlens_q))

    @property
    def cu_seqlens_k(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(self.seqlens_k))

    @property
    def total_q(self) -> int:
        return self.cu_seqlens_q[-1]

    @property
    def total_k(self) -> int:
        return self.cu_seqlens_k[-1] + self.spare_k

    @property
    def max_seqlen_q(self) -> int:
        return max(self.seqlens_q, default=0) + self.max_slack

    @property
    def max_seqlen_k(self) -> int:
        return max(self.seqlens_k, default=0) + self.max_slack  # the owned lengths: >= the used ones

    def query_rows(self, b: int) -> slice:
        return slice(self.cu_seqlens_q[b], self.cu_seqlens_q[b + 1])

    def key_rows(self, b: int) -> slice:
        start = self.cu_seqlens_k[b]
        return slice(start, start + self.used_k[b])

    def packed_index(self, b: int) -> dict[str, Any]:
        """Where sequence b's part of each result lies in the packed arrays."""
        rows, keys = self.query_rows(b), self.key_rows(b)
        return {"out": rows, "lse": (slice(None), rows), "dq": rows, "dk": keys, "dv": keys}

    def unused_keys(self) -> np.ndarray:
        """The key rows no sequence uses (their dk and dv must be 0)."""
        used = np.zeros(self.total_k, bool)
        for b in range(self.batch):
            used[self.key_rows(b)] = True
        return np.flatnonzero(~used)

    @property
    def id(self) -> str:
        parts = ["varlen", self.dtype, f"d{self.head_dim}", "causal" if self.causal else "full", f"b{self.batch}",
                 f"q{self.total_q}", f"k{self.total_k}", f"g{self.group}"]
        if self.seqused_k is not None:
            parts.append("used")
        if self.window != (-1, -1):
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        if self.spare_k:
            parts.append(f"spare{self.spare_k}")
        if self.max_slack:
            parts.append(f"slack{self.max_slack}")
        return "-".join(parts)


def varlen_inputs(case: PackedCase, seed: int = 0) -> dict[str, np.ndarray]:
    """Signed normal packed q, dout (total_q, heads_q, head_dim) and k, v (total_k, heads_kv,
    head_dim) on the host, in the case's dtype (validation.random_inputs, batch 1, dropped)."""
    heads_q = case.heads_kv * case.group
    drawn = validation.random_inputs((1, case.total_q, heads_q, case.head_dim),
                                     (1, case.total_k, case.heads_kv, case.head_dim), case.dtype, seed=seed)
    return {name: array[0] for name, array in drawn.items()}


def varlen_to_device(case: PackedCase, host: dict[str, np.ndarray]) -> dict[str, Any]:
    """The inputs on the current GPU, with cu_seqlens_q, cu_seqlens_k and seqused_k (None when
    the case has none) as int32 CuPy arrays."""
    import cupy

    dev = {name: cupy.asarray(array) for name, array in host.items()}
    dev["cu_seqlens_q"] = cupy.asarray(np.array(case.cu_seqlens_q, np.int32))
    dev["cu_seqlens_k"] = cupy.asarray(np.array(case.cu_seqlens_k, np.int32))
    dev["seqused_k"] = None if case.seqused_k is None else cupy.asarray(np.array(case.seqused_k, np.int32))
    return dev


def varlen_arguments(case: PackedCase, dev: dict[str, Any]) -> tuple[tuple[Any, Any, int, int], dict[str, Any]]:
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) and the keyword options of both calls."""
    lengths = (dev["cu_seqlens_q"], dev["cu_seqlens_k"], case.max_seqlen_q, case.max_seqlen_k)
    return lengths, dict(causal=case.causal, window_size=case.window, seqused_k=dev["seqused_k"])


def varlen_calls(case: PackedCase, dev: dict[str, Any], *, deterministic: bool = False, backward: bool = True,
                 poison: bool = False) -> dict[str, Any]:
    """{"out", "lse"[, "dq", "dk", "dv"]}: the CuPy results of attention_varlen (and of
    attention_varlen_backward on its out and lse); `poison` puts them in NaN-filled pool blocks
    (validation.poison_pool), so that an element left unwritten fails a comparison."""
    from . import api

    lengths, options = varlen_arguments(case, dev)
    q, k, v = dev["q"], dev["k"], dev["v"]
    if poison:
        validation.poison_pool((q.shape, q.dtype), ((q.shape[1], case.total_q), np.float32))
    out, lse = api.attention_varlen(q, k, v, *lengths, return_lse=True, **options)
    results = {"out": out, "lse": lse}
    if backward:
        if poison:
            validation.poison_pool((q.shape, q.dtype), (k.shape, k.dtype), (k.shape, k.dtype))
        grads = api.attention_varlen_backward(dev["dout"], q, k, v, out, lse, *lengths,
                                              deterministic=deterministic, **options)
        results.update(zip(GRADIENTS, grads))
    return results


def varlen_references(case: PackedCase, host: dict[str, np.ndarray],
                      backward: bool = True) -> list[dict[str, tuple[Any, Any]]]:
    """Per sequence, {name: (float64 reference, same-dtype baseline)} of the dense reference on
    that sequence alone (reference.py, on the current GPU), shaped as its part of the packed
    results: out and dq (len_q, heads_q, head_dim), lse (heads_q, len_q), dk and dv (len_k, heads_kv,
    head_dim). A sequence without queries or keys gets what the reference gives it, written
    out: out, dq, dk, dv 0 and lse -inf."""
    import cupy

    dev64 = {name: cupy.asarray(array.astype(np.float64)) for name, array in host.items()}
    return [_sequence_reference(case, dev64, b, backward) for b in range(case.batch)]


def _sequence_reference(case: PackedCase, dev64: dict[str, Any], b: int, backward: bool) -> dict[str, tuple[Any, Any]]:
    import cupy

    rows, keys = case.query_rows(b), case.key_rows(b)
    q, dout, k, v = dev64["q"][rows], dev64["dout"][rows], dev64["k"][keys], dev64["v"][keys]
    if q.shape[0] == 0 or k.shape[0] == 0:
        values = {"out": cupy.zeros(q.shape), "lse": cupy.full((q.shape[1], q.shape[0]), -cupy.inf),
                  "dq": cupy.zeros(q.shape), "dk": cupy.zeros(k.shape), "dv": cupy.zeros(k.shape)}
        return {name: (value, value) for name, value in values.items() if backward or name in ("out", "lse")}
    options = dict(causal=case.causal, window_size=case.window, xp=cupy)
    found: dict[str, list[Any]] = {}
    for compute_dtype in (None, case.dtype):
        out, lse = reference.attention_forward(q[None], k[None], v[None], compute_dtype=compute_dtype, **options)
        values = {"out": out[0], "lse": lse[0]}
        if backward:
            grads = reference.attention_backward(dout[None], q[None], k[None], v[None], compute_dtype=compute_dtype,
                                                 **options)
            values.update(zip(GRADIENTS, (g[0] for g in grads)))
        for name, value in values.items():
            found.setdefault(name, []).append(value)
    return {name: (ref64, baseline) for name, (ref64, baseline) in found.items()}


def compare_varlen(case: PackedCase, results: dict[str, np.ndarray], references: list[dict[str, tuple[Any, Any]]],
                   label: str = "", name_of: Callable[[str, int], str] = lambda name, b: f"{name}[seq {b}]"
                   ) -> list[Comparison]:
    """Each sequence's part of the packed results (out, lse and any of dq, dk, dv) against its
    reference with the tolerance rule, named label + name_of(tensor, sequence) ("out[seq 3]"),
    and, where the case has keys no sequence uses, dk and dv exactly 0 there."""
    found = []
    for b, sequence in enumerate(references):
        index = case.packed_index(b)
        for name, (ref64, baseline) in sequence.items():
            if name in results and ref64.size:  # an empty sequence has nothing to compare in this tensor
                kind = "lse" if name == "lse" else case.dtype
                found.append(compare(label + name_of(name, b), results[name][index[name]], ref64, baseline, kind))
    unused = case.unused_keys()
    if unused.size:
        found += [_exactly_zero(f"{label}{name}[keys no sequence uses]", results[name], unused)
                  for name in ("dk", "dv") if name in results]
    return found


def _exactly_zero(name: str, grad: np.ndarray, rows: np.ndarray) -> Comparison:
    """grad at those rows against 0 with no allowance: any other value, NaN included, fails."""
    values = np.asarray(grad[rows], np.float64)
    bad = np.isnan(values)
    at = np.unravel_index(int(np.argmax(bad)) if bad.any() else int(np.argmax(np.abs(values))), values.shape)
    worst = (int(rows[at[0]]), *(int(i) for i in at[1:]))
    error = float("nan") if bad.any() else float(np.abs(values).max())
    return Comparison(name, error, 0.0, 0.0, worst, float(values[at]), 0.0)
