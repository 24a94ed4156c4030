"""attention_with_kvcache on the CPU: every bad argument raises, naming the argument and the
rule, before any GPU is looked for (NumPy inputs); valid NumPy inputs pass every check and end
in the TypeError saying the call works on GPU arrays. Then the decode kernel's host-side
arithmetic: flash_decode.choose_splits, config, kernel_head_dim, blocks_per_sm and
DecodeConfig.smem_bytes (against the DecodeSmem struct of kernels_cu/flash_decode.cu), and
kvcache.split_plan on DecodeProblems built directly, with a fake DeviceLimits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cupyflash as cf
from cupyflash import kvcache
from cupyflash.device import DeviceLimits
from cupyflash.kernels import flash_decode
from cupyflash.kernels.flash_decode import DecodeConfig

BF16 = ml_dtypes.bfloat16
B, SQ, HQ, HKV, D, CAP = 2, 1, 4, 2, 64, 128  # GQA group of 2; contiguous cache of 128 keys per slot
ON_GPU_ONLY = "attention_with_kvcache works on GPU arrays"
CACHES = ("k_cache", "v_cache")
KERNELS_CU = Path(__file__).resolve().parent.parent / "kernels_cu"

# Fakes of DeviceLimits: an H100-like GPU (132 SMs, 227 KB of shared memory per block, 228 KB per
# SM) and one with far too little shared memory for head dim 256.
H100 = DeviceLimits("fake-h100", (9, 0), 132, 232448, 233472)
TINY = DeviceLimits("tiny", (8, 6), 8, 48 * 1024, 64 * 1024)
A100 = DeviceLimits("fake-a100", (8, 0), 108, 166912, 167936)  # no thread-block clusters


# ---------------------------------------------------------------------------------------------
# Inputs

def placed(shape: tuple[int, ...], dtype: Any = np.float16, misalign: int = 0, seed: int = 0) -> np.ndarray:
    """A C-contiguous array of signed normal values whose data pointer is `misalign` bytes past a
    16-byte boundary (0: aligned), whatever alignment NumPy's allocator happens to give."""
    itemsize = np.dtype(dtype).itemsize
    count = math.prod(shape)
    buffer = np.random.default_rng(seed).standard_normal(count + 64).astype(dtype)
    start = next(i for i in range(64) if (buffer.ctypes.data + i * itemsize) % 16 == misalign)
    array = buffer[start:start + count].reshape(shape)
    assert array.ctypes.data % 16 == misalign  # the helper's own promise, not a check under test
    return array


def strided(shape: tuple[int, ...], dtype: Any = np.float16) -> np.ndarray:
    """An array of `shape` whose last dimension has a stride of 2 elements."""
    return placed(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]


def huge(shape: tuple[int, ...], dtype: Any = np.float16) -> np.ndarray:
    """An array of any shape over one aligned row (zero strides but the contiguous last one):
    the checks read only shapes and strides."""
    row = placed((shape[-1],), dtype)
    return np.lib.stride_tricks.as_strided(row, shape, (0,) * (len(shape) - 1) + (row.itemsize,))


def cache(shape: tuple[int, ...] = (B, CAP, HKV, D), dtype: Any = np.float16) -> dict[str, np.ndarray]:
    return {"k_cache": placed(shape, dtype, seed=1), "v_cache": placed(shape, dtype, seed=2)}


def paged(num_pages: int = 6, page_size: int = 16, max_pages: int = 4) -> dict[str, np.ndarray]:
    """A paged cache of num_pages pages and a block table of B rows (capacity max_pages * page_size)."""
    table = np.arange(B * max_pages, dtype=np.int32).reshape(B, max_pages) % num_pages
    return {**cache((num_pages, page_size, HKV, D)), "block_table": table}


def new_keys(seqlen_new: int = 3, dtype: Any = np.float16, heads: int = HKV, head_dim: int = D) -> dict[str, Any]:
    shape = (B, seqlen_new, heads, head_dim)
    return {"k": placed(shape, dtype, seed=3), "v": placed(shape, dtype, seed=4)}


def with_head_dim(head_dim: int) -> dict[str, Any]:
    return {"q": placed((B, SQ, HQ, head_dim)), **cache((B, CAP, HKV, head_dim))}


def call(**changes: Any) -> Any:
    """cupyflash.attention_with_kvcache on valid NumPy inputs with some arguments replaced or added."""
    args = {"q": placed((B, SQ, HQ, D)), **cache(), "k": None, "v": None, "cache_seqlens": 5, **changes}
    tensors = [args.pop(name) for name in ("q", "k_cache", "v_cache", "k", "v")]
    return cf.attention_with_kvcache(*tensors, **args)


def raises(error: type[Exception], text: str) -> Any:
    """pytest.raises matching `text` literally."""
    return pytest.raises(error, match=re.escape(text))


# ---------------------------------------------------------------------------------------------
# Bad inputs: (id, replaced arguments, exception, literal part of the message)

