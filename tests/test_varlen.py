"""Packed variable-length batches on the CPU: every bad argument of attention_varlen and
attention_varlen_backward raises, naming the argument and the rule, before any GPU is looked
for (NumPy inputs); check=True checks the offsets' values; a good call reaches the GPU lookup."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import varlen
from cupyflash.device import gpu_count

HQ, HKV, D = 4, 2, 64
CU_Q, CU_K = np.array([0, 3, 3, 10], np.int32), np.array([0, 5, 6, 6], np.int32)
NO_GPU = "cupyflash found no CUDA GPU"


def arrays(total_q: int = 10, total_k: int = 6, dtype: Any = np.float16) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((total_q, HQ, D)).astype(dtype)
    k, v = (rng.standard_normal((total_k, HKV, D)).astype(dtype) for _ in range(2))
    return {"q": q, "k": k, "v": v, "cu_seqlens_q": CU_Q.copy(), "cu_seqlens_k": CU_K.copy(),
            "max_seqlen_q": 7, "max_seqlen_k": 5}


def call(**changes: Any) -> Any:
    a = {**arrays(), **changes}
    options = {name: a.pop(name) for name in list(a) if name not in (
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")}
    return cf.attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                               a["max_seqlen_k"], **options)


def reaches_the_gpu(**changes: Any) -> None:
    """A good call: on a machine without a GPU it fails only at the GPU lookup."""
    if gpu_count() > 0:
        pytest.skip("on a GPU machine the call runs (tests/test_gpu_varlen.py)")
    with pytest.raises(RuntimeError, match=NO_GPU):
        call(**changes)


BAD = [  # (change, error type, what the message must say)
    ({"q": np.zeros((1, 10, HQ, D), np.float16)}, ValueError, r"q must be 3-D \(total_q, heads, head_dim\)"),
    ({"k": np.zeros((6, HKV), np.float16)}, ValueError, "k must be 3-D"),
    ({"q": np.zeros((10, HQ, D), np.float32)}, TypeError, "q.dtype is float32"),
    ({"v": np.zeros((7, HKV, D), np.float16)}, ValueError, "k.shape .* and v.shape .* differ"),
    ({"k": np.zeros((6, HKV, 32), np.float16), "v": np.zeros((6, HKV, 32), np.float16)}, ValueError,
     r"k.shape\[2\] \(head_dim\) is 32"),
    ({"k": np.zeros((6, 3, D), np.float16), "v": np.zeros((6, 3, D), np.float16)}, ValueError,
     "positive multiple of heads_kv"),
    ({"cu_seqlens_q": CU_Q.astype(np.int64)}, TypeError, "cu_seqlens_q.dtype is int64; it must be int32"),
    ({"cu_seqlens_k": CU_K[None]}, ValueError, "cu_seqlens_k must be 1-D"),
    ({"cu_seqlens_q": np.zeros(0, np.int32)}, ValueError, "cu_seqlens_q is empty"),
    ({"cu_seqlens_k": CU_K[:3]}, ValueError, r"cu_seqlens_k has 3 entries; it must have 4 \(batch \+ 1"),
    ({"cu_seqlens_q": np.arange(8, dtype=np.int32)[::2]}, ValueError, "cu_seqlens_q must be contiguous"),
    ({"seqused_k": np.array([1, 1], np.int32)}, ValueError, r"seqused_k has 2 entries; it must have 3"),
    ({"seqused_k": np.array([1, 1, 1], np.int64)}, TypeError, "seqused_k.dtype is int64"),
    ({"max_seqlen_q": 7.0}, TypeError, "max_seqlen_q must be a Python int"),
    ({"max_seqlen_k": True}, TypeError, "max_seqlen_k must be a Python int"),
    ({"max_seqlen_q": -1}, ValueError, r"max_seqlen_q is -1; it must be in \[0, "),
    ({"window_size": (-2, 0)}, ValueError, "window_size entries must be >= -1"),
    ({"causal": 1}, TypeError, "causal must be True or False"),
    ({"check": "yes"}, TypeError, "check must be True or False"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_a_bad_argument_names_itself_and_the_rule(change: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(**change)


def test_missing_offsets_are_named() -> None:
    with pytest.raises(TypeError, match="cu_seqlens_k is None"):
        call(cu_seqlens_k=None)


BAD_VALUES = [
    ({"cu_seqlens_q": np.array([1, 3, 3, 10], np.int32)}, r"cu_seqlens_q\[0\] is 1; it must be 0"),
    ({"cu_seqlens_k": np.array([0, 5, 4, 6], np.int32)}, r"cu_seqlens_k decreases at entry 2 \(5 then 4\)"),
    ({"cu_seqlens_q": np.array([0, 3, 3, 9], np.int32)}, r"cu_seqlens_q\[-1\] is 9; it must be == 10"),
    ({"cu_seqlens_k": np.array([0, 5, 6, 7], np.int32)}, r"cu_seqlens_k\[-1\] is 7; it must be <= 6"),
    ({"max_seqlen_q": 6}, "max_seqlen_q is 6 but sequence 2 has 7 queries"),
    ({"max_seqlen_k": 4}, "max_seqlen_k is 4 but sequence 0 has 5 keys"),
    ({"seqused_k": np.array([5, 2, 0], np.int32)}, r"seqused_k\[1\] is 2; it must be in \[0, 1\]"),
    ({"seqused_k": np.array([-1, 0, 0], np.int32)}, r"seqused_k\[0\] is -1"),
]


@pytest.mark.parametrize("change,message", BAD_VALUES, ids=[f"value-{i}" for i in range(len(BAD_VALUES))])
def test_check_true_checks_the_offsets_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(check=True, **change)


@pytest.mark.parametrize("change", [c for c, _ in BAD_VALUES], ids=[f"value-{i}" for i in range(len(BAD_VALUES))])
def test_without_check_the_values_are_not_read(change: dict[str, Any]) -> None:
    """The host reads no offset value (no device sync): the same calls reach the GPU lookup."""
    reaches_the_gpu(**change)


def test_good_calls_reach_the_gpu_lookup() -> None:
    reaches_the_gpu()
    reaches_the_gpu(check=True, causal=True, window_size=(2, 0), seqused_k=np.array([4, 1, 0], np.int32))
    reaches_the_gpu(q=arrays(dtype=np.float32)["q"].astype(np.float16)[:, :, :40].copy(),
                    k=arrays()["k"][:, :, :40].copy(), v=arrays()["v"][:, :, :40].copy())  # odd head dim


def test_the_problem_of_a_packed_batch() -> None:
    a = arrays()
    offsets = {name: a[name] for name in ("cu_seqlens_q", "cu_seqlens_k")}
    p = varlen.problem_of(a["q"], a["k"], a["v"], offsets, 7, 5, causal=True, softmax_scale=None,
                          window_size=(100, -1))
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k) == (3, 7, 5, 10, 6)
    assert p.window == (-1, 0), "a side wider than the longest sequence is unbounded; causal is right = 0"
    assert p.variant == (False, True, True) and p.stats_shape == (HQ, 10) and p.query_rows == 10
    big = varlen.problem_of(a["q"], a["k"], a["v"], offsets, 10**6, 10**6, causal=False, softmax_scale=None,
                            window_size=(-1, -1))
    assert (big.seqlen_q, big.seqlen_k) == (10, 6), "no grid longer than the rows there are"


def test_backward_checks_dout_out_and_lse() -> None:
    a = arrays()
    args = (a["q"], a["k"], a["v"])
    lse = np.zeros((HQ, 10), np.float32)
    def backward(dout: Any = None, out: Any = None, lse_: Any = lse) -> Any:
        dout = a["q"] if dout is None else dout
        out = a["q"] if out is None else out
        return cf.attention_varlen_backward(dout, *args, out, lse_, a["cu_seqlens_q"], a["cu_seqlens_k"], 7, 5)
    with pytest.raises(ValueError, match=r"dout.shape is \(10, 4, 32\); it must equal q.shape"):
        backward(dout=a["q"][:, :, :32])
    with pytest.raises(ValueError, match="out must be 3-D"):
        backward(out=a["q"][None])
    with pytest.raises(ValueError, match=r"lse.shape is \(1, 4, 10\); it must be \(heads_q, total_q\)"):
        backward(lse_=lse[None])
    with pytest.raises(TypeError, match="lse.dtype is float16"):
        backward(lse_=lse.astype(np.float16))
    if gpu_count() == 0:
        with pytest.raises(RuntimeError, match=NO_GPU):
            backward()
