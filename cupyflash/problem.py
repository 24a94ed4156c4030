"""The attention problem described by the arrays and options, and every check on them.

Each failed check raises ValueError (bad shape or value) or TypeError (bad dtype or kind) with
a message that names the argument, shows what it got and states the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MAX_HEAD_DIM

SUPPORTED_DTYPES = ("float16", "bfloat16")
MAX_GRID_YZ = 65535  # CUDA grid limit: heads and batch are grid dimensions y and z


_dtype_names: dict[Any, str] = {}


def dtype_name(array: Any) -> str:
    dtype = array.dtype
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = np.dtype(dtype).name
    return name


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name; bfloat16 comes from ml_dtypes (CuPy understands it too)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _check_4d(name: str, array: Any) -> None:
    if array.ndim != 4:
        raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim); got shape {tuple(array.shape)}")


def _check_dtype(name: str, array: Any, expected: str | None = None) -> None:
    got = dtype_name(array)
    if expected is not None and got != expected:
        raise TypeError(f"{name}.dtype is {got} but q.dtype is {expected}; q, k, v (and dout, out) must share a dtype")
    if got not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype is {got}; cupyflash computes in float16 or bfloat16 on tensor cores "
                        f"(cast with {name}.astype(numpy.float16) or to bfloat16)")


def _check_last_dim_contiguous(name: str, array: Any) -> None:
    # An empty array's strides mean nothing (NumPy gives them as 0).
    if array.size > 0 and array.shape[-1] > 1 and array.strides[-1] != array.itemsize:
        raise ValueError(f"{name}'s last dimension (head_dim) must be contiguous; its stride is "
                         f"{array.strides[-1] // array.itemsize} elements (pass a copy, e.g. {name}.copy())")


def _check_window(window_size: Any) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
        valid = all(float(w) == int(w) for w in window_size)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"window_size must be a pair of integers (left, right); got {window_size!r}")
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded); got {(left, right)}")
    return left, right


def _check_scalar(name: str, value: Any, low: float, high: float, high_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    inside = low <= number < high if high_open else low <= number <= high
    if not math.isfinite(number) or not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}; got {value!r}")
    return number


@dataclass(frozen=True)
class Problem:
    """Sizes and options of one attention call. `window` has causal folded in (right = 0)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    causal: bool
    softmax_scale: float
    window: tuple[int, int]
    softcap: float = 0.0
    has_alibi: bool = False
    dropout_p: float = 0.0

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def is_empty(self) -> bool:
        return self.batch == 0 or self.seqlen_q == 0 or self.heads_q == 0

    @classmethod
    def from_arrays(cls, q: Any, k: Any, v: Any, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size: Any = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                    dropout_p: float = 0.0) -> Problem:
        """The checked problem. The checks read only shapes, strides, dtypes and options, so a
        repeat call with the same ones (a training loop) reuses the earlier result."""
        try:
            alibi = None if alibi_slopes is None else (tuple(alibi_slopes.shape), alibi_slopes.dtype)
            key = (*(array_signature(a) for a in (q, k, v)), bool(causal), softmax_scale, tuple(window_size), softcap,
                   dropout_p, alibi)
            known = _checked_problems.get(key)
        except (TypeError, AttributeError):  # unhashable or odd arguments: the checks below report them
            key, known = None, None
        if known is not None:
            return known
        problem = cls._check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p)
        if key is not None:
            if len(_checked_problems) >= _MAX_CHECKED_PROBLEMS:
                _checked_problems.clear()
            _checked_problems[key] = problem
        return problem

    @classmethod
    def _check(cls, q: Any, k: Any, v: Any, causal: Any, softmax_scale: Any, window_size: Any, softcap: Any,
               alibi_slopes: Any, dropout_p: Any) -> Problem:
        for name, array in (("q", q), ("k", k), ("v", v)):
            _check_4d(name, array)
        _check_dtype("q", q)
        for name, array in (("k", k), ("v", v)):
            _check_dtype(name, array, dtype_name(q))
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"k.shape {tuple(k.shape)} and v.shape {tuple(v.shape)} differ; k and v must have "
                             "the same (batch, seqlen_k, heads_kv, head_dim)")
        batch, seqlen_q, heads_q, head_dim = (int(n) for n in q.shape)
        _, seqlen_k, heads_kv, _ = (int(n) for n in k.shape)
        if k.shape[0] != batch:
            raise ValueError(f"k.shape[0] (batch) is {k.shape[0]} but q.shape[0] is {batch}; q, k and v must share batch")
        if k.shape[3] != head_dim:
            raise ValueError(f"k.shape[3] (head_dim) is {k.shape[3]} but q.shape[3] is {head_dim}; "
                             "q, k and v must share head_dim")
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(f"q has {heads_q} heads and k, v have {heads_kv}; heads_q must be a positive multiple "
                             "of heads_kv (MQA/GQA)")
        if not 1 <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim (q.shape[3]) is {head_dim}; cupyflash supports head_dim from 1 to {MAX_HEAD_DIM}")
        if batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ:
            raise ValueError(f"batch ({batch}) and heads_q ({heads_q}) must each be at most {MAX_GRID_YZ}")
        for name, array in (("q", q), ("k", k), ("v", v)):
            _check_last_dim_contiguous(name, array)
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(head_dim)
        scale = _check_scalar("softmax_scale", softmax_scale, 0.0, math.inf, high_open=True)
        if scale <= 0.0:
            raise ValueError(f"softmax_scale must be positive; got {softmax_scale!r}")
        left, right = _check_window(window_size)
        if causal:
            right = 0  # causal is the window (left, 0), aligned bottom-right like flash_attn
        softcap = _check_scalar("softcap", softcap, 0.0, math.inf, high_open=True)
        dropout_p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
        if alibi_slopes is not None:
            check_alibi_slopes(alibi_slopes, batch, heads_q)
        return cls(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype_name(q), bool(causal), scale,
                   (left, right), softcap, alibi_slopes is not None, dropout_p)

    def check_backward(self, dout: Any, out: Any, lse: Any) -> None:
        """dout and out like q; lse float32 (batch, heads_q, seqlen_q)."""
        q_shape = (self.batch, self.seqlen_q, self.heads_q, self.head_dim)
        for name, array in (("dout", dout), ("out", out)):
            _check_4d(name, array)
            if tuple(array.shape) != q_shape:
                raise ValueError(f"{name}.shape is {tuple(array.shape)}; it must equal q.shape {q_shape}")
            _check_dtype(name, array, self.dtype)
            _check_last_dim_contiguous(name, array)
        lse_shape = (self.batch, self.heads_q, self.seqlen_q)
        if tuple(lse.shape) != lse_shape:
            raise ValueError(f"lse.shape is {tuple(lse.shape)}; it must be (batch, heads_q, seqlen_q) = {lse_shape}, "
                             "as returned by attention(..., return_lse=True)")
        if dtype_name(lse) != "float32":
            raise TypeError(f"lse.dtype is {dtype_name(lse)}; it must be float32, as returned by attention()")


def array_signature(array: Any) -> tuple[Any, ...]:
    """What the checks (and a launch plan) depend on: type, shape, strides and dtype."""
    return (type(array), tuple(array.shape), tuple(array.strides), array.dtype)


_checked_problems: dict[tuple[Any, ...], Problem] = {}
_MAX_CHECKED_PROBLEMS = 256


def check_alibi_slopes(alibi_slopes: Any, batch: int, heads_q: int) -> None:
    shape = tuple(getattr(alibi_slopes, "shape", ()))
    if shape not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes.shape is {shape}; it must be (heads_q,) = ({heads_q},) or "
                         f"(batch, heads_q) = ({batch}, {heads_q})")
    if np.dtype(alibi_slopes.dtype).kind != "f":
        raise TypeError(f"alibi_slopes.dtype is {np.dtype(alibi_slopes.dtype).name}; it must be a float dtype")


def check_seed(seed: Any) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be None or a non-negative integer; got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be None or a non-negative integer; got {seed!r}")
