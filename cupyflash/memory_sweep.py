"""The memory-safety sweep: every kernel family and path on small, awkward shapes.

An out-of-bounds write is silent in the results and corrupts a caller's neighbouring arrays, so
two checks run the same list of cases on a GPU: tests/test_gpu_guard.py surrounds every
allocation with guard bytes and checks them after the call, and scripts/sanitize.py runs each
case in its own process under compute-sanitizer (memcheck; racecheck and synccheck on the
smaller list). A case names a path (the kernels the GPU picks by default, or the configs an A100
or an RTX 4090 would pick, forced through plan.forced), a validation.Case (head dim, lengths,
GQA, causal or window) or a PackedCase (a packed batch for attention_varlen: lengths per
sequence, empty ones included, seqused_k, keys no sequence owns) and whether the backward is
the deterministic one.

    from cupyflash import memory_sweep
    for case in memory_sweep.cases():
        memory_sweep.run(case)          # forward + backward, results checked against float64

PackedCase and its helpers (inputs, the calls, per-sequence references and comparisons) are
also what tests/test_gpu_varlen.py checks attention_varlen and attention_varlen_backward with.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from . import gpu_classes, plan, reference, validation
from .kernels.common import kernel_head_dim
from .tolerance import Comparison, compare

PATHS = ("default", *gpu_classes.SMALLER_THAN_HOPPER)  # default, a100, rtx4090
# Every compiled head dim (32 ... 256) is reached, and padded ones between them: 8 and 40 run on
# the 32 and 64 kernels, 72 on 96, 200 on 256.
HEAD_DIMS = (8, 32, 40, 48, 64, 72, 96, 128, 160, 192, 200, 256)
SMALL_HEAD_DIMS = (40, 64, 96, 128, 256)
# (seqlen_q, seqlen_k, group, causal, window): lengths that are multiples of no tile; fewer and
# more queries than keys; GQA; some rows that see no key (causal 203 x 113); a sliding window.
SHAPES = ((33, 33, 1, False, (-1, -1)), (33, 130, 2, True, (-1, -1)), (203, 113, 4, True, (-1, -1)),
          (130, 97, 1, False, (17, 5)))
# Varlen: the kernels of head dims 64 (reached padded, from 40), 96 (from 72), 128 and 256; both dtypes.
VARLEN_HEAD_DIMS = (40, 72, 128, 256)
# (seqlens_q, seqlens_k, seqused_k, spare_k, group, causal, window), one packed batch each: lengths
# that are multiples of no tile; sequences with no query or no key; rows that see no key (causal
# 130 queries x 1 key, 17 queries x 0 used keys); keys no sequence uses (seqused_k below the owned
# keys, spare keys after cu_seqlens_k[-1]); GQA; a sliding window.
VARLEN_SHAPES = (((33, 0, 130, 1), (130, 17, 1, 0), None, 0, 2, True, (-1, -1)),
                 ((1, 97, 0, 203, 17), (113, 0, 33, 203, 5), (100, 0, 33, 150, 0), 9, 4, False, (17, 5)),
                 ((203, 64, 1), (113, 130, 1), None, 3, 1, False, (-1, -1)))
# What racecheck and synccheck run of them: the Hopper default and an A100's mma.sync kernels.
VARLEN_SMALL = (("default", 128, 0), ("a100", 72, 1))
GRADIENTS = ("dq", "dk", "dv")


@dataclass(frozen=True)
class PackedCase:
    """One packed batch for attention_varlen (validation.VarlenCase, what `cupyflash validate`
    runs, has no seqused_k or spare keys): sequence b owns query rows cu_q[b]:cu_q[b+1] and
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


@dataclass(frozen=True)
class SweepCase:
    path: str  # "default" or a key of gpu_classes.SMALLER_THAN_HOPPER
    case: validation.Case | PackedCase
    deterministic: bool = False

    @property
    def id(self) -> str:
        return f"{self.path}-{self.case.id}" + ("-det" if self.deterministic else "")


