"""Every result is checked before it is timed, with the library's own reference and rule:
cupyflash.reference computes the float64 truth and the same-dtype baseline, and
cupyflash.tolerance judges each tensor (max|ours − ref64| <= 2·max|baseline − ref64| + floor).

Two kinds of check, the "check" field of a row:

    full    every tensor of the pass (out; dq, dk, dv) of every (batch, head): reference.py run
            on pieces of (batch, heads) that fit REFERENCE_MEMORY_FRACTION of the free memory
    slice   when even one head does not fit: out and dq of the last CHECK_ROWS query rows of
            batch element 0 (reference.py's rows=; the masks those of the whole sequence)

The comparisons run on the device (tolerance.compare's xp): nothing of size B·S·H·D is copied
to the host. naive-cupy is a peer like any other here, judged by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from .. import reference, tolerance
from .gpu import free_memory, short
from .grid import PASS_TENSORS
from .peers import to_float32

Array = Any  # a numpy.ndarray or a cupy.ndarray

CHECK_ROWS = 64  # query rows of the slice check
REFERENCE_MEMORY_FRACTION = 0.4  # share of the free device memory one piece of the reference may use
# Peak bytes reference.py holds per score (one query-key pair of one head): 43 measured with
# tracemalloc in NumPy (the bfloat16 baseline's backward, the largest of its modes; float64
# 36), rounded up for the memory pool's blocks.
REFERENCE_BYTES_PER_SCORE = 64
GRADS = PASS_TENSORS["bwd"]
QUERY_SIDE = ("q", "dout", "out", "dq")  # (B, Sq, Hq, D); the rest are (B, Sk, Hkv, D)
GB = 1e9


@dataclass
class Reference:
    """What results are checked against: per tensor name, ref64 (float64) and baseline (values
    of the input dtype, from reference.py's compute_dtype mode), over the whole problem (kind
    "full") or over query rows start.. of batch element 0 (kind "slice"); kind None when
    neither could be computed, and note says why."""

    kind: str | None
    ref64: dict[str, Array]
    baseline: dict[str, Array]
    start: int = 0
    note: str | None = None


def head_bytes(seqlen_q: int, seqlen_k: int, group: int = 1) -> int:
    """Bytes reference.py needs for one kv head (its `group` query heads): O(Sq·Sk)."""
    return REFERENCE_BYTES_PER_SCORE * seqlen_q * seqlen_k * group


def pieces(batch: int, heads_kv: int, seqlen_q: int, seqlen_k: int, group: int,
           budget: float) -> list[tuple[slice, slice]]:
    """(batch slice, kv-head slice) pieces covering the problem, each within `budget` bytes:
    whole batch elements at a time when one fits, else runs of heads; [] when one head does not."""
    fit = int(budget // head_bytes(seqlen_q, seqlen_k, group))  # kv heads one piece may hold
    if fit < 1:
        return []
    if fit >= heads_kv:
        step = min(batch, fit // heads_kv)
        return [(slice(b, min(b + step, batch)), slice(0, heads_kv)) for b in range(0, batch, step)]
    return [(slice(b, b + 1), slice(h, min(h + fit, heads_kv))) for b in range(batch) for h in range(0, heads_kv, fit)]


def _both(tensors: Sequence[str], inputs: dict[str, Array], causal: bool, dtype: str, xp: Any,
          rows: tuple[int, int] | None = None) -> tuple[dict[str, Array], dict[str, Array]]:
    """ref64 and baseline of `tensors` ("out", "dq", "dk", "dv") for float32 inputs q, k, v, dout."""
    q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "dout"))
    found: list[dict[str, Array]] = []
    for compute_dtype in (None, dtype):
        opts = dict(causal=causal, xp=xp, compute_dtype=compute_dtype, rows=rows)
        into = {}
        if "out" in tensors:
            into["out"] = reference.attention_forward(q, k, v, **opts)[0]
        if any(t in GRADS for t in tensors):
            grads = dict(zip(GRADS, reference.attention_backward(dout, q, k, v, **opts)))
            into.update((t, grads[t]) for t in tensors if t in GRADS)
        found.append(into)
    return found[0], found[1]


def full_reference(data: dict[str, Array], causal: bool, dtype: str, tensors: Sequence[str],
                   parts: list[tuple[slice, slice]], xp: Any) -> Reference:
    """Reference "full": every element of `tensors`, computed piece by piece (see pieces())."""
    group = data["q"].shape[2] // data["k"].shape[2]
    like = {t: data["q" if t in QUERY_SIDE else "k"].shape for t in tensors}
    # NaN until written: a piece left out would fail every result rather than pass unseen.
    ref64 = {t: xp.full(like[t], math.nan, dtype=xp.float64) for t in tensors}
    baseline = {t: xp.full(like[t], math.nan, dtype=xp.float32) for t in tensors}
    for batch, heads_kv in parts:
        heads_q = slice(heads_kv.start * group, heads_kv.stop * group)
        inputs = {n: to_float32(a[batch, :, heads_q if n in QUERY_SIDE else heads_kv]) for n, a in data.items()}
        ref_part, base_part = _both(tensors, inputs, causal, dtype, xp)
        for t in tensors:
            heads = heads_q if t in QUERY_SIDE else heads_kv
            ref64[t][batch, :, heads] = ref_part[t]
            baseline[t][batch, :, heads] = base_part[t]
    return Reference("full", ref64, baseline)


def slice_reference(data: dict[str, Array], causal: bool, dtype: str, tensors: Sequence[str], rows: int,
                    xp: Any) -> Reference:
    """Reference "slice": out and dq (those of `tensors`) of the last `rows` query rows of batch
    element 0, every head: (1, rows, Hq, D) each, in (Hq, rows, Sk) scores however long the
    sequence."""
    seqlen_q = data["q"].shape[1]
    start = max(seqlen_q - rows, 0)
    inputs = {n: to_float32(a[:1]) for n, a in data.items()}
    wanted = [t for t in tensors if t in ("out", "dq")]
    ref64, baseline = _both(wanted, inputs, causal, dtype, xp, rows=(start, seqlen_q))
    return Reference("slice", ref64, baseline, start)


def reference_for(data: dict[str, Array], causal: bool, dtype: str, passes: Sequence[str], free_bytes: int,
                  xp: Any) -> Reference:
    """The full reference when one head of it fits REFERENCE_MEMORY_FRACTION of `free_bytes`,
    else (or when it fails) the slice; data: q, k, v, dout (B, S, H, D) in `dtype`."""
    tensors = [t for p in passes for t in PASS_TENSORS[p]]
    (batch, seqlen_q, heads_q, _), (_, seqlen_k, heads_kv, _) = data["q"].shape, data["k"].shape
    budget = REFERENCE_MEMORY_FRACTION * free_bytes
    parts = pieces(batch, heads_kv, seqlen_q, seqlen_k, heads_q // heads_kv, budget)
    if parts:
        try:
            return full_reference(data, causal, dtype, tensors, parts, xp)
        except Exception as exc:  # out of memory after all: the slice still checks something
            reason = f"full reference failed: {short(exc)}"
        free_memory()
    else:
        need = head_bytes(seqlen_q, seqlen_k, heads_q // heads_kv)
        reason = (f"one head of the full reference would need {need / GB:.1f} GB (allowed: "
                  f"{REFERENCE_MEMORY_FRACTION:.0%} of {free_bytes / GB:.1f} GB free)")
    try:
        return replace(slice_reference(data, causal, dtype, tensors, CHECK_ROWS, xp), note=reason)
    except Exception as exc:
        return Reference(None, {}, {}, note=f"{reason}; slice reference failed: {short(exc)}")


def verdict(results: list[tolerance.Comparison]) -> dict[str, Any]:
    """Row fields of a set of comparisons: valid (every tensor passes), error (the worst
    max|ours − ref64| as a fraction of what the rule allows, so <= 1 passes; nan for a NaN),
    errors and allowed per tensor, and mismatches (tolerance's messages) for those that fail."""
    fractions = [r.error / r.bound for r in results]
    worst = math.nan if any(math.isnan(f) for f in fractions) else max(fractions)
    fields = {"valid": all(r.ok for r in results), "error": worst, "errors": {r.name: r.error for r in results},
              "allowed": {r.name: r.bound for r in results}}
    failed = [r.message() for r in results if not r.ok]
    return {**fields, "mismatches": failed} if failed else fields


def judge(ref: Reference, pass_: str, outputs: tuple[Array, ...], dtype: str, xp: Any) -> dict[str, Any]:
    """The check fields of a row: verdict() of outputs (out, or dq, dk, dv, each (B, S, H, D))
    against ref, check (its kind), and a note when only a slice was checked."""
    pairs = [(n, o) for n, o in zip(PASS_TENSORS[pass_], outputs) if n in ref.ref64]
    if ref.kind is None or not pairs:
        return {"valid": None, "note": f"not validated: {ref.note}"}
    if ref.kind == "slice":
        pairs = [(n, o[:1, ref.start:]) for n, o in pairs]
    results = [tolerance.compare(n, to_float32(o), ref.ref64[n], ref.baseline[n], dtype, xp=xp) for n, o in pairs]
    fields = {**verdict(results), "check": ref.kind}
    if ref.kind == "slice":
        rows = outputs[0].shape[1] - ref.start
        fields["note"] = (f"checked {', '.join(n for n, _ in pairs)} of the last {rows} query rows of batch 0 "
                          f"only ({ref.note})")
    return fields
