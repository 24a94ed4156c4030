"""Every input check of cupyflash.attention / attention_backward, through the public API.

Each case sends valid NumPy inputs with one thing broken and asserts the exception type and a
distinctive part of the message: the argument's name, what it got and the rule. The checks run
before any GPU is touched, so these tests pass the same with and without one. Valid inputs,
on a machine without a GPU, end in the RuntimeError that says so; options the kernels do not
implement yet end in NotImplementedError first, on any machine.
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cupyflash as cf
from cupyflash.device import gpu_count

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
     ValueError, "batch (65536) and heads_q (1) must each be at most 65535"),
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


def test_mixed_placement_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host q with a GPU k: faked here with an object whose CuPy view reports GPU 0."""
    from types import SimpleNamespace

    from cupyflash import arrays

    class GpuTensor:
        """Looks like a GPU array to arrays._wrap; the fake CuPy below does the rest."""

        __cuda_array_interface__ = None

    fake_cupy = SimpleNamespace(ndarray=type(None), asarray=lambda obj: SimpleNamespace(device=SimpleNamespace(id=0)))
    monkeypatch.setattr(arrays, "cupy_module", lambda: fake_cupy)
    monkeypatch.setattr(arrays, "require_cupy", lambda: fake_cupy)
    with raises(ValueError, "k is on GPU 0 but q is a NumPy (host) array; pass every array on the same device"):
        call_forward(k=GpuTensor())


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
