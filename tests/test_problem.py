"""Every input check of cupyflash.attention / attention_backward, through the public API.

Each case sends valid NumPy inputs with one thing broken and asserts the exception type and a
distinctive part of the message: the argument's name, what it got and the rule. The checks run
before any GPU is touched, so these tests pass the same with and without one. Valid inputs,
on a machine without a GPU, end in the RuntimeError that says so; options the kernels do not
implement yet end in NotImplementedError first, on any machine.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cupyflash as cf
from cupyflash.device import DeviceLimits, gpu_count
from cupyflash.problem import MAX_SEQLEN

BF16 = ml_dtypes.bfloat16
B, SQ, SK, HQ, HKV, D = 2, 5, 7, 4, 2, 16  # GQA (group of 2), seqlen_q != seqlen_k
HAS_GPU = gpu_count() > 0
# NumPy 2 gives arrays of size 0 zero strides (see the empty-seqlen case below).
cpu_only = pytest.mark.skipif(HAS_GPU, reason="checks what happens on a machine without a CUDA GPU")


def randn(shape: tuple[int, ...], dtype: Any = np.float16, seed: int = 0) -> np.ndarray:
    """Signed normal data (never zeros) in the given dtype."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def strided(shape: tuple[int, ...], dtype: Any = np.float16) -> np.ndarray:
    """An array of `shape` whose last dimension has a stride of 2 elements."""
    return randn(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]


def huge(shape: tuple[int, ...], dtype: Any = np.float16) -> np.ndarray:
    """An array of any shape in one element of memory (zero strides but the contiguous head_dim):
    the checks read only shapes and strides."""
    element = np.zeros(shape[-1], dtype)
    return np.lib.stride_tricks.as_strided(element, shape, (0,) * (len(shape) - 1) + (element.itemsize,))


def forward_args(dtype: Any = np.float16) -> dict[str, Any]:
    return {"q": randn((B, SQ, HQ, D), dtype, 1), "k": randn((B, SK, HKV, D), dtype, 2),
            "v": randn((B, SK, HKV, D), dtype, 3)}


def backward_args(dtype: Any = np.float16) -> dict[str, Any]:
    return {**forward_args(dtype), "dout": randn((B, SQ, HQ, D), dtype, 4), "out": randn((B, SQ, HQ, D), dtype, 5),
            "lse": randn((B, HQ, SQ), np.float32, 6)}


def call_forward(**changes: Any) -> Any:
    """cupyflash.attention on valid inputs with some arguments replaced or added."""
    args = {**forward_args(), **changes}
    return cf.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def call_backward(**changes: Any) -> Any:
    args = {**backward_args(), **changes}
    tensors = [args.pop(name) for name in ("dout", "q", "k", "v", "out", "lse")]
    return cf.attention_backward(*tensors, **args)


def raises(error: type[Exception], text: str) -> Any:
    """pytest.raises matching `text` literally."""
    return pytest.raises(error, match=re.escape(text))


