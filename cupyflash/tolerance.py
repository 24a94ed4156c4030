"""The tolerance rule (DESIGN.md), in one place:

    max|ours - ref64| <= 2 * max|baseline - ref64| + floor

ref64 is the float64 reference; baseline is naive attention computed in the input dtype
(reference.py's compute_dtype mode: dtype operands, float32 accumulation, P and dS rounded to
the dtype); floor is the dtype's rounding noise, relative to the largest reference value.
Infinities must match exactly (lse of a row that sees nothing); a NaN never passes.

compare() works on the host by default (the arrays are copied there in float64); given
``xp=cupy`` it compares where the arrays are and copies back only the numbers of the
Comparison, for results too large to copy (the benchmark's grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

# Unit roundoff of the stored result. lse is float32 but goes through ex2/lg2.approx and a
# different summation order than the baseline, so it gets a looser floor than float32's 2^-24.
FLOOR_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "lse": 2.0**-16}


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float  # max |ours - ref64| (nan when ours has a NaN)
    baseline_error: float  # max |baseline - ref64|
    floor: float
    worst: tuple[int, ...]  # coordinate of the largest error (or of the first NaN / inf mismatch)
    ours_at_worst: float
    ref_at_worst: float

    @property
    def bound(self) -> float:
        return 2.0 * self.baseline_error + self.floor

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.bound)  # False for nan

    @property
    def ratio(self) -> float:
        """error / baseline_error: how many times the naive same-dtype error ours is."""
        return self.error / self.baseline_error if self.baseline_error > 0 else (0.0 if self.error == 0 else np.inf)

    def message(self) -> str:
        return (f"{self.name}: max|ours - ref64| = {self.error:.3e} at {self.worst} (ours {self.ours_at_worst!r}, "
                f"ref64 {self.ref_at_worst!r}); allowed 2 x {self.baseline_error:.3e} (baseline error) + "
                f"{self.floor:.3e} (floor) = {self.bound:.3e}")


def _host64(array: Any) -> np.ndarray:
    array = array.get() if hasattr(array, "get") else np.asarray(array)
    return np.asarray(array, dtype=np.float64)


def _as64(array: Any, xp: ModuleType | None) -> Any:
    """float64 values on the host (xp None) or in xp's memory (no host copy with xp=cupy)."""
    if xp is None:
        return _host64(array)
    return xp.asarray(array).astype(xp.float64, copy=False)


def _abs_error(ours: Any, ref: Any, xp: ModuleType = np) -> Any:
    """|ours - ref| with equal infinities counting 0 and any NaN or inf mismatch counting nan."""
    with np.errstate(invalid="ignore"):
        error = xp.abs(ours - ref)
    error[ours == ref] = 0.0
    error[xp.isinf(ours) ^ xp.isinf(ref)] = np.nan
    return error


def compare(name: str, ours: Any, ref64: Any, baseline: Any, kind: str, *,
            xp: ModuleType | None = None) -> Comparison:
    """kind: "float16" / "bfloat16" (the result's dtype) or "lse". ours, ref64, baseline: arrays
    of one shape, any float dtype. xp: None compares on the host in NumPy; cupy compares on the
    current GPU (NumPy arrays are copied there) and brings back only the Comparison's numbers."""
    mod = np if xp is None else xp
    ours, ref64, baseline = (_as64(a, xp) for a in (ours, ref64, baseline))
    if ours.shape != ref64.shape:
        raise ValueError(f"{name}: ours has shape {ours.shape} but the reference has {ref64.shape}")
    error = _abs_error(ours, ref64, mod)
    base_error = _abs_error(baseline, ref64, mod)
    finite_ref = ref64[mod.isfinite(ref64)]
    floor = FLOOR_EPS[kind] * max(1.0, float(mod.max(mod.abs(finite_ref))) if finite_ref.size else 1.0)
    if error.size == 0:
        return Comparison(name, 0.0, 0.0, floor, (), 0.0, 0.0)
    bad = mod.isnan(error)
    any_bad = bool(bad.any())
    flat = int(mod.argmax(bad)) if any_bad else int(mod.argmax(error))
    worst = tuple(int(i) for i in np.unravel_index(flat, error.shape))
    return Comparison(name, float("nan") if any_bad else float(error.max()), float(mod.nanmax(base_error)), floor,
                      worst, float(ours[worst]), float(ref64[worst]))


def assert_close(name: str, ours: Any, ref64: Any, baseline: Any, kind: str) -> Comparison:
    result = compare(name, ours, ref64, baseline, kind)
    if not result.ok:
        raise AssertionError(result.message())
    return result
