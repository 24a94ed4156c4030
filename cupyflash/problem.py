"""The attention problem described by the arrays and options, and every check on them.

Each failed check raises ValueError (bad shape or value) or TypeError (bad dtype or kind) with
a message that names the argument, shows what it got and states the rule.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .kernels.common import MAX_HEAD_DIM, Variant, kernel_head_dim

SUPPORTED_DTYPES = ("float16", "bfloat16")
MAX_GRID_YZ = 65535  # CUDA grid limit: heads and batch are grid dimensions y and z
INT32_MAX = 2**31 - 1  # the kernels take lengths and window sides as int (kernels_cu/mask.cuh)
# mask.cuh forms positions like i + (seqlen_k - seqlen_q) + right + 1 in int, with i up to a
# tile past seqlen_q and right < seqlen_q (wider windows become -1, _kernel_window): about
# seqlen_q + seqlen_k + 256. Each length below 2**30 minus a margin keeps that inside int32.
MAX_SEQLEN = 2**30 - 1024
LOG2_E = math.log2(math.e)  # the kernels take softmax_scale * log2(e) as a float32 (launch.py)
# cp.async moves 16 bytes: the kernels read head_dim in whole 8-element chunks, so arrays.py pads
# the stored head dim to a multiple of this.
HEAD_DIM_MULTIPLE = 8


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


def framework(obj: Any) -> str:
    """The top-level module of obj's type: "numpy", "cupy", "torch", "jax", "jaxlib", ..."""
    return type(obj).__module__.partition(".")[0]


def cast_hint(name: str, source: Any = None) -> str:
    """How the caller casts `name` to float16 or bfloat16, in the framework it came from."""
    kind = "numpy" if source is None else framework(source)
    if kind == "torch":
        return f"{name}.half() or {name}.to(torch.bfloat16)"
    if kind == "cupy":
        return f"{name}.astype(cupy.float16) or {name}.astype(ml_dtypes.bfloat16)"
    if kind in ("jax", "jaxlib"):
        return f"{name}.astype(jax.numpy.float16) or {name}.astype(jax.numpy.bfloat16)"
    return f"{name}.astype(numpy.float16) or {name}.astype(ml_dtypes.bfloat16)"


def _check_dtype(name: str, array: Any, expected: str | None = None, source: Any = None) -> None:
    """source: the caller's object behind `array` (a torch tensor, say), for the cast hint."""
    got = dtype_name(array)
    if expected is not None and got != expected:
        raise TypeError(f"{name}.dtype is {got} but q.dtype is {expected}; q, k, v (and dout, out) must share a dtype")
    if got not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype is {got}; cupyflash computes in float16 or bfloat16 on tensor cores "
                        f"(cast with {cast_hint(name, source)})")


def _check_last_dim_contiguous(name: str, array: Any) -> None:
    # An empty array's strides mean nothing (NumPy gives them as 0).
    if array.size > 0 and array.shape[-1] > 1 and array.strides[-1] != array.itemsize:
        raise ValueError(f"{name}'s last dimension (head_dim) must be contiguous; its stride is "
                         f"{array.strides[-1] // array.itemsize} elements (pass a copy, e.g. {name}.copy())")