# (id, replaced arguments, exception, literal part of the message)
SHAPE_CASES = [
    ("q-ndim", {"q": randn((B, SQ, HQ))}, ValueError,
     "q must be 4-D (batch, seqlen, heads, head_dim); got shape (2, 5, 4)"),
    ("k-ndim", {"k": randn((B, SK, HKV, D, 1))}, ValueError, "k must be 4-D (batch, seqlen, heads, head_dim)"),
    ("v-ndim", {"v": randn((SK, HKV, D))}, ValueError,
     "v must be 4-D (batch, seqlen, heads, head_dim); got shape (7, 2, 16)"),
    ("k-v-shapes-differ", {"v": randn((B, SK + 1, HKV, D))}, ValueError,
     "k.shape (2, 7, 2, 16) and v.shape (2, 8, 2, 16) differ; k and v must have the same"),
    ("batch-mismatch", {"k": randn((B + 1, SK, HKV, D)), "v": randn((B + 1, SK, HKV, D))}, ValueError,
     "k.shape[0] (batch) is 3 but q.shape[0] is 2; q, k and v must share batch"),
    ("head-dim-mismatch", {"k": randn((B, SK, HKV, 32)), "v": randn((B, SK, HKV, 32))}, ValueError,
     "k.shape[3] (head_dim) is 32 but q.shape[3] is 16; q, k and v must share head_dim"),
    ("heads-not-multiple", {"k": randn((B, SK, 3, D)), "v": randn((B, SK, 3, D))}, ValueError,
     "q has 4 heads and k, v have 3; heads_q must be a positive multiple of heads_kv"),
    ("heads-kv-zero", {"k": randn((B, SK, 0, D)), "v": randn((B, SK, 0, D))}, ValueError,
     "k, v have 0; heads_q must be a positive multiple of heads_kv"),
    ("head-dim-too-large", {"q": randn((B, SQ, HQ, 264)), "k": randn((B, SK, HKV, 264)), "v": randn((B, SK, HKV, 264))},
     ValueError, "head_dim (q.shape[3]) is 264; cupyflash supports head_dim from 1 to 256"),
    ("head-dim-zero", {"q": randn((B, SQ, HQ, 0)), "k": randn((B, SK, HKV, 0)), "v": randn((B, SK, HKV, 0))},
     ValueError, "head_dim (q.shape[3]) is 0; cupyflash supports head_dim from 1 to 256"),
    ("batch-above-grid", {"q": randn((65536, 1, 1, 8)), "k": randn((65536, 1, 1, 8)), "v": randn((65536, 1, 1, 8))},
     ValueError, "q.shape[0] (batch) is 65536; batch and heads_q must each be at most 65535 (they are CUDA grid"),
    ("heads-above-grid", {"q": huge((1, 1, 65536, 8)), "k": huge((1, 1, 1, 8)), "v": huge((1, 1, 1, 8))},
     ValueError, "q.shape[2] (heads_q) is 65536; batch and heads_q must each be at most 65535"),
    ("seqlen-q-above-int32-margin", {"q": huge((B, MAX_SEQLEN + 1, HQ, D))}, ValueError,
     f"q.shape[1] (seqlen_q) is {MAX_SEQLEN + 1}; seqlen_q and seqlen_k must each be at most {MAX_SEQLEN} "
     "(2**30 - 1024: the kernels hold positions in 32-bit ints)"),
    ("seqlen-k-2-31", {"k": huge((B, 2**31, HKV, D)), "v": huge((B, 2**31, HKV, D))}, ValueError,
     "k.shape[1] (seqlen_k) is 2147483648; seqlen_q and seqlen_k must each be at most"),
    ("q-last-dim-strided", {"q": strided((B, SQ, HQ, D))}, ValueError,
     "q's last dimension (head_dim) must be contiguous; its stride is 2 elements"),
    ("k-last-dim-strided", {"k": strided((B, SK, HKV, D)), "v": strided((B, SK, HKV, D))}, ValueError,
     "k's last dimension (head_dim) must be contiguous"),
    ("v-last-dim-strided", {"v": strided((B, SK, HKV, D))}, ValueError,
     "v's last dimension (head_dim) must be contiguous"),
]