ARRAY_CASES = [
    ("q-3d", {"q": placed((B, HQ, D))}, ValueError,
     "q must be 4-D (batch, seqlen_q, heads_q, head_dim); got shape (2, 4, 64)"),
    ("k-cache-3d", {"k_cache": placed((B, CAP, D)), "v_cache": placed((B, CAP, D))}, ValueError,
     "k_cache must be 4-D: (batch_cache, seqlen_cache, heads_kv, head_dim), or (num_pages, page_size, heads_kv, "
     "head_dim) with block_table; got shape (2, 128, 64)"),
    ("v-cache-5d", {"v_cache": placed((B, CAP, HKV, D, 1))}, ValueError, "v_cache must be 4-D"),
    ("q-float32", {"q": placed((B, SQ, HQ, D), np.float32)}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16 on tensor cores "
     "(cast with q.astype(numpy.float16) or q.astype(ml_dtypes.bfloat16))"),
    ("q-float64", {"q": placed((B, SQ, HQ, D), np.float64)}, TypeError, "q.dtype is float64; cupyflash computes in"),
    ("k-cache-bf16-q-fp16", {"k_cache": placed((B, CAP, HKV, D), BF16)}, TypeError,
     "k_cache.dtype is bfloat16 but q.dtype is float16; q, k, v (and dout, out) must share a dtype"),
    ("v-cache-fp16-q-bf16", {"q": placed((B, SQ, HQ, D), BF16), "k_cache": placed((B, CAP, HKV, D), BF16)},
     TypeError, "v_cache.dtype is float16 but q.dtype is bfloat16"),
    ("cache-float32-like-q", {"q": placed((B, SQ, HQ, D), np.float32), **cache(dtype=np.float32)}, TypeError,
     "q.dtype is float32; cupyflash computes in float16 or bfloat16"),
    ("cache-shapes-differ", {"v_cache": placed((B, CAP // 2, HKV, D))}, ValueError,
     "k_cache (shape (2, 128, 2, 64), strides (32768, 256, 128, 2)) and v_cache (shape (2, 64, 2, 64), strides "
     "(16384, 256, 128, 2)) must have the same shape and strides"),
    ("cache-strides-differ-transposed",
     {"k_cache": placed((B, HKV, CAP, D)).transpose(0, 2, 1, 3)}, ValueError,
     "k_cache (shape (2, 128, 2, 64), strides (32768, 128, 16384, 2)) and v_cache (shape (2, 128, 2, 64), strides "
     "(32768, 256, 128, 2)) must have the same shape and strides: the kernels find a key's value where they find "
     "the key"),
    ("cache-strides-differ-sliced", {"v_cache": placed((B, 2 * CAP, HKV, D))[:, :CAP]}, ValueError,
     "v_cache (shape (2, 128, 2, 64), strides (65536, 256, 128, 2)) must have the same shape and strides"),
    ("head-dim-differs", cache((B, CAP, HKV, 32)), ValueError,
     "k_cache's head_dim is 32 but q's is 64; they must be equal"),
    ("head-dim-36", with_head_dim(36), ValueError,
     "head_dim is 36; with a KV cache it must be a multiple of 8 from 8 to 256 (the cache is used in place, so it "
     "cannot be padded)"),
    ("head-dim-4", with_head_dim(4), ValueError, "head_dim is 4; with a KV cache it must be a multiple of 8"),
    ("head-dim-264", with_head_dim(264), ValueError,
     "head_dim is 264; with a KV cache it must be a multiple of 8 from 8 to 256"),
    ("q-last-dim-strided", {"q": strided((B, SQ, HQ, D))}, ValueError,
     "q's last dimension (head_dim) must be contiguous; its stride is 2 elements (pass a copy, e.g. q.copy())"),
    ("k-cache-last-dim-strided", {"k_cache": strided((B, CAP, HKV, D)), "v_cache": strided((B, CAP, HKV, D))},
     ValueError, "k_cache's last dimension (head_dim) must be contiguous; its stride is 2 elements"),
    ("v-cache-last-dim-strided", {"v_cache": strided((B, CAP, HKV, D))}, ValueError,
     "v_cache's last dimension (head_dim) must be contiguous"),
    ("cache-head-stride-not-chunks",
     {name: placed((B, CAP, HKV, D + 4))[..., :D] for name in CACHES}, ValueError,
     "k_cache must be 16-byte aligned with strides of whole 8-element chunks (its rows are copied 16 bytes at a "
     "time, in place)"),
    ("heads-not-multiple", cache((B, CAP, 3, D)), ValueError,
     "q has 4 heads and the cache 3; heads_q must be a positive multiple of heads_kv"),
    ("heads-kv-zero", cache((B, CAP, 0, D)), ValueError,
     "q has 4 heads and the cache 0; heads_q must be a positive multiple of heads_kv"),
    ("batch-above-grid", {"q": huge((65536, 1, 1, 8)), "k_cache": huge((65536, 1, 1, 8)),
                          "v_cache": huge((65536, 1, 1, 8))}, ValueError,
     "batch (65536) and heads_kv (1) must each be at most 65535 (CUDA grid dimensions)"),
    ("capacity-above-int32-half", {"q": huge((1, 1, 1, 8)), "k_cache": huge((1, 2**30, 1, 8)),
                                   "v_cache": huge((1, 2**30, 1, 8))}, ValueError,
     "one sequence's cache holds 1073741824 keys; at most 1073741823 are supported"),
]

CONTIGUOUS_CACHE_CASES = [
    ("batch-mismatch", cache((B + 1, CAP, HKV, D)), ValueError,
     "k_cache.shape[0] is 3 but q's batch is 2; without cache_batch_idx sequence b uses cache slot b, so they must "
     "be equal"),
    ("slots-wrong-shape", {"cache_batch_idx": np.arange(B + 1, dtype=np.int32)}, ValueError,
     "cache_batch_idx.shape is (3,); it must be (2,) (the cache slot of each sequence)"),
    ("slots-2d", {"cache_batch_idx": np.arange(B, dtype=np.int32)[None]}, ValueError,
     "cache_batch_idx.shape is (1, 2); it must be (2,)"),
    ("slots-int64", {"cache_batch_idx": np.arange(B, dtype=np.int64)}, TypeError,
     "cache_batch_idx.dtype is int64; cache_batch_idx must be int32 (the cache slot of each sequence)"),
    ("slots-strided", {"cache_batch_idx": np.arange(2 * B, dtype=np.int32)[::2]}, ValueError,
     "cache_batch_idx's last dimension must be contiguous (it is read in place, never copied); pass "
     "cache_batch_idx.copy()"),
    ("slots-into-empty-cache", {**cache((0, CAP, HKV, D)), "cache_batch_idx": np.zeros(B, np.int32)}, ValueError,
     "k_cache has no slots (shape[0] is 0) but cache_batch_idx picks some"),
]

PAGED_CASES = [
    ("table-int64", {**paged(), "block_table": paged()["block_table"].astype(np.int64)}, TypeError,
     "block_table.dtype is int64; block_table must be int32 (page indices)"),
    ("table-1d", {**paged(), "block_table": np.zeros(B, np.int32)}, ValueError,
     "block_table.shape is (2,); it must be (batch, max_pages) with batch = 2"),
    ("table-3d", {**paged(), "block_table": np.zeros((B, 4, 1), np.int32)}, ValueError,
     "block_table.shape is (2, 4, 1); it must be (batch, max_pages) with batch = 2"),
    ("table-wrong-batch", {**paged(), "block_table": np.zeros((B + 1, 4), np.int32)}, ValueError,
     "block_table.shape is (3, 4); it must be (batch, max_pages) with batch = 2"),
    ("table-strided", {**paged(), "block_table": np.zeros((B, 8), np.int32)[:, ::2]}, ValueError,
     "block_table's last dimension must be contiguous (it is read in place, never copied); pass block_table.copy()"),
    ("table-with-slots", {**paged(), "cache_batch_idx": np.arange(B, dtype=np.int32)}, ValueError,
     "cache_batch_idx cannot be combined with block_table"),
    ("page-size-zero", {**paged(), **cache((6, 0, HKV, D))}, ValueError,
     "k_cache.shape[1] (page_size) is 0; pages hold at least one key"),
]

SEQLENS_CASES = [
    ("seqlens-none", {"cache_seqlens": None}, TypeError,
     "cache_seqlens is None; give the keys already in the cache per sequence, as an int32 array (batch,) on the GPU "
     "or a Python int for all"),
    ("seqlens-negative", {"cache_seqlens": -1}, ValueError,
     "cache_seqlens is -1; it must be from 0 to the cache's 128 keys less the 0 new ones"),
    ("seqlens-above-capacity", {"cache_seqlens": CAP + 1}, ValueError,
     "cache_seqlens is 129; it must be from 0 to the cache's 128 keys less the 0 new ones"),
    ("seqlens-no-room-for-new", {"cache_seqlens": CAP - 2, **new_keys(3)}, ValueError,
     "cache_seqlens is 126; it must be from 0 to the cache's 128 keys less the 3 new ones"),
    ("seqlens-numpy-int-above", {"cache_seqlens": np.int64(CAP + 5)}, ValueError, "cache_seqlens is 133; it must be"),
    ("seqlens-paged-above-capacity", {**paged(), "cache_seqlens": 65}, ValueError,
     "cache_seqlens is 65; it must be from 0 to the cache's 64 keys less the 0 new ones"),
    ("seqlens-int64", {"cache_seqlens": np.zeros(B, np.int64)}, TypeError,
     "cache_seqlens.dtype is int64; cache_seqlens must be int32 (keys in each sequence's cache)"),
    ("seqlens-wrong-shape", {"cache_seqlens": np.zeros(B + 1, np.int32)}, ValueError,
     "cache_seqlens.shape is (3,); it must be (2,) (keys in each sequence's cache)"),
    ("seqlens-2d", {"cache_seqlens": np.zeros((B, 1), np.int32)}, ValueError,
     "cache_seqlens.shape is (2, 1); it must be (2,)"),
    ("seqlens-strided", {"cache_seqlens": np.zeros(2 * B, np.int32)[::2]}, ValueError,
     "cache_seqlens's last dimension must be contiguous (it is read in place, never copied); pass "
     "cache_seqlens.copy()"),
    ("seqlens-float", {"cache_seqlens": 5.0}, TypeError, "cache_seqlens must be a CuPy or NumPy array"),
]

NEW_KEYS_CASES = [
    ("k-without-v", {"k": new_keys()["k"]}, ValueError,
     "k and v are the new keys and values: give both or neither"),
    ("v-without-k", {"v": new_keys()["v"]}, ValueError, "k and v are the new keys and values: give both or neither"),
    ("k-wrong-heads", {**new_keys(), "k": new_keys(heads=3)["k"]}, ValueError,
     "k.shape is (2, 3, 3, 64); new keys and values must be (batch, seqlen_new, heads_kv, head_dim) = "
     "(2, None, 2, 64)"),
    ("v-wrong-head-dim", {**new_keys(), "v": new_keys(head_dim=32)["v"]}, ValueError,
     "v.shape is (2, 3, 2, 32); new keys and values must be (batch, seqlen_new, heads_kv, head_dim)"),
    ("k-wrong-batch", {"k": placed((B + 1, 3, HKV, D)), "v": placed((B + 1, 3, HKV, D))}, ValueError,
     "k.shape is (3, 3, 2, 64); new keys and values must be"),
    ("k-3d", {"k": placed((B, 3, HKV * D)), "v": placed((B, 3, HKV * D))}, ValueError,
     "k.shape is (2, 3, 128); new keys and values must be"),
    ("k-v-seqlen-differ", {**new_keys(3), "v": new_keys(4)["v"]}, ValueError,
     "k has 3 new keys but v 4 values; they must match"),
    ("k-bf16-q-fp16", {**new_keys(), "k": new_keys(dtype=BF16)["k"]}, TypeError,
     "k.dtype is bfloat16 but q.dtype is float16"),
    ("v-float32", {**new_keys(), "v": new_keys(dtype=np.float32)["v"]}, TypeError,
     "v.dtype is float32 but q.dtype is float16"),
    ("k-last-dim-strided", {"k": strided((B, 3, HKV, D)), "v": strided((B, 3, HKV, D))}, ValueError,
     "k's last dimension (head_dim) must be contiguous"),
    ("new-longer-than-cache", {**new_keys(CAP + 1), "cache_seqlens": 0}, ValueError,
     "k has 129 new keys per sequence but a sequence's cache holds 128"),
]

SPLIT_CASES = [
    ("num-splits-negative", {"num_splits": -1}, ValueError,
     "num_splits is -1; it must be 0 (choose), 1 (no split) or a split count up to 256"),
    ("num-splits-257", {"num_splits": 257}, ValueError, "num_splits is 257; it must be 0 (choose), 1 (no split) or"),
    ("num-splits-float", {"num_splits": 2.0}, TypeError,
     "num_splits must be an int (0 (choose), 1 (no split) or a split count up to 256); got float 2.0"),
    ("num-splits-bool", {"num_splits": True}, TypeError, "num_splits must be an int (0 (choose)"),
    ("num-splits-none", {"num_splits": None}, TypeError, "num_splits must be an int"),
    ("split-size-100", {"split_size": 100}, ValueError,
     "split_size is 100; it must be a multiple of 64, the decode kernel's key tile"),
    ("split-size-32", {"split_size": 32}, ValueError, "split_size is 32; it must be a multiple of 64"),
    ("split-size-zero", {"split_size": 0}, ValueError, "split_size is 0; it must be a positive int"),
    ("split-size-negative", {"split_size": -64}, ValueError, "split_size is -64; it must be a positive int"),
    ("split-size-float", {"split_size": 128.0}, TypeError, "split_size must be an int (a positive int); got float"),
    ("split-size-bool", {"split_size": True}, TypeError, "split_size must be an int"),
    ("split-size-with-num-splits", {"split_size": 128, "num_splits": 2}, ValueError,
     "num_splits and split_size both given; split_size fixes the keys per split, and so the split count: leave "
     "num_splits at 0"),
]

OPTION_CASES = [
    ("causal-int", {"causal": 1}, TypeError, "causal must be True or False (a bool); got int 1"),
    ("causal-none", {"causal": None}, TypeError, "causal must be True or False"),
    ("return-lse-str", {"return_lse": "yes"}, TypeError, "return_lse must be True or False (a bool); got str 'yes'"),
    ("check-int", {"check": 0}, TypeError, "check must be True or False"),
    ("window-one-entry", {"window_size": (4,)}, ValueError,
     "window_size must be a pair of integers (left, right); got (4,)"),
    ("window-three-entries", {"window_size": (1, 2, 3)}, ValueError, "window_size must be a pair of integers"),
    ("window-fraction", {"window_size": (1.5, 2)}, ValueError, "window_size must be a pair of integers"),
    ("window-none", {"window_size": None}, ValueError,
     "window_size must be a pair of integers (left, right); got None"),
    ("window-below-minus-one", {"window_size": (-2, 0)}, ValueError,
     "window_size entries must be >= -1 (-1 means unbounded); got (-2, 0)"),
    ("window-above-int32", {"window_size": (2**31, 0)}, ValueError, "window_size entries must be at most 2147483647"),
    ("scale-zero", {"softmax_scale": 0.0}, ValueError, "softmax_scale must be positive; got 0.0"),
    ("scale-nan", {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be in [0.0, inf); got nan"),
    ("scale-negative", {"softmax_scale": -0.125}, ValueError, "softmax_scale must be in [0.0, inf); got -0.125"),
    ("scale-inf", {"softmax_scale": math.inf}, ValueError, "softmax_scale must be in [0.0, inf); got inf"),
    ("scale-underflows-float32", {"softmax_scale": 1e-50}, ValueError,
     "softmax_scale is 1e-50; the kernels use softmax_scale and softmax_scale * log2(e) as float32"),
    ("scale-text", {"softmax_scale": "big"}, TypeError, "softmax_scale must be a number; got 'big'"),
]

BAD = ARRAY_CASES + CONTIGUOUS_CACHE_CASES + PAGED_CASES + SEQLENS_CASES + NEW_KEYS_CASES + SPLIT_CASES + OPTION_CASES


@pytest.mark.parametrize("change,error,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_argument_names_itself_and_the_rule(change: dict[str, Any], error: type[Exception],
                                                   message: str) -> None:
    with raises(error, message):
        call(**change)


def test_the_case_ids_are_unique() -> None:
    ids = [c[0] for c in BAD]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Alignment of the cache, which is used in place (q, k and v are copied when they need it)

@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
@pytest.mark.parametrize("misalign", [2, 8])
def test_a_misaligned_cache_is_refused_by_name(name: str, misalign: int) -> None:
    bad = placed((B, CAP, HKV, D), misalign=misalign)
    with raises(ValueError, f"{name} must be 16-byte aligned with strides of whole 8-element chunks"):
        call(**{name: bad})


def test_a_cache_offset_by_one_element_is_refused() -> None:
    aligned = placed((B * CAP * HKV * D + 8,))
    shifted = aligned[1:1 + B * CAP * HKV * D].reshape(B, CAP, HKV, D)  # 2 bytes past the boundary
    assert shifted.ctypes.data % 16 == 2
    with raises(ValueError, "k_cache must be 16-byte aligned"):
        call(k_cache=shifted)


def test_misaligned_q_and_new_keys_are_accepted() -> None:
    """q, k and v are copied to an aligned buffer when they need it, so only the GPU is missing."""
    shape = (B, 3, HKV, D)
    with raises(TypeError, ON_GPU_ONLY):
        call(q=placed((B, SQ, HQ, D), misalign=2), k=placed(shape, misalign=2), v=placed(shape, misalign=4))


# ---------------------------------------------------------------------------------------------
# Valid NumPy inputs pass every check; only then does the call say it needs GPU arrays

# bfloat16 NumPy caches among them: their pointer is read through array.ctypes (array.data, a
# buffer, cannot hold ml_dtypes' bfloat16; a bug until 2026-12-04).

GOOD = [
    pytest.param({}, id="contiguous-int-length"),
    pytest.param({"q": placed((B, SQ, HQ, D), BF16), **cache(dtype=BF16)}, id="bfloat16"),
    pytest.param({"q": placed((B, SQ, HQ, D), BF16), **cache(dtype=BF16), **new_keys(dtype=BF16)},
                 id="bfloat16-with-new-keys"),
    pytest.param(with_head_dim(40), id="head-dim-40"),
    pytest.param(with_head_dim(8), id="head-dim-8"),
    pytest.param(with_head_dim(256), id="head-dim-256"),
    pytest.param({"q": placed((B, 3, 8, D)), **cache((B, CAP, 1, D))}, id="mqa"),
    pytest.param({"cache_seqlens": np.array([0, CAP], np.int32)}, id="seqlens-array"),
    pytest.param({"cache_seqlens": np.int32(7)}, id="seqlens-numpy-int"),
    pytest.param({"cache_seqlens": 0}, id="seqlens-zero"),
    pytest.param({"cache_seqlens": CAP}, id="seqlens-full-cache"),
    pytest.param({"cache_seqlens": CAP - 3, **new_keys(3)}, id="seqlens-fill-with-new"),
    pytest.param({"cache_seqlens": 0, **new_keys(CAP)}, id="new-keys-fill-cache"),
    pytest.param({**new_keys(0)}, id="no-new-keys-given-as-empty"),
    pytest.param({**cache((B + 3, CAP, HKV, D)), "cache_batch_idx": np.array([4, 1], np.int32)}, id="slots"),
    pytest.param(paged(), id="paged"),
    pytest.param({**paged(num_pages=200, page_size=1, max_pages=100), "cache_seqlens": 90, **new_keys(10)},
                 id="paged-page-size-1"),
    pytest.param({**paged(), "cache_seqlens": np.array([64, 3], np.int32)}, id="paged-seqlens-array"),
    pytest.param({name: placed((B, CAP, HKV, D + 8))[..., :D] for name in CACHES}, id="sliced-head-dim"),
    pytest.param({name: placed((B + 2, CAP, HKV, D))[1:B + 1] for name in CACHES}, id="sliced-slots"),
    pytest.param({"num_splits": 256}, id="num-splits-256"),
    pytest.param({"num_splits": np.int64(3)}, id="num-splits-numpy"),
    pytest.param({"split_size": 192}, id="split-size"),
    pytest.param({"causal": False, "window_size": (16, 0), "softmax_scale": 0.5}, id="window-and-scale"),
    pytest.param({"window_size": (16.0, -1.0)}, id="window-float-entries"),
    pytest.param({"return_lse": True, "check": True, "causal": np.bool_(False)}, id="flags"),
]


@pytest.mark.parametrize("change", GOOD)
def test_valid_numpy_inputs_pass_the_checks_then_need_the_gpu(change: dict[str, Any]) -> None:
    with raises(TypeError, ON_GPU_ONLY + ": it writes new keys into the cache in place, so q, the cache and the "
                "index arrays must all be on one GPU (cupy.asarray copies a NumPy array there)"):
        call(**change)


# ---------------------------------------------------------------------------------------------
# Bugs the first version of this file found (fixed 2026-12-04): a bool cache_seqlens, a paged cache
# of no pages (the kernels' page clamp would have reached -1), no blocks at all (seqlen_q = 0).

def test_a_bool_cache_seqlens_is_a_type_error() -> None:
    with raises(TypeError, "cache_seqlens"):
        call(cache_seqlens=True)


def test_a_paged_cache_without_pages_is_refused() -> None:
    with pytest.raises(ValueError, match="k_cache"):
        call(**{**paged(), **cache((0, 16, HKV, D))}, **new_keys(1), cache_seqlens=3)


def test_choose_splits_with_no_blocks_keeps_one_split() -> None:
    assert flash_decode.choose_splits(0, 10, 264) == 1


# ---------------------------------------------------------------------------------------------
# flash_decode.choose_splits

def test_blocks_that_nearly_fill_the_gpu_keep_one_split() -> None:
    assert flash_decode.choose_splits(80, 100, 100) == 1  # 80 >= 0.8 * 100
    assert flash_decode.choose_splits(1000, 512, 100) == 1
    # 79 blocks: 1 to 4 splits leave a last wave 79% full; 5 splits give 3.95 waves (99%).
    assert flash_decode.choose_splits(79, 100, 100) == 5


def test_one_key_tile_keeps_one_split() -> None:
    assert flash_decode.choose_splits(1, 1, 264) == 1
    assert flash_decode.choose_splits(1, 0, 264) == 1


def test_a_single_long_sequence_takes_many_splits() -> None:
    # 1 block, 264 slots, 512 key tiles: at least 4 tiles per split caps the count at 128, whose
    # 48% of one wave is the best; of the counts that change the tiles per split, the next below
    # is 103 (5 tiles, 39%), under 85% of it.
    assert flash_decode.choose_splits(1, 512, 264) == 128
    # 4096 tiles: up to the 256 splits flash_decode_combine merges (97% of the wave); 85% of that
    # needs 218, and the first count from there that changes the tiles per split is 228 (18 each).
    assert flash_decode.choose_splits(1, 4096, 264) == 228
    # Capped at 32 the best is 32; 85% of it is 27.2, and 28 (19 tiles per split, as 27) is
    # skipped, so 29 (18 tiles per split) is taken.
    assert flash_decode.choose_splits(1, 512, 264, max_splits=32) == 29


def test_150_blocks_on_264_slots_take_3_splits() -> None:
    # 450 blocks fill 1.70 waves: the last is 85.2% full, within 85% of any best (at most 100%);
    # 1 and 2 splits leave it 56.8% full.
    assert flash_decode.choose_splits(150, 512, 264) == 3


@pytest.mark.parametrize("blocks", [1, 3, 17, 100])
@pytest.mark.parametrize("key_tiles", [2, 3, 7, 10, 64, 1000])
@pytest.mark.parametrize("slots", [4, 50, 264])
@pytest.mark.parametrize("max_splits", [1, 16, 128])
def test_splits_never_exceed_key_tiles_slots_or_max_splits(blocks: int, key_tiles: int, slots: int,
                                                             max_splits: int) -> None:
    splits = flash_decode.choose_splits(blocks, key_tiles, slots, max_splits)
    assert 1 <= splits <= min(key_tiles, max_splits, max(1, slots))
    if splits > 1:  # a count is taken only if it changes the tiles per split
        assert math.ceil(key_tiles / splits) < math.ceil(key_tiles / (splits - 1))


@pytest.mark.parametrize("key_tiles,expected", [(40, 10), (44, 11)])
def test_split_counts_with_the_same_tiles_per_split_are_skipped(key_tiles: int, expected: int) -> None:
    # 1 block on 1000 slots: efficiency is splits / 1000, and at least 4 tiles per split cap the
    # count at key_tiles // 4 (10, 11). The smallest count within 85% of the best would be 9 (10),
    # but 40 tiles in 9 splits are 5 per split as in 8, and 44 in 10 are 5 as in 9: skipped.
    assert flash_decode.choose_splits(1, key_tiles, 1000) == expected


def test_a_split_keeps_at_least_four_tiles() -> None:
    assert flash_decode.MIN_TILES_PER_SPLIT == 4
    assert flash_decode.choose_splits(8, 64, 264) == 16  # batch 1, 8 kv heads, 4k keys: not 32
    assert flash_decode.choose_splits(1, 7, 1000) == 1  # under 8 tiles, splitting would leave fewer than 4
    assert flash_decode.choose_splits(1, 8, 1000) == 2


# ---------------------------------------------------------------------------------------------
# flash_decode.one_block_per_sm_splits

@pytest.mark.parametrize("blocks,key_tiles,expected", [
    (16, 512, 8),    # batch 16 x 1 kv head, 32k keys: 128 blocks on 132 SMs
    (16, 64, 8),     # 4k keys: 8 tiles per split
    (8, 512, 16),    # batch 1 x 8 kv heads
    (64, 512, 2),    # batch 64 x 1 kv head
    (1, 512, 128),   # one sequence: 4 tiles per split at least caps it at 128 (97% of the SMs)
    (1, 2048, 132),  # 128k keys: one per SM
])
def test_one_block_per_sm_takes_the_most_splits_that_fit(blocks: int, key_tiles: int, expected: int) -> None:
    splits = flash_decode.one_block_per_sm_splits(blocks, key_tiles, 132)
    assert splits == expected and blocks * splits <= 132


@pytest.mark.parametrize("blocks,key_tiles", [
    (0, 512),    # nothing to run
    (67, 512),   # 2 splits would be 134 blocks: more than one per SM
    (132, 512),  # already full
    (50, 512),   # 2 splits fill 100 of 132 SMs, under 85%
    (1, 64),     # 4k keys, one sequence: 16 splits fill 12% of the SMs
    (16, 7),     # under 8 tiles: no split keeps 4
])
def test_one_block_per_sm_declines_where_it_would_not_fill_the_gpu(blocks: int, key_tiles: int) -> None:
    assert flash_decode.one_block_per_sm_splits(blocks, key_tiles, 132) == 0


def test_the_heuristic_gives_one_kv_head_at_batch_16_one_block_per_sm(fake_h100: list[int]) -> None:
    # 16 blocks, 32k keys: 8 splits (128 blocks, one per SM), merged by the combine (a cluster of
    # 8 is only for a quarter of the slots), where the count over 264 slots was 14.
    problem = decode_problem(batch=16)
    cfg = flash_decode.config(problem.packed_rows, problem.head_dim, H100)
    assert kvcache.split_plan(problem, cfg, 0) == (8, 0)
    assert flash_decode.choose_splits(16, 512, 264) == 14
    assert flash_decode.cluster_size(8, 16, 264, H100) == 0


# ---------------------------------------------------------------------------------------------
# flash_decode.kernel_head_dim, config, blocks_per_sm

@pytest.mark.parametrize("head_dim,expected", [(8, 64), (40, 64), (64, 64), (72, 96), (96, 96), (104, 128),
                                               (128, 128), (136, 192), (192, 192), (200, 256), (256, 256)])
def test_kernel_head_dim_is_the_smallest_compiled_one_that_holds_it(head_dim: int, expected: int) -> None:
    assert flash_decode.kernel_head_dim(head_dim) == expected


def test_every_supported_head_dim_has_a_kernel_head_dim() -> None:
    compiled = (64, 96, 128, 192, 256)
    for head_dim in range(8, 257, 8):
        assert flash_decode.kernel_head_dim(head_dim) == min(d for d in compiled if d >= head_dim), head_dim


@pytest.mark.parametrize("packed_rows,row_warps", [(1, 1), (8, 1), (16, 1), (17, 2), (32, 2), (33, 4), (64, 4),
                                                   (1000, 4)])
@pytest.mark.parametrize("head_dim", [40, 64, 128, 192])
def test_config_takes_as_few_row_warps_as_hold_the_packed_rows(packed_rows: int, row_warps: int,
                                                              head_dim: int) -> None:
    cfg = flash_decode.config(packed_rows, head_dim, H100)
    assert cfg is not None and cfg.row_warps == row_warps
    assert cfg.block_m == 16 * row_warps and cfg.key_warps == 4 // row_warps


@pytest.mark.parametrize("packed_rows", [1, 16, 17, 33, 64, 256])
@pytest.mark.parametrize("head_dim", [200, 256])
def test_config_keeps_one_row_warp_for_head_dim_256(packed_rows: int, head_dim: int) -> None:
    assert flash_decode.config(packed_rows, head_dim, H100) == DecodeConfig(1, 2)


@pytest.mark.parametrize("packed_rows,head_dim,expected", [
    (8, 64, DecodeConfig(1, 3)), (8, 128, DecodeConfig(1, 3)), (24, 128, DecodeConfig(2, 3)),
    (64, 128, DecodeConfig(4, 2)), (8, 192, DecodeConfig(1, 2)), (64, 192, DecodeConfig(4, 2))])
def test_config_takes_3_stages_up_to_head_dim_128_under_4_row_warps(packed_rows: int, head_dim: int,
                                                                   expected: DecodeConfig) -> None:
    assert flash_decode.config(packed_rows, head_dim, H100) == expected


def test_config_is_none_when_no_block_fits_the_shared_memory() -> None:
    # Head dim 256 with 2 stages needs 143,616 bytes; TINY allows 49,152 per block.
    assert flash_decode.config(1, 256, TINY) is None
    assert flash_decode.config(64, 192, TINY) is None


def test_config_falls_back_to_2_stages_when_3_do_not_fit() -> None:
    # Head dim 64, one row warp: 57,600 bytes with 3 stages, 39,168 with 2; TINY allows 49,152.
    assert flash_decode.config(1, 64, TINY) == DecodeConfig(1, 2)
    assert flash_decode.config(1, 64, dataclasses.replace(TINY, smem_per_block_optin=57600)) == DecodeConfig(1, 3)
    assert flash_decode.config(1, 64, dataclasses.replace(TINY, smem_per_block_optin=39167)) is None


def test_blocks_per_sm_by_shared_memory_with_1kb_reserved() -> None:
    cfg = DecodeConfig(1, 3)  # 108,800 bytes at head dim 128
    assert flash_decode.blocks_per_sm(cfg, 128, H100) == 2  # 233,472 // 109,824
    assert flash_decode.blocks_per_sm(cfg, 128, dataclasses.replace(H100, smem_per_sm=2 * 109824 - 1)) == 1
    assert flash_decode.blocks_per_sm(cfg, 128, dataclasses.replace(H100, smem_per_sm=1000)) == 1  # at least 1
    assert flash_decode.blocks_per_sm(cfg, 128, dataclasses.replace(H100, smem_per_sm=10**7)) == 8  # at most 8


# ---------------------------------------------------------------------------------------------
# DecodeConfig.smem_bytes against the DecodeSmem struct of kernels_cu/flash_decode.cu

# The struct's fields as (type, name, dimensions), in order, and the part of the struct each is
# in: "q" before the union, then the union's "tiles" struct and DecodeMerge (the cp.async layout;
# the bulk-copy one, under CF_KV_TMA, is checked by its static_assert when test_build compiles it).
DECODE_SMEM_FIELDS = [
    ("q", "u16", "q", ("kBlockM", "kStride")),
    ("tiles", "u16", "k", ("kStages", "kBlockN", "kStride")),
    ("tiles", "u16", "v", ("kStages", "kBlockN", "kStride")),
    ("merge", "float", "max_log2", ("kKeyWarps", "kBlockM")),
    ("merge", "float", "sum", ("kKeyWarps", "kBlockM")),
    ("merge", "float", "weight", ("kKeyWarps", "kBlockM")),
    ("merge", "float", "lse", ("kBlockM",)),
    ("merge", "float", "o", ("kKeyWarps", "kBlockM", "kHeadDim")),
]
TYPE_BYTES = {"u16": 2, "float": 4}


def test_the_smem_model_lists_the_fields_of_decode_smem() -> None:
    source = (KERNELS_CU / "flash_decode.cu").read_text()

    def struct(opening: str, after: int = 0) -> str:
        body = source[source.index(opening, after):]
        return body[:body.index("\n};") + 3]

    merge = struct("struct DecodeMerge {")
    body = struct("struct DecodeSmem {", source.index("#else", source.index("struct DecodeSmem {")))
    declared = re.findall(r"^\s*(u16|float) (\w+)((?:\[T::\w+\])+);", body + merge, re.MULTILINE)
    assert [(t, n, tuple(re.findall(r"T::(\w+)", dims))) for t, n, dims in declared] == \
        [(t, n, dims) for _, t, n, dims in DECODE_SMEM_FIELDS]
    assert "union {" in body and "} tiles;" in body and "DecodeMerge merge;" in body
    # The traits the sizes below use (DecodeTraits in flash_decode.cu, traits.cuh, params.cuh).
    assert "kBlockM = 16 * RowWarps;" in source and "kKeyWarps = kDecodeWarps / RowWarps;" in source
    assert "kStride = HeadDim + kSmemPad;" in source and "kBlockN = kDecodeBlockN;" in source
    assert "constexpr int kSmemPad = 8;" in (KERNELS_CU / "traits.cuh").read_text()
    params = (KERNELS_CU / "params.cuh").read_text()
    assert "constexpr int kDecodeWarps = 4;" in params and "constexpr int kDecodeBlockN = 64;" in params


def struct_bytes(head_dim: int, row_warps: int, stages: int) -> int:
    """sizeof(DecodeSmem) by the C++ layout rules: each part's fields in order, the union as its
    largest member, every offset and the total rounded to the alignment of the widest type."""
    traits = {"kBlockM": 16 * row_warps, "kKeyWarps": 4 // row_warps, "kStride": head_dim + 8, "kStages": stages,
              "kBlockN": 64, "kHeadDim": head_dim}
    parts: dict[str, int] = {}
    for part, type_name, _, dims in DECODE_SMEM_FIELDS:
        parts[part] = parts.get(part, 0) + TYPE_BYTES[type_name] * math.prod(traits[d] for d in dims)
    align = max(TYPE_BYTES.values())

    def rounded(n: int) -> int:
        return -(-n // align) * align

    return rounded(rounded(parts["q"]) + rounded(max(parts["tiles"], parts["merge"])))


@pytest.mark.parametrize("row_warps", [1, 2, 4])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 192, 256])
def test_smem_bytes_is_the_size_of_decode_smem(row_warps: int, stages: int, head_dim: int) -> None:
    assert DecodeConfig(row_warps, stages).smem_bytes(head_dim) == struct_bytes(head_dim, row_warps, stages)


@pytest.mark.parametrize("row_warps,stages,head_dim,expected", [
    (1, 3, 128, 4352 + 104448),   # q 16 x 136 x 2; k, v 3 x 64 x 136 x 2 each
    (2, 3, 128, 8704 + 104448),
    (4, 2, 64, 9216 + 36864),     # q 64 x 72 x 2; k, v 2 x 64 x 72 x 2 each
    (1, 2, 256, 8448 + 135168),   # q 16 x 264 x 2; k, v 2 x 64 x 264 x 2 each
])
def test_smem_bytes_by_hand(row_warps: int, stages: int, head_dim: int, expected: int) -> None:
    assert DecodeConfig(row_warps, stages).smem_bytes(head_dim) == expected


@pytest.mark.parametrize("head_dim,rows,blocks,expected", [
    (128, 64, 100, DecodeConfig(1, 6, 64)),   # one block per SM: the most stages that fit 227 KB
    (64, 16, 100, DecodeConfig(1, 8, 16)),    # (MAX_BULK_STAGES), pages of 16 keys
    (128, 64, 1000, DecodeConfig(1, 3, 64)),  # a full grid: 2 blocks per SM, as the split count assumed
    (120, 32, 1000, DecodeConfig(1, 3, 32)),  # stored 120 on the 128 kernel
    (256, 64, 100, None),                     # head dims above 128: cp.async (Q is not in registers)
    (96, 64, 100, None),                      # not whole 64-column boxes
    (128, 0, 100, None),                      # pages no box can hold (box_rows 0)
])
def test_bulk_copies_takes_the_most_stages_that_keep_the_residency(head_dim: int, rows: int, blocks: int,
                                                                    expected: DecodeConfig | None) -> None:
    cfg = flash_decode.config(16, head_dim, H100)  # the cp.async block a call starts from
    assert flash_decode.bulk_copies(cfg, head_dim, rows, blocks, H100) == (expected or cfg)


def test_bulk_copies_need_sm_90() -> None:
    assert flash_decode.bulk_copies(DecodeConfig(1, 3), 128, 64, 10, A100) == DecodeConfig(1, 3)


@pytest.mark.parametrize("page_size,paged,expected", [(4096, False, 64), (16, True, 16), (32, True, 32),
                                                      (64, True, 64), (256, True, 64), (8, True, 0),
                                                      (48, True, 0), (1, True, 0)])
def test_box_rows_hold_whole_pages_or_whole_tiles(page_size: int, paged: bool, expected: int) -> None:
    assert flash_decode.box_rows(page_size, paged) == expected


@pytest.mark.parametrize("value,expected", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_decode_bulk_copies_setting(monkeypatch, value: str, expected: bool) -> None:
    from cupyflash import settings

    monkeypatch.setenv("CUPYFLASH_DECODE_BULK_COPIES", value)
    assert settings.decode_bulk_copies() is expected
    monkeypatch.delenv("CUPYFLASH_DECODE_BULK_COPIES")
    assert settings.decode_bulk_copies() is False


@pytest.mark.parametrize("row_warps,stages,head_dim,expected", [
    # tiles 6 x 2 x 64 x 128 x 2 = 196608, q 4352, 6 mbarriers: 201008 -> 201728, + 1024 slack
    (1, 6, 128, 201728 + 1024),
    # tiles 2 x 2 x 64 x 64 x 2 = 32768 (merge 17408), q 64 x 72 x 2 = 9216, 2 mbarriers: 42000 -> 43008
    (4, 2, 64, 43008 + 1024),
])
def test_bulk_copy_smem_bytes_by_hand(row_warps: int, stages: int, head_dim: int, expected: int) -> None:
    assert DecodeConfig(row_warps, stages, 64).smem_bytes(head_dim) == expected


# ---------------------------------------------------------------------------------------------
# kvcache.split_plan

def decode_problem(**changes: Any) -> kvcache.DecodeProblem:
    """One sequence, one kv head of 8 q heads, head dim 128, a contiguous cache of 32768 keys."""
    base = kvcache.DecodeProblem(batch=1, seqlen_q=1, heads_q=8, heads_kv=1, head_dim=128, dtype="float16",
                                 seqlen_new=0, capacity=32768, paged=False, page_size=32768, num_pages=0,
                                 batch_cache=1, cache_seqlen=None, softmax_scale=128 ** -0.5, window=(-1, 0),
                                 num_splits=0, split_size=None)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def no_device_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(device_id: int) -> DeviceLimits:
        raise AssertionError(f"split_plan looked up device {device_id}")
    monkeypatch.setattr(kvcache, "device_limits", refuse)


@pytest.fixture
def fake_h100(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """kvcache.device_limits gives H100; the list collects the device ids it was asked for."""
    asked: list[int] = []

    def limits(device_id: int) -> DeviceLimits:
        asked.append(device_id)
        return H100
    monkeypatch.setattr(kvcache, "device_limits", limits)
    return asked


@pytest.mark.parametrize("changes,split_size,expected", [
    ({}, 4096, (8, 64)),                                  # 512 key tiles of the capacity, 64 per split
    ({}, 192, (171, 3)),                                  # ceil(512 / 3)
    ({}, 64, (512, 1)),                                   # more than MAX_NUM_SPLITS: split_size fixes the count
    ({"capacity": 1000, "page_size": 1000}, 128, (8, 2)),  # ceil(1000 / 64) = 16 tiles
    ({"cache_seqlen": 1000, "seqlen_new": 24}, 256, (4, 4)),  # a host length: 1024 keys, 16 tiles
    ({"cache_seqlen": 1000, "seqlen_new": 25}, 256, (5, 4)),  # 1025 keys: 17 tiles
    ({"cache_seqlen": 0}, 128, (1, 2)),                   # no keys: still one split
    ({"capacity": 0, "page_size": 0}, 64, (1, 1)),
])
def test_split_size_fixes_the_tiles_per_split(no_device_lookup: None, changes: dict[str, Any], split_size: int,
                                              expected: tuple[int, int]) -> None:
    problem = decode_problem(**changes, split_size=split_size)
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == expected


@pytest.mark.parametrize("num_splits", [1, 2, 7, 256])
@pytest.mark.parametrize("changes", [{}, {"cache_seqlen": 10}, {"batch": 512, "heads_kv": 8, "heads_q": 64}])
def test_forced_num_splits_is_taken_as_asked(no_device_lookup: None, num_splits: int,
                                             changes: dict[str, Any]) -> None:
    problem = decode_problem(**changes, num_splits=num_splits)
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == (num_splits, 0)


def test_the_heuristic_splits_a_single_long_sequence(fake_h100: list[int]) -> None:
    # 1 block; DecodeConfig(1, 3) at head dim 128 is 108,800 bytes: 2 per SM, 264 slots; 512 key tiles.
    problem = decode_problem()
    cfg = flash_decode.config(problem.packed_rows, problem.head_dim, H100)
    assert cfg == DecodeConfig(1, 3)
    assert kvcache.split_plan(problem, cfg, 3) == (128, 0)  # 4 tiles per split at least
    assert fake_h100 == [3]


def test_the_heuristic_reads_the_longest_known_sequence(fake_h100: list[int]) -> None:
    # A host length of 100 keys (2 tiles) is too short to split (4 tiles per split at least),
    # though the cache holds 512 tiles; 512 keys (8 tiles) split in 2.
    assert kvcache.split_plan(decode_problem(cache_seqlen=99, seqlen_new=1), DecodeConfig(1, 3), 0) == (1, 0)
    assert kvcache.split_plan(decode_problem(cache_seqlen=511, seqlen_new=1), DecodeConfig(1, 3), 0) == (2, 0)
    assert kvcache.split_plan(decode_problem(cache_seqlen=64), DecodeConfig(1, 3), 0) == (1, 0)


def test_the_heuristic_keeps_one_split_for_a_full_batch(fake_h100: list[int]) -> None:
    problem = decode_problem(batch=64, heads_kv=8, heads_q=64)  # 512 blocks >= 0.8 * 264
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == (1, 0)


def test_the_heuristic_counts_resident_blocks_by_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # 150 blocks: on 264 slots (2 per SM) they take 3 splits (as choose_splits(150, 512, 264));
    # with shared memory for 1 block per SM (132 slots) they already fill the GPU.
    problem = decode_problem(heads_kv=150, heads_q=150)
    monkeypatch.setattr(kvcache, "device_limits", lambda device_id: H100)
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == (3, 0)
    monkeypatch.setattr(kvcache, "device_limits", lambda device_id: dataclasses.replace(H100, smem_per_sm=120000))
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == (1, 0)


def test_the_heuristic_counts_the_m_tiles_of_the_packed_rows(fake_h100: list[int]) -> None:
    # 10 tokens x 8 q heads = 80 packed rows in m16 tiles (head dim 256 keeps one row warp): 5 m
    # tiles x 32 kv heads = 160 blocks, one per SM at 143,616 bytes: 160 >= 0.8 * 132.
    problem = decode_problem(seqlen_q=10, heads_kv=32, heads_q=256, head_dim=256)
    cfg = flash_decode.config(problem.packed_rows, problem.head_dim, H100)
    assert cfg == DecodeConfig(1, 2) and flash_decode.m_tiles(problem.packed_rows, cfg) == 5
    assert kvcache.split_plan(problem, cfg, 0) == (1, 0)
    # The same 32 blocks with one token each (8 packed rows, 1 m tile) are split.
    assert kvcache.split_plan(dataclasses.replace(problem, seqlen_q=1), cfg, 0)[0] > 1


def test_clusters_merge_2_4_or_8_splits_on_sm90_in_part_of_a_wave() -> None:
    assert [flash_decode.cluster_size(n, 8, 264, H100) for n in (1, 2, 3, 4, 7, 8, 16)] == [0, 2, 0, 4, 0, 8, 0]
    assert flash_decode.cluster_size(8, 8, 264, H100) == 8  # 64 blocks: within a quarter of 264
    assert flash_decode.cluster_size(8, 9, 264, H100) == 0  # 72: the combine path
    assert flash_decode.cluster_size(8, 16, 264, H100) == 0  # 128 (measured slower as clusters)
    assert flash_decode.cluster_size(4, 16, 264, H100) == 4  # 64
    assert flash_decode.cluster_size(4, 64, 264, H100) == 0  # a full wave (measured slower as a cluster)
    assert flash_decode.cluster_size(2, 128, 264, H100) == 2  # pairs: up to a full wave
    assert flash_decode.cluster_size(2, 133, 264, H100) == 0
    assert flash_decode.cluster_size(8, 1, 264, A100) == 0  # no clusters before sm_90


def test_a_grid_of_one_block_per_sm_takes_4_stages() -> None:
    assert flash_decode.deeper_pipeline(DecodeConfig(1, 3), 128, 132, H100) == DecodeConfig(1, 4)
    assert flash_decode.deeper_pipeline(DecodeConfig(2, 3), 64, 1, H100) == DecodeConfig(2, 4)
    assert flash_decode.deeper_pipeline(DecodeConfig(1, 3), 128, 133, H100) == DecodeConfig(1, 3)  # 2 per SM
    assert flash_decode.deeper_pipeline(DecodeConfig(4, 2), 128, 1, H100) == DecodeConfig(4, 2)
    assert flash_decode.deeper_pipeline(DecodeConfig(1, 2), 256, 1, H100) == DecodeConfig(1, 2)
    assert flash_decode.deeper_pipeline(DecodeConfig(1, 3), 128, 1, TINY) == DecodeConfig(1, 3)  # does not fit


def test_the_heuristic_takes_a_cluster_of_8_for_up_to_16_splits(fake_h100: list[int]) -> None:
    # 64 key tiles (4k keys): 16 splits of 4 tiles are short
    assert [flash_decode.prefer_cluster(n, 8, 264, 64, H100) for n in (2, 8, 9, 16, 17, 32)] == [2, 8, 8, 8, 17, 32]
    assert flash_decode.prefer_cluster(16, 17, 264, 64, H100) == 16  # 8 splits would not merge in a cluster
    assert flash_decode.prefer_cluster(16, 8, 264, 64, A100) == 16
    # batch 1, 8 kv heads, 4096 keys: the heuristic's 16 (one per SM) becomes 8
    problem = decode_problem(heads_kv=8, heads_q=32, capacity=4096, page_size=4096)
    assert kvcache.split_plan(problem, DecodeConfig(1, 3), 0) == (8, 0)


def test_long_splits_keep_their_count_rather_than_a_cluster() -> None:
    # 16 splits of 128 tiles (8 each) are short enough; of 129 tiles (9 each) they are not.
    assert flash_decode.prefer_cluster(16, 8, 264, 128, H100) == 8
    assert flash_decode.prefer_cluster(16, 8, 264, 129, H100) == 16
    assert flash_decode.prefer_cluster(16, 8, 264, 512, H100) == 16  # 1 x 32k keys, 8 kv heads


# ---------------------------------------------------------------------------------------------
# kvcache.check_values (check=True), on stand-ins for device arrays

class OnDevice:
    """What check_values reads of a CuPy array: .get(), the host copy."""

    def __init__(self, values: Any) -> None:
        self.values = np.asarray(values, np.int32)

    def get(self) -> np.ndarray:
        return self.values.copy()


def paged_problem(**changes: Any) -> kvcache.DecodeProblem:
    """Two sequences, pages of 16 keys, 6 pages, 4 table columns (64 keys), 3 new keys."""
    return decode_problem(**{"batch": 2, "seqlen_new": 3, "capacity": 64, "paged": True, "page_size": 16,
                             "num_pages": 6, "batch_cache": 0, **changes})


def test_check_values_passes_good_values() -> None:
    table = OnDevice([[0, 1, 2, 3], [5, 4, -1, 99]])  # sequence 1 uses 2 pages: its unused columns are free
    kvcache.check_values(paged_problem(), {"cache_seqlens": OnDevice([61, 29]), "block_table": table})
    kvcache.check_values(paged_problem(cache_seqlen=13), {"block_table": OnDevice([[0, 1, 2, 3], [5, 4, 9, 9]])})
    contiguous = decode_problem(batch=2, batch_cache=3, capacity=128, page_size=128, seqlen_new=0)
    kvcache.check_values(contiguous, {"cache_seqlens": OnDevice([0, 128]), "cache_batch_idx": OnDevice([2, 2])})


@pytest.mark.parametrize("lengths,text", [
    ([62, 0], "cache_seqlens[0] is 62; each must be from 0 to 61 (the cache's 64 keys less the 3 new ones)"),
    ([0, -1], "cache_seqlens[1] is -1; each must be from 0 to 61"),
])
def test_check_values_names_a_length_out_of_range(lengths: list[int], text: str) -> None:
    table = OnDevice([[0, 1, 2, 3], [0, 1, 2, 3]])
    with raises(ValueError, text):
        kvcache.check_values(paged_problem(), {"cache_seqlens": OnDevice(lengths), "block_table": table})


@pytest.mark.parametrize("row,text", [
    ([5, 4, 6, 0], "block_table[1, 2] is 6; page indices must be from 0 to 5 (k_cache.shape[0] pages)"),
    ([-1, 4, 0, 0], "block_table[1, 0] is -1; page indices must be from 0 to 5"),
])
def test_check_values_names_a_page_out_of_range_among_those_used(row: list[int], text: str) -> None:
    arrays = {"cache_seqlens": OnDevice([0, 33]), "block_table": OnDevice([[0, 0, 0, 0], row])}  # 36 keys: 3 pages
    with raises(ValueError, text):
        kvcache.check_values(paged_problem(), arrays)


def test_check_values_names_a_slot_out_of_range_and_a_shared_slot_while_appending() -> None:
    contiguous = decode_problem(batch=2, batch_cache=3, capacity=128, page_size=128, seqlen_new=2, cache_seqlen=5)
    with raises(ValueError, "cache_batch_idx[1] is 3; slots are 0 to 2"):
        kvcache.check_values(contiguous, {"cache_batch_idx": OnDevice([0, 3])})
    with raises(ValueError, "cache_batch_idx names one cache slot for two sequences while appending k, v"):
        kvcache.check_values(contiguous, {"cache_batch_idx": OnDevice([1, 1])})


def test_decode_copies_switches_the_copies_and_drops_plans_both_ways(monkeypatch) -> None:
    from cupyflash import plan

    cleared = []
    monkeypatch.setattr(plan, "clear", lambda: cleared.append(flash_decode.bulk_copies_enabled))
    monkeypatch.setattr(flash_decode, "bulk_copies_enabled", False)
    with kvcache.decode_copies(True):
        assert flash_decode.bulk_copies_enabled is True
    assert flash_decode.bulk_copies_enabled is False and cleared == [True, False]
    with pytest.raises(KeyError), kvcache.decode_copies(True):
        raise KeyError("a failing call inside")
    assert flash_decode.bulk_copies_enabled is False