def check_flag(name: str, value: Any) -> bool:
    """A bool or NumPy bool as a bool; anything else (1, "no", None) is a TypeError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False (a bool); got {type(value).__name__} {value!r}")


def _window_entry(w: Any) -> int:
    """An int, a NumPy integer or an integral float as an int; ValueError otherwise ("3", 1.5, inf)."""
    if isinstance(w, (float, np.floating)):
        if not (math.isfinite(w) and float(w).is_integer()):
            raise ValueError(w)
        return int(w)
    return operator.index(w)  # TypeError for str, None, ...


def _check_window(window_size: Any) -> tuple[int, int]:
    try:
        left, right = (_window_entry(w) for w in window_size)
    except (TypeError, ValueError):  # not iterable, not two entries, or an entry that is no integer
        raise ValueError(f"window_size must be a pair of integers (left, right); got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded); got {(left, right)}")
    if max(left, right) > INT32_MAX:
        raise ValueError(f"window_size entries must be at most {INT32_MAX} (the kernels hold them in 32-bit ints; "
                         f"-1 means unbounded); got {(left, right)}")
    return left, right


def _kernel_window(left: int, right: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """The same mask with a side that reaches past every key made unbounded (-1), as flash_attn
    does, so the kernels' int positions (i + seqlen_k - seqlen_q -/+ a side) cannot overflow.
    Query i sees keys [i + off - left, i + off + right], off = seqlen_k - seqlen_q, 0 <= i < seqlen_q:
    left >= seqlen_k puts the lowest at or below key 0, right >= seqlen_q the highest at or past
    the last key, for every row."""
    return (-1 if left >= seqlen_k else left), (-1 if right >= seqlen_q else right)


def _check_softmax_scale(softmax_scale: Any) -> float:
    scale = _check_scalar("softmax_scale", softmax_scale, 0.0, math.inf, high_open=True)
    if scale <= 0.0:
        raise ValueError(f"softmax_scale must be positive; got {softmax_scale!r}")
    with np.errstate(over="ignore"):  # an overflow to inf is what is checked for
        in_float32 = (np.float32(scale), np.float32(scale * LOG2_E))
    if not all(0.0 < x < math.inf for x in in_float32):
        raise ValueError(f"softmax_scale is {softmax_scale!r}; the kernels use softmax_scale and softmax_scale * "
                         "log2(e) as float32, so both must be finite and nonzero there (softmax_scale from about "
                         "1e-45 to 2.3e38)")
    return scale


def is_text_or_flag(value: Any) -> bool:
    """What float() turns into a number ("0.1", b"1", True) but a numeric option must refuse:
    there a string or a flag is a mistake. (plan.find refuses them the same way.)"""
    return isinstance(value, (str, bytes, bytearray, bool, np.bool_))


def _check_scalar(name: str, value: Any, low: float, high: float, high_open: bool = False) -> float:
    if is_text_or_flag(value):
        raise TypeError(f"{name} must be a number; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    inside = low <= number < high if high_open else low <= number <= high
    if not math.isfinite(number) or not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}; got {value!r}")
    return number


def _check_arrays(q: Any, k: Any, v: Any, sources: Mapping[str, Any]) -> tuple[int, ...]:
    """Ranks, dtypes, matching shapes, the limits of the kernels and the contiguous head_dim of
    q, k, v; returns (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)."""
    for name, array in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, array)
    _check_dtype("q", q, source=sources.get("q"))
    for name, array in (("k", k), ("v", v)):
        _check_dtype(name, array, dtype_name(q), sources.get(name))
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
    for where, size in (("q.shape[0] (batch)", batch), ("q.shape[2] (heads_q)", heads_q)):
        if size > MAX_GRID_YZ:
            raise ValueError(f"{where} is {size}; batch and heads_q must each be at most {MAX_GRID_YZ} "
                             "(they are CUDA grid dimensions)")
    for where, size in (("q.shape[1] (seqlen_q)", seqlen_q), ("k.shape[1] (seqlen_k)", seqlen_k)):
        if size > MAX_SEQLEN:
            raise ValueError(f"{where} is {size}; seqlen_q and seqlen_k must each be at most {MAX_SEQLEN} "
                             "(2**30 - 1024: the kernels hold positions in 32-bit ints)")
    for name, array in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(name, array)
    return batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim


@dataclass(frozen=True)
class Problem:
    """Sizes and options of one attention call. `window` is what the kernels take: causal folded
    in (right = 0), and a side wider than the sequences made unbounded (-1).

    Three head dims: `head_dim` is the caller's; `stored_head_dim` is that rounded up to 8, the
    columns of the arrays the kernels read (arrays.kernel_ready zero-pads them); and
    `kernel_head_dim` is the compiled one that runs it (kernels/common.py), whose extra columns
    the kernels zero-fill on load and skip on store."""

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
    # Packed variable-length batches (varlen.py): batch sequences in total_q query rows and
    # total_k key rows; seqlen_q and seqlen_k are then the longest sequence's (they size grids).
    varlen: bool = False
    total_q: int = 0
    total_k: int = 0

    @property
    def stored_head_dim(self) -> int:
        return -(-self.head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE

    @property
    def kernel_head_dim(self) -> int:
        return kernel_head_dim(self.head_dim)

    @property
    def variant(self) -> Variant:
        """What the kernels are compiled for besides dtype, head dim and tiles: the window sides
        that bound keys (an unbounded side then costs nothing) and packed variable lengths."""
        return Variant(self.window[0] >= 0, self.window[1] >= 0, self.varlen)

    @property
    def query_rows(self) -> int:
        """Rows of q (and out, dout, dq): batch * seqlen_q, or total_q when packed."""
        return self.total_q if self.varlen else self.batch * self.seqlen_q

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """lse and delta: (batch, heads_q, seqlen_q), or (heads_q, total_q) when packed."""
        return (self.heads_q, self.total_q) if self.varlen else (self.batch, self.heads_q, self.seqlen_q)

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def is_empty(self) -> bool:
        return self.batch == 0 or self.seqlen_q == 0 or self.heads_q == 0

    @classmethod
    def from_arrays(cls, q: Any, k: Any, v: Any, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size: Any = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
                    dropout_p: float = 0.0, sources: Mapping[str, Any] | None = None) -> Problem:
        """The checked problem. The checks read only shapes, strides, dtypes and options, so a
        repeat call with the same ones (a training loop) reuses the earlier result. sources: the
        caller's objects behind q, k, v by name (torch tensors, say), only for the messages."""
        # Before the memo: its key holds the flag as a bool, which "no" or 1 must never reach.
        causal = causal if causal.__class__ is bool else check_flag("causal", causal)
        try:
            alibi = None if alibi_slopes is None else (tuple(alibi_slopes.shape), alibi_slopes.dtype)
            # The scalars with their types: True == 1.0 in a dict key, but only 1.0 passes the checks.
            key = (*(array_signature(a) for a in (q, k, v)), causal, softmax_scale, tuple(window_size), softcap,
                   dropout_p, alibi, softmax_scale.__class__, softcap.__class__, dropout_p.__class__)
            known = _checked_problems.get(key)
        except (TypeError, AttributeError):  # unhashable or odd arguments: the checks below report them
            key, known = None, None
        if known is not None:
            return known
        problem = cls._check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, dropout_p,
                             sources or {})
        if key is not None:
            if len(_checked_problems) >= _MAX_CHECKED_PROBLEMS:
                _checked_problems.clear()
            _checked_problems[key] = problem
        return problem

    @classmethod
    def _check(cls, q: Any, k: Any, v: Any, causal: bool, softmax_scale: Any, window_size: Any, softcap: Any,
               alibi_slopes: Any, dropout_p: Any, sources: Mapping[str, Any]) -> Problem:
        batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = _check_arrays(q, k, v, sources)
        scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else _check_softmax_scale(softmax_scale)
        left, right = _check_window(window_size)
        if causal:
            right = 0  # causal is the window (left, 0), aligned bottom-right like flash_attn
        softcap = _check_scalar("softcap", softcap, 0.0, math.inf, high_open=True)
        dropout_p = _check_scalar("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
        if alibi_slopes is not None:
            check_alibi_slopes(alibi_slopes, batch, heads_q)
        return cls(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype_name(q), causal, scale,
                   _kernel_window(left, right, seqlen_q, seqlen_k), softcap, alibi_slopes is not None, dropout_p)

    def check_backward(self, dout: Any, out: Any, lse: Any, sources: Mapping[str, Any] | None = None) -> None:
        """dout and out like q; lse float32 (batch, heads_q, seqlen_q). sources as in from_arrays."""
        q_shape = (self.batch, self.seqlen_q, self.heads_q, self.head_dim)
        for name, array in (("dout", dout), ("out", out)):
            _check_4d(name, array)
            if tuple(array.shape) != q_shape:
                raise ValueError(f"{name}.shape is {tuple(array.shape)}; it must equal q.shape {q_shape}")
            _check_dtype(name, array, self.dtype, (sources or {}).get(name))
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