def cases(small: bool = False) -> list[SweepCase]:
    """The sweep: paths x head dims x shapes, deterministic on the GQA shape; `small` is the
    subset racecheck and synccheck run (they are much slower than memcheck)."""
    dims = SMALL_HEAD_DIMS if small else HEAD_DIMS
    shapes = SHAPES[1:3] if small else SHAPES
    found = []
    for path, dim, (seqlen_q, seqlen_k, group, causal, window) in itertools.product(PATHS, dims, shapes):
        dtype = "bfloat16" if (dim // 8) % 2 else "float16"  # both dtypes, spread over the head dims
        case = validation.Case(dtype, dim, causal, seqlen_q, seqlen_k, group=group, window=window)
        found.append(SweepCase(path, case))
        if group > 1 and not small:
            found.append(SweepCase(path, case, deterministic=True))
    found.append(SweepCase("default", validation.Case("float16", 40, False, 33, 33, batch=1)))  # the first report
    return found + varlen_cases(small)


def _varlen_sweep_case(dim: int, shape: int) -> PackedCase:
    seqlens_q, seqlens_k, seqused_k, spare_k, group, causal, window = VARLEN_SHAPES[shape]
    dtype = "bfloat16" if (dim // 8) % 2 else "float16"  # the rule of cases(): both dtypes over the head dims
    return PackedCase(dtype, dim, causal, seqlens_q, seqlens_k, seqused_k, group=group, window=window,
                      spare_k=spare_k)


def varlen_cases(small: bool = False) -> list[SweepCase]:
    """Paths x varlen head dims x packed batches, and the deterministic backward on the batch
    with seqused_k; `small` is the two racecheck and synccheck run (VARLEN_SMALL)."""
    if small:
        return [SweepCase(path, _varlen_sweep_case(dim, shape)) for path, dim, shape in VARLEN_SMALL]
    found = []
    for path, dim, shape in itertools.product(PATHS, VARLEN_HEAD_DIMS, range(len(VARLEN_SHAPES))):
        case = _varlen_sweep_case(dim, shape)
        found.append(SweepCase(path, case))
        if case.seqused_k is not None:
            found.append(SweepCase(path, case, deterministic=True))
    return found


@contextlib.contextmanager
def configs_of(path: str, head_dim: int) -> Iterator[None]:
    """Run inside it with the configs `path` picks for head_dim (the default path forces nothing)."""
    if path == "default":
        yield
        return
    limits = gpu_classes.SMALLER_THAN_HOPPER[path]
    kernel_dim = kernel_head_dim(head_dim)  # (the compiled head dims are multiples of 8: padding changes nothing)
    with plan.forced(plan.default_fwd_config(kernel_dim, limits), plan.default_bwd_config(kernel_dim, limits)):
        yield


def run(sweep_case: SweepCase, check: bool = True) -> list[Comparison]:
    """Forward and backward of one case on the current GPU, compared with the float64 reference
    (without `check`, only the two calls: what the sanitizer needs, at a fraction of the launches)."""
    case = sweep_case.case
    with configs_of(sweep_case.path, case.head_dim):
        if isinstance(case, PackedCase):
            return run_varlen(case, deterministic=sweep_case.deterministic, check=check)
        if check:
            return validation.run_gpu_case(case, deterministic=sweep_case.deterministic)
        from . import api

        dev = validation.to_device(case, validation.make_inputs(case))
        options = dict(causal=case.causal, window_size=case.window)
        out, lse = api.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **options)
        api.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse,
                               deterministic=sweep_case.deterministic, **options)
        return []


def run_varlen(case: PackedCase, *, deterministic: bool = False, check: bool = True) -> list[Comparison]:
    """attention_varlen and its backward on one packed batch; with `check`, into NaN-poisoned
    pool blocks and compared, sequence by sequence, with the float64 reference."""
    host = varlen_inputs(case)
    results = varlen_calls(case, varlen_to_device(case, host), deterministic=deterministic, poison=check)
    if not check:
        return []
    return compare_varlen(case, {name: array.get() for name, array in results.items()}, varlen_references(case, host))


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
    out: out, dq, dk, dv 0 and lse +inf."""
    import cupy

    dev64 = {name: cupy.asarray(array.astype(np.float64)) for name, array in host.items()}
    return [_sequence_reference(case, dev64, b, backward) for b in range(case.batch)]


def _sequence_reference(case: PackedCase, dev64: dict[str, Any], b: int, backward: bool) -> dict[str, tuple[Any, Any]]:
    import cupy

    rows, keys = case.query_rows(b), case.key_rows(b)
    q, dout, k, v = dev64["q"][rows], dev64["dout"][rows], dev64["k"][keys], dev64["v"][keys]
    if q.shape[0] == 0 or k.shape[0] == 0:
        values = {"out": cupy.zeros(q.shape), "lse": cupy.full((q.shape[1], q.shape[0]), cupy.inf),
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
                   label: str = "") -> list[Comparison]:
    """Each sequence's part of the packed host results (out, lse and any of dq, dk, dv) against its
    reference with the tolerance rule ("out[seq 3]"), and dk, dv exactly 0 at the keys no sequence uses."""
    found = []
    for b, sequence in enumerate(references):
        index = case.packed_index(b)
        for name, (ref64, baseline) in sequence.items():
            if name in results and ref64.size:
                kind = "lse" if name == "lse" else case.dtype
                found.append(compare(f"{label}{name}[seq {b}]", results[name][index[name]], ref64, baseline, kind))
    unused = case.unused_keys()
    found += [_exactly_zero(f"{label}{name}[keys no sequence uses]", results[name], unused)
              for name in ("dk", "dv") if name in results]
    return found


def _exactly_zero(name: str, grad: np.ndarray, rows: np.ndarray) -> Comparison:
    """grad at those rows against 0 with no allowance: any other value, NaN included, fails."""
    values = np.asarray(grad[rows], np.float64)
    if values.size == 0:
        return Comparison(name, 0.0, 0.0, 0.0, (), 0.0, 0.0)
    bad = np.isnan(values)
    at = np.unravel_index(int(np.argmax(bad)) if bad.any() else int(np.argmax(np.abs(values))), values.shape)
    worst = (int(rows[at[0]]), *(int(i) for i in at[1:]))
    error = float("nan") if bad.any() else float(np.abs(values).max())
    return Comparison(name, error, 0.0, 0.0, worst, float(values[at]), 0.0)


def by_id(case_id: str) -> SweepCase:
    """The case of that id (scripts/sanitize.py hands one id to each sanitized process)."""
    for sweep_case in cases():
        if sweep_case.id == case_id:
            return sweep_case
    raise KeyError(f"no memory-sweep case {case_id!r}; `python scripts/sanitize.py --list` lists them")