DTYPE_CASES = [
    ("q-float32", {"q": randn((B, SQ, HQ, D), np.float32)}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16"),
    ("q-float64", {"q": randn((B, SQ, HQ, D), np.float64)}, TypeError,
     "q.dtype is float64; cupyflash computes in float16"),
    ("q-int32", {"q": randn((B, SQ, HQ, D), np.int32)}, TypeError, "q.dtype is int32; cupyflash computes in float16"),
    ("k-dtype-differs", {"k": randn((B, SK, HKV, D), BF16)}, TypeError,
     "k.dtype is bfloat16 but q.dtype is float16; q, k, v (and dout, out) must share a dtype"),
    ("v-dtype-differs", {"v": randn((B, SK, HKV, D), np.float32)}, TypeError,
     "v.dtype is float32 but q.dtype is float16"),
    ("all-float32", {name: a.astype(np.float32) for name, a in forward_args().items()}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16"),
]

KIND_CASES = [
    ("q-list", {"q": randn((B, SQ, HQ, D)).tolist()}, TypeError,
     "q must be a CuPy or NumPy array, or an object with __dlpack__ or __cuda_array_interface__; got list"),
    ("v-scalar", {"v": 1.0}, TypeError, "v must be a CuPy or NumPy array"),
    ("alibi-list", {"alibi_slopes": [0.5] * HQ}, TypeError, "alibi_slopes must be a CuPy or NumPy array"),
]

OPTION_CASES = [
    ("window-one-entry", {"window_size": (4,)}, ValueError,
     "window_size must be a pair of integers (left, right); got (4,)"),
    ("window-three-entries", {"window_size": (1, 2, 3)}, ValueError, "window_size must be a pair of integers"),
    ("window-fraction", {"window_size": (1.5, 2)}, ValueError,
     "window_size must be a pair of integers (left, right); got (1.5, 2)"),
    ("window-none", {"window_size": None}, ValueError,
     "window_size must be a pair of integers (left, right); got None"),
    ("window-left-below-minus-one", {"window_size": (-2, 0)}, ValueError,
     "window_size entries must be >= -1 (-1 means unbounded); got (-2, 0)"),
    ("window-right-below-minus-one", {"window_size": (3, -5)}, ValueError, "window_size entries must be >= -1"),
    ("softmax-scale-zero", {"softmax_scale": 0.0}, ValueError, "softmax_scale must be positive; got 0.0"),
    ("softmax-scale-negative", {"softmax_scale": -0.5}, ValueError, "softmax_scale must be in [0.0, inf); got -0.5"),
    ("softmax-scale-nan", {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be in [0.0, inf); got nan"),
    ("softmax-scale-inf", {"softmax_scale": float("inf")}, ValueError, "softmax_scale must be in [0.0, inf); got inf"),
    ("softmax-scale-text", {"softmax_scale": "big"}, TypeError, "softmax_scale must be a number; got 'big'"),
    ("softmax-scale-numeric-text", {"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a number; got '0.1'"),
    ("softmax-scale-bytes", {"softmax_scale": b"1"}, TypeError, "softmax_scale must be a number; got b'1'"),
    ("softmax-scale-bool", {"softmax_scale": True}, TypeError, "softmax_scale must be a number; got True"),
    ("softcap-text", {"softcap": "1"}, TypeError, "softcap must be a number; got '1'"),
    ("dropout-bool", {"dropout_p": False}, TypeError, "dropout_p must be a number; got False"),
    ("softcap-negative", {"softcap": -1.0}, ValueError, "softcap must be in [0.0, inf); got -1.0"),
    ("softcap-nan", {"softcap": float("nan")}, ValueError, "softcap must be in [0.0, inf); got nan"),
    ("softcap-none", {"softcap": None}, TypeError, "softcap must be a number; got None"),
    ("dropout-one", {"dropout_p": 1.0}, ValueError, "dropout_p must be in [0.0, 1.0); got 1.0"),
    ("dropout-negative", {"dropout_p": -0.1}, ValueError, "dropout_p must be in [0.0, 1.0); got -0.1"),
    ("alibi-wrong-length", {"alibi_slopes": np.full(HQ + 1, 0.5, np.float32)}, ValueError,
     "alibi_slopes.shape is (5,); it must be (heads_q,) = (4,) or (batch, heads_q) = (2, 4)"),
    ("alibi-kv-heads", {"alibi_slopes": np.full((B, HKV), 0.5, np.float32)}, ValueError,
     "alibi_slopes.shape is (2, 2); it must be (heads_q,) = (4,)"),
    ("alibi-int", {"alibi_slopes": np.ones(HQ, np.int64)}, TypeError,
     "alibi_slopes.dtype is int64; it must be a float dtype"),
    # What the kernels hold in int32 and float32, checked here instead of failing (or worse) at launch.
    ("window-inf", {"window_size": (float("inf"), 0)}, ValueError,
     "window_size must be a pair of integers (left, right); got (inf, 0)"),
    ("window-nan", {"window_size": (0, float("nan"))}, ValueError, "window_size must be a pair of integers"),
    ("window-text", {"window_size": ("3", "0")}, ValueError,
     "window_size must be a pair of integers (left, right); got ('3', '0')"),
    ("window-2-40", {"window_size": (2**40, 0)}, ValueError,
     "window_size entries must be at most 2147483647 (the kernels hold them in 32-bit ints; -1 means unbounded); "
     "got (1099511627776, 0)"),
    ("window-2-31", {"window_size": (-1, np.int64(2**31))}, ValueError,
     "window_size entries must be at most 2147483647"),
    ("softmax-scale-inf-in-float32", {"softmax_scale": 1e39}, ValueError,
     "softmax_scale is 1e+39; the kernels use softmax_scale and softmax_scale * log2(e) as float32, so both "
     "must be finite and nonzero there"),
    ("softmax-scale-zero-in-float32", {"softmax_scale": 1e-50}, ValueError,
     "softmax_scale is 1e-50; the kernels use softmax_scale and softmax_scale * log2(e) as float32"),
    ("softmax-scale-log2e-inf-in-float32", {"softmax_scale": 3e38}, ValueError,  # finite, but not times log2(e)
     "softmax_scale is 3e+38; the kernels use softmax_scale and softmax_scale * log2(e) as float32"),
    ("causal-text", {"causal": "no"}, TypeError, "causal must be True or False (a bool); got str 'no'"),
    ("causal-int", {"causal": 1}, TypeError, "causal must be True or False (a bool); got int 1"),
    ("causal-none", {"causal": None}, TypeError, "causal must be True or False (a bool); got NoneType None"),
    ("causal-array", {"causal": np.array([True])}, TypeError, "causal must be True or False (a bool); got ndarray"),
    ("seed-negative", {"seed": -1}, ValueError, "seed must be None or a non-negative integer; got -1"),
    ("seed-bool", {"seed": True}, TypeError, "seed must be None or a non-negative integer; got bool True"),
    ("seed-float", {"seed": 1.0}, TypeError, "seed must be None or a non-negative integer; got float 1.0"),
    ("seed-text", {"seed": "7"}, TypeError, "seed must be None or a non-negative integer; got str '7'"),
]

FORWARD_CASES = SHAPE_CASES + DTYPE_CASES + KIND_CASES + OPTION_CASES


def params(cases: list[Any]) -> list[Any]:
    """Each row as a pytest.param named by its first field (rows already made params pass through)."""
    return [row if isinstance(row, type(pytest.param())) else pytest.param(*row, id=row[0]) for row in cases]


@pytest.mark.parametrize("case_id, changes, error, text", params(FORWARD_CASES))
def test_forward_rejects(case_id: str, changes: dict[str, Any], error: type[Exception], text: str) -> None:
    with raises(error, text):
        call_forward(**changes)


@pytest.mark.parametrize("case_id, changes, error, text", params(FORWARD_CASES))
def test_backward_applies_the_forward_checks(case_id: str, changes: dict[str, Any], error: type[Exception],
                                             text: str) -> None:
    """attention_backward checks q, k, v and the options with the same messages."""
    with raises(error, text):
        call_backward(**changes)


BACKWARD_CASES = [
    ("dout-ndim", {"dout": randn((B, SQ, HQ))}, ValueError, "dout must be 4-D (batch, seqlen, heads, head_dim)"),
    ("out-ndim", {"out": randn((1, B, SQ, HQ, D))}, ValueError, "out must be 4-D (batch, seqlen, heads, head_dim)"),
    ("dout-shape", {"dout": randn((B, SQ, HQ, 8))}, ValueError,
     "dout.shape is (2, 5, 4, 8); it must equal q.shape (2, 5, 4, 16)"),
    ("out-shape", {"out": randn((B, SK, HQ, D))}, ValueError,
     "out.shape is (2, 7, 4, 16); it must equal q.shape (2, 5, 4, 16)"),
    ("dout-dtype", {"dout": randn((B, SQ, HQ, D), np.float32)}, TypeError,
     "dout.dtype is float32 but q.dtype is float16; q, k, v (and dout, out) must share a dtype"),
    ("out-dtype", {"out": randn((B, SQ, HQ, D), BF16)}, TypeError, "out.dtype is bfloat16 but q.dtype is float16"),
    ("dout-last-dim-strided", {"dout": strided((B, SQ, HQ, D))}, ValueError,
     "dout's last dimension (head_dim) must be contiguous; its stride is 2 elements"),
    ("out-last-dim-strided", {"out": strided((B, SQ, HQ, D))}, ValueError,
     "out's last dimension (head_dim) must be contiguous"),
    ("lse-transposed", {"lse": randn((B, SQ, HQ), np.float32)}, ValueError,
     "lse.shape is (2, 5, 4); it must be (batch, heads_q, seqlen_q) = (2, 4, 5), as returned by attention"),
    ("lse-4d", {"lse": randn((B, HQ, SQ, 1), np.float32)}, ValueError, "lse.shape is (2, 4, 5, 1); it must be"),
    ("lse-float16", {"lse": randn((B, HQ, SQ))}, TypeError, "lse.dtype is float16; it must be float32"),
    ("lse-float64", {"lse": randn((B, HQ, SQ), np.float64)}, TypeError, "lse.dtype is float64; it must be float32"),
    ("lse-list", {"lse": [[0.0]]}, TypeError, "lse must be a CuPy or NumPy array"),
    ("dout-list", {"dout": [0.0]}, TypeError, "dout must be a CuPy or NumPy array"),
]


@pytest.mark.parametrize("case_id, changes, error, text", params(BACKWARD_CASES))
def test_backward_rejects(case_id: str, changes: dict[str, Any], error: type[Exception], text: str) -> None:
    with raises(error, text):
        call_backward(**changes)


# --- arguments of one function only: required arrays given as None, its own flags ---

FORWARD_ONLY_CASES = [
    *[(f"{name}-none", {name: None}, TypeError,
       f"{name} is None; attention() needs {name} as a CuPy or NumPy array, or an object with __dlpack__")
      for name in ("q", "k", "v")],
    ("return-lse-text", {"return_lse": "yes"}, TypeError, "return_lse must be True or False (a bool); got str 'yes'"),
    ("return-lse-int", {"return_lse": 0}, TypeError, "return_lse must be True or False (a bool); got int 0"),
]

BACKWARD_ONLY_CASES = [
    *[(f"{name}-none", {name: None}, TypeError, f"{name} is None; attention_backward() needs {name} as a CuPy or "
       "NumPy array") for name in ("dout", "q", "k", "v")],
    *[(f"{name}-none", {name: None}, TypeError, f"{name} is None; attention_backward() needs {name} as a CuPy or "
       "NumPy array, or an object with __dlpack__ or __cuda_array_interface__ (out and lse are what "
       "attention(..., return_lse=True) returns)") for name in ("out", "lse")],
    ("deterministic-text", {"deterministic": "no"}, TypeError,
     "deterministic must be True or False (a bool); got str 'no'"),
    ("deterministic-int", {"deterministic": 1}, TypeError, "deterministic must be True or False (a bool); got int 1"),
]


@pytest.mark.parametrize("case_id, changes, error, text", params(FORWARD_ONLY_CASES))
def test_forward_only_rejects(case_id: str, changes: dict[str, Any], error: type[Exception], text: str) -> None:
    with raises(error, text):
        call_forward(**changes)


@pytest.mark.parametrize("case_id, changes, error, text", params(BACKWARD_ONLY_CASES))
def test_backward_only_rejects(case_id: str, changes: dict[str, Any], error: type[Exception], text: str) -> None:
    with raises(error, text):
        call_backward(**changes)


ALL_FORWARD = FORWARD_CASES + FORWARD_ONLY_CASES
ALL_BACKWARD = FORWARD_CASES + BACKWARD_CASES + BACKWARD_ONLY_CASES


@pytest.mark.parametrize("function, case_id, changes, error, text",
                         [pytest.param(call_forward, *row, id=f"fwd-{row[0]}") for row in ALL_FORWARD]
                         + [pytest.param(call_backward, *row, id=f"bwd-{row[0]}") for row in ALL_BACKWARD])
def test_every_bad_argument_is_named_before_a_gpu_is_needed(function: Any, case_id: str, changes: dict[str, Any],
                                                            error: type[Exception], text: str) -> None:
    """The issue's rule, over every bad call above: the argument's error (never the "found no
    CUDA GPU" RuntimeError, which these calls reach on this machine only if a check is late),
    and a message naming an argument the call changed."""
    with pytest.raises(Exception) as caught:
        function(**changes)
    assert caught.type is error, f"{case_id}: {caught.type.__name__}: {caught.value}"
    message = str(caught.value)
    assert any(re.search(rf"\b{re.escape(name)}\b", message) for name in changes), (case_id, message)


def test_flags_are_checked_before_the_plan_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan's key holds the options as given, and 1 == True (same hash) there: a flag that is
    not a bool must never reach plan.find, where it could hit a plan kept for True."""
    from cupyflash import api

    def find(*args: Any) -> None:
        raise AssertionError(f"plan.find reached with {args[2]}")

    monkeypatch.setattr(api.plans, "find", find)
    for bad in ({"causal": "no"}, {"causal": 1}, {"return_lse": 1}):
        with raises(TypeError, "must be True or False (a bool)"):
            call_forward(**bad)
    for bad in ({"causal": 1.0}, {"deterministic": 1}):
        with raises(TypeError, "must be True or False (a bool)"):
            call_backward(**bad)


def test_checked_problem_memo_never_lets_a_bad_flag_through() -> None:
    """Problem.from_arrays reuses a checked problem by a key that holds causal as a bool: a
    causal=True problem checked first must not answer causal="no" (bool("no") is True)."""
    from cupyflash.problem import Problem

    args = forward_args()
    first = Problem.from_arrays(args["q"], args["k"], args["v"], causal=True)
    assert Problem.from_arrays(args["q"], args["k"], args["v"], causal=np.True_) is first
    for bad in ("no", 1, np.int64(1), None):
        with raises(TypeError, "causal must be True or False (a bool)"):
            Problem.from_arrays(args["q"], args["k"], args["v"], causal=bad)


@pytest.mark.parametrize("window, seqlen_q, seqlen_k, kernel_window", [
    ((2**31 - 1, 2**31 - 1), 5, 7, (-1, -1)),  # wider than both sequences: unbounded, no int32 overflow
    ((7, 5), 5, 7, (-1, -1)),  # left reaches key 0 from every row, right the last key
    ((6, 4), 5, 7, (6, 4)),  # one short of that: kept
    ((3, 2**31 - 1), 5, 7, (3, -1)),
    ((0, 0), 40, 17, (0, 0)),
], ids=["int32-max", "just-unbounded", "just-bounded", "right-only", "zero"])
def test_kernel_window_makes_sides_past_the_sequences_unbounded(window, seqlen_q, seqlen_k, kernel_window) -> None:
    """Problem.window is what the kernels take: the same mask, with no side so wide that
    i + seqlen_k - seqlen_q +- side overflows an int. The masks agree for every (i, j)."""
    from cupyflash import reference
    from cupyflash.problem import Problem

    q, k = huge((1, seqlen_q, 1, 8)), huge((1, seqlen_k, 1, 8))
    problem = Problem.from_arrays(q, k, k, window_size=window)
    assert problem.window == kernel_window
    np.testing.assert_array_equal(reference.visible_mask(seqlen_q, seqlen_k, window_size=window),
                                  reference.visible_mask(seqlen_q, seqlen_k, window_size=kernel_window))


# --- where the arrays live, and what the messages tell the caller to do (fakes of CuPy and torch) ---

class FakeGpuArray:
    """Stands in for a cupy.ndarray on GPU device_id: a NumPy array's layout and dtype."""

    __module__ = "cupy"

    def __init__(self, host: np.ndarray, device_id: int = 0) -> None:
        self.shape, self.strides, self.dtype = host.shape, host.strides, host.dtype
        self.ndim, self.size, self.itemsize = host.ndim, host.size, host.itemsize
        self.device = SimpleNamespace(id=device_id)


class FakeTorchTensor:
    """What arrays.py sees of a torch.Tensor: its module, DLPack device and (on the CPU) data."""

    __module__ = "torch"

    def __init__(self, host: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        self.host, self.device = host, device  # (kDLCPU, 0) or (kDLCUDA, id)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.host.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device


FakeTorchTensor.__name__ = FakeTorchTensor.__qualname__ = "Tensor"


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """arrays.py's view of CuPy: FakeGpuArray is its ndarray; a CUDA DLPack object becomes one."""
    from cupyflash import arrays

    fake = SimpleNamespace(ndarray=FakeGpuArray,
                           from_dlpack=lambda obj: FakeGpuArray(obj.host, obj.__dlpack_device__()[1]))
    monkeypatch.setattr(arrays, "cupy_module", lambda: fake)
    monkeypatch.setattr(arrays, "require_cupy", lambda: fake)
    return fake


def on_gpu(array: np.ndarray, device_id: int = 0) -> FakeGpuArray:
    return FakeGpuArray(array, device_id)


def torch_cuda(array: np.ndarray, device_id: int = 0) -> FakeTorchTensor:
    return FakeTorchTensor(array, (2, device_id))


PLACEMENT_CASES = [
    ("host-q-gpu-k", lambda a: {"k": on_gpu(a["k"])}, ValueError,
     "k is on GPU 0 but q is a NumPy (host) array; pass every array as NumPy (results come back as NumPy), or "
     "every array on one GPU (cupy.asarray(q) copies a NumPy array to the current GPU)"),
    ("gpu-q-host-v", lambda a: {"q": on_gpu(a["q"]), "k": on_gpu(a["k"])}, ValueError,
     "v is a NumPy (host) array but q is on GPU 0; pass every array on GPU 0: copy v there with "
     "`with cupy.cuda.Device(0): v = cupy.asarray(v)`"),
    ("cupy-on-two-gpus", lambda a: {name: on_gpu(x, int(name == "v")) for name, x in a.items()}, ValueError,
     "v is on GPU 1 but q is on GPU 0; pass every array on GPU 0: copy v there with "
     "`with cupy.cuda.Device(0): v = cupy.asarray(v)`"),
    ("torch-on-two-gpus", lambda a: {name: torch_cuda(x, int(name == "k")) for name, x in a.items()}, ValueError,
     "k is on GPU 1 but q is on GPU 0; pass every array on GPU 0: k.to(q.device) moves it there"),
    ("torch-cpu-q", lambda a: {"q": FakeTorchTensor(a["q"])}, TypeError,
     "q is a torch CPU tensor; move it to the GPU with q.cuda() (cupyflash runs on CUDA arrays), or pass a NumPy "
     "array (q.numpy()) for NumPy results"),
    ("torch-cpu-v-after-cuda-q",
     lambda a: {"q": torch_cuda(a["q"]), "k": torch_cuda(a["k"]), "v": FakeTorchTensor(a["v"])}, TypeError,
     "v is a torch CPU tensor; move it to the GPU with v.cuda()"),
    ("torch-mps-q", lambda a: {"q": FakeTorchTensor(a["q"], (8, 0))}, TypeError,
     "q is a Tensor in Metal (Apple MPS) memory; cupyflash runs on CUDA GPUs: pass q on a CUDA device"),
    ("torch-cuda-float32", lambda a: {n: torch_cuda(x.astype(np.float32)) for n, x in a.items()}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16 on tensor cores (cast with q.half() or "
     "q.to(torch.bfloat16))"),
    ("cupy-float32", lambda a: {n: on_gpu(x.astype(np.float32)) for n, x in a.items()}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16 on tensor cores (cast with "
     "q.astype(cupy.float16) or q.astype(ml_dtypes.bfloat16))"),
    ("numpy-float64", lambda a: {n: x.astype(np.float64) for n, x in a.items()}, TypeError,
     "q.dtype is float64; cupyflash computes in float16 or bfloat16 on tensor cores (cast with "
     "q.astype(numpy.float16) or q.astype(ml_dtypes.bfloat16))"),
]


@pytest.mark.parametrize("case_id, change, error, text", params(PLACEMENT_CASES))
def test_placement_and_kind_messages(fake_cupy: SimpleNamespace, case_id: str, change: Any, error: type[Exception],
                                     text: str) -> None:
    with raises(error, text):
        call_forward(**change(forward_args()))


def test_backward_dtype_hint_follows_each_array(fake_cupy: SimpleNamespace) -> None:
    """dout from torch: its hint is torch's, though q came from CuPy."""
    args = {name: on_gpu(array) for name, array in backward_args().items()}
    args["dout"] = torch_cuda(backward_args()["dout"].astype(np.float32))
    with raises(TypeError, "dout.dtype is float32 but q.dtype is float16"):
        call_backward(**args)
    all_float32 = {name: torch_cuda(array.astype(np.float32)) for name, array in backward_args().items()}
    with raises(TypeError, "q.dtype is float32; cupyflash computes in float16 or bfloat16 on tensor cores (cast with "
                           "q.half() or q.to(torch.bfloat16))"):
        call_backward(**all_float32)


# --- a GPU older than the kernels need: one line, before anything is compiled ---

OLD_GPUS = [DeviceLimits("Tesla T4", (7, 5), 40, 65536, 65536),
            DeviceLimits("Tesla V100-SXM2-32GB", (7, 0), 80, 98304, 98304)]


@pytest.mark.parametrize("limits", OLD_GPUS, ids=["t4", "v100"])
@pytest.mark.parametrize("function", [call_forward, call_backward], ids=["forward", "backward"])
def test_old_gpu_is_refused_before_any_compile(monkeypatch: pytest.MonkeyPatch, limits: DeviceLimits,
                                               function: Any) -> None:
    from cupyflash import api, build, device

    def compile_kernel(*args: Any) -> None:
        raise AssertionError("NVRTC reached on a GPU the kernels cannot run on")

    monkeypatch.setattr(api, "gpu_count", lambda: 1)
    monkeypatch.setattr(api, "current_device_id", lambda: 0)
    monkeypatch.setattr(device, "device_limits", lambda device_id: limits)
    monkeypatch.setattr(build, "compile_kernel", compile_kernel)
    have = ".".join(map(str, limits.compute_capability))
    with raises(RuntimeError, f"GPU 0 ({limits.name}) has compute capability {have}; cupyflash needs 8.0 or newer "
                              "(Ampere, Ada, Hopper)"):
        function()


def test_supported_gpus_pass_the_capability_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupyflash import device

    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        limits = DeviceLimits("some GPU", capability, 1, 1, 1)
        monkeypatch.setattr(device, "device_limits", lambda device_id: limits)
        assert device.require_supported_gpu(3) is limits


# --- what valid inputs do without a GPU, and options the kernels do not implement yet ---

VALID_OPTIONS = [
    ("defaults", {}),
    ("causal", {"causal": True}),
    ("window", {"window_size": (3, 0)}),
    ("window-zero", {"window_size": [0, 0]}),
    ("window-numpy-ints", {"window_size": np.array([2, -1])}),
    ("scale", {"softmax_scale": 0.1}),
    ("explicit-zero-options", {"softcap": 0.0, "dropout_p": 0.0, "alibi_slopes": None, "seed": 0}),
    ("numpy-seed", {"seed": np.int64(123)}),
    ("return-lse", {"return_lse": True}),
    ("bfloat16", {name: a.astype(BF16) for name, a in forward_args().items()}),
    ("head-dim-1", {"q": randn((B, SQ, HQ, 1)), "k": randn((B, SK, HKV, 1)), "v": randn((B, SK, HKV, 1))}),
    ("head-dim-256", {"q": randn((1, 3, 2, 256)), "k": randn((1, 4, 1, 256)), "v": randn((1, 4, 1, 256))}),
    ("mqa", {"k": randn((B, SK, 1, D)), "v": randn((B, SK, 1, D))}),
    ("empty-seqlen", {"q": randn((B, 0, HQ, D))}),
    ("empty-seqlen-k", {"k": randn((B, 0, HKV, D)), "v": randn((B, 0, HKV, D))}),
    ("empty-batch", {"q": randn((0, SQ, HQ, D)), "k": randn((0, SK, HKV, D)), "v": randn((0, SK, HKV, D))}),
    ("numpy-bool-flags", {"causal": np.True_, "return_lse": np.False_}),
    ("window-int32-max", {"window_size": (2**31 - 1, np.int32(2**31 - 1))}),
    ("window-integral-floats", {"window_size": (3.0, np.float64(-1.0))}),
    ("scale-float32", {"softmax_scale": np.float32(0.125)}),
    ("scale-large", {"softmax_scale": 2e38}),  # times log2(e) still below float32's max
    ("scale-small", {"softmax_scale": 1e-40}),  # a float32 subnormal, nonzero times log2(e)
    ("longest-seqlen", {"q": huge((B, MAX_SEQLEN, HQ, D)), "k": huge((B, MAX_SEQLEN, HKV, D)),
                        "v": huge((B, MAX_SEQLEN, HKV, D))}),
]


@cpu_only
@pytest.mark.parametrize("case_id, changes", params(VALID_OPTIONS))
def test_valid_forward_without_gpu_says_so(case_id: str, changes: dict[str, Any]) -> None:
    with raises(RuntimeError, "cupyflash found no CUDA GPU; cupyflash.reference computes attention on the CPU"):
        call_forward(**changes)


@cpu_only
@pytest.mark.parametrize("deterministic", [False, True])
def test_valid_backward_without_gpu_says_so(deterministic: bool) -> None:
    with raises(RuntimeError, "cupyflash found no CUDA GPU"):
        call_backward(causal=True, deterministic=deterministic)


@cpu_only
def test_host_dlpack_object_is_taken_as_host_input() -> None:
    """A CPU DLPack producer (what a CPU torch tensor looks like) is accepted like NumPy."""

    class HostTensor:
        def __init__(self, array: np.ndarray) -> None:
            self._array = array

        def __dlpack__(self, **kwargs: Any) -> Any:
            return self._array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> tuple[int, int]:
            return self._array.__dlpack_device__()

    args = forward_args()
    with raises(RuntimeError, "cupyflash found no CUDA GPU"):
        cf.attention(HostTensor(args["q"]), HostTensor(args["k"]), HostTensor(args["v"]))


UNIMPLEMENTED = [
    ("softcap", {"softcap": 30.0}, "softcap not yet supported by the GPU kernels"),
    ("alibi-per-head", {"alibi_slopes": np.full(HQ, 0.25, np.float32)}, "alibi_slopes not yet supported"),
    ("alibi-per-batch", {"alibi_slopes": np.full((B, HQ), 0.25, np.float64)}, "alibi_slopes not yet supported"),
    ("dropout", {"dropout_p": 0.1, "seed": 3}, "dropout_p not yet supported"),
    ("all-three", {"softcap": 5.0, "alibi_slopes": np.ones(HQ, np.float32), "dropout_p": 0.5},
     "softcap, alibi_slopes, dropout_p not yet supported by the GPU kernels; cupyflash.reference implements them"),
]


@pytest.mark.parametrize("case_id, changes, text", params(UNIMPLEMENTED))
def test_unimplemented_options_forward(case_id: str, changes: dict[str, Any], text: str) -> None:
    """Raised before the GPU is looked for, so the message is the same on every machine."""
    with raises(NotImplementedError, text):
        call_forward(**changes)


@pytest.mark.parametrize("case_id, changes, text", params(UNIMPLEMENTED))
def test_unimplemented_options_backward(case_id: str, changes: dict[str, Any], text: str) -> None:
    with raises(NotImplementedError, text):
        call_backward(**changes)


def test_input_errors_come_before_unimplemented_options() -> None:
    """A broken input is reported even when an unimplemented option is also asked for."""
    with raises(ValueError, "q must be 4-D"):
        call_forward(q=randn((B, SQ, HQ)), softcap=30.0)
