"""Inputs at the edges, on the GPU: the kernels against the NumPy reference where rows (or every
row) see no key, and the messages for arrays a GPU run cannot take as they are (torch CPU
tensors, arrays on two GPUs). Skipped without a GPU (conftest.py).

Rows that see nothing are compared exactly: out 0, lse equal to the reference's (-inf, the
log of an empty sum), gradients 0, never NaN. The rest of each result meets the tolerance
rule. Outputs come from a NaN-poisoned memory pool, so an element the kernels skip fails.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import reference, validation
from cupyflash.tolerance import compare

pytestmark = pytest.mark.gpu

# (id, validation.Case): each has rows, or keys, that nothing pairs with.
MASKED = [
    ("window00-sq>sk", validation.Case("float16", 64, False, 40, 17, window=(0, 0))),  # rows 0..22 see nothing
    ("causal-window00-sq>sk", validation.Case("bfloat16", 128, True, 40, 17, group=4, window=(0, 0))),
    ("window00-sq<sk", validation.Case("float16", 40, False, 17, 40, window=(0, 0))),  # keys 0..22 unseen
    ("causal-sq>sk-tiles", validation.Case("bfloat16", 256, True, 300, 50)),  # whole Q tiles see nothing
    ("right-only-sq>sk", validation.Case("float16", 128, False, 203, 113, window=(-1, 1))),
    ("left-only-sq<sk", validation.Case("bfloat16", 64, False, 113, 203, group=4, window=(3, -1))),
]

# (id, validation.Case): seqlen_k = 0, so every row sees nothing; seqlen_q = 0; batch = 0.
EMPTY = [
    ("no-keys-d64", validation.Case("float16", 64, False, 37, 0)),
    ("no-keys-causal-d128-gqa", validation.Case("bfloat16", 128, True, 200, 0, group=4)),
    ("no-keys-window-d40", validation.Case("float16", 40, False, 1, 0, window=(0, 0))),
    ("no-keys-d256", validation.Case("bfloat16", 256, True, 129, 0)),
    ("no-queries", validation.Case("float16", 64, True, 0, 50)),
    ("no-batch", validation.Case("bfloat16", 128, False, 17, 33, batch=0)),
]


def run_kernels(case: validation.Case, deterministic: bool) -> dict[str, np.ndarray]:
    """out, lse, dq, dk, dv of cupyflash on the case's inputs (CuPy in, host float64 out)."""
    import cupy

    host = validation.make_inputs(case)
    dev = {name: cupy.asarray(array) for name, array in host.items()}
    options = dict(causal=case.causal, window_size=case.window)
    q, k = dev["q"], dev["k"]
    validation.poison_pool((q.shape, q.dtype), ((q.shape[0], q.shape[2], q.shape[1]), np.float32))
    out, lse = cf.attention(q, k, dev["v"], return_lse=True, **options)
    validation.poison_pool((q.shape, q.dtype), (k.shape, k.dtype), (k.shape, k.dtype))
    grads = cf.attention_backward(dev["dout"], q, k, dev["v"], out, lse, deterministic=deterministic, **options)
    results = dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)))
    return {name: cupy.asnumpy(array).astype(np.float64) for name, array in results.items()}


def run_reference(case: validation.Case, compute_dtype: str | None) -> dict[str, np.ndarray]:
    host = {name: array.astype(np.float64) for name, array in validation.make_inputs(case).items()}
    options = dict(causal=case.causal, window_size=case.window, compute_dtype=compute_dtype)
    out, lse = reference.attention_forward(host["q"], host["k"], host["v"], **options)
    grads = reference.attention_backward(host["dout"], host["q"], host["k"], host["v"], **options)
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)))


def assert_matches(case: validation.Case, ours: dict[str, np.ndarray]) -> None:
    """Exact where nothing is seen, the tolerance rule everywhere, no NaN anywhere."""
    ref64, base = run_reference(case, None), run_reference(case, case.dtype)
    for name, array in ours.items():
        assert array.shape == ref64[name].shape, (name, array.shape, ref64[name].shape)
        assert not np.isnan(array).any(), f"{name} has NaN at {np.argwhere(np.isnan(array))[:3].tolist()}"
    seen = reference.visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window)
    dead_rows, dead_keys = ~seen.any(axis=1), ~seen.any(axis=0)
    exact = {"out": ours["out"][:, dead_rows], "dq": ours["dq"][:, dead_rows], "dk": ours["dk"][:, dead_keys],
             "dv": ours["dv"][:, dead_keys]}
    for name, part in exact.items():
        assert np.all(part == 0), f"{name}: rows/keys that see nothing hold {part[part != 0][:3]}, not 0"
    lse_dead, ref_dead = ours["lse"][:, :, dead_rows], ref64["lse"][:, :, dead_rows]
    assert np.array_equal(lse_dead, ref_dead), f"lse of rows that see nothing: {lse_dead.ravel()[:3]}, not " \
                                               f"{ref_dead.ravel()[:3]}"
    failures = [result.message() for result in (
        compare(name, ours[name], ref64[name], base[name], "lse" if name == "lse" else case.dtype) for name in ours)
        if not result.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("case", [c for _, c in MASKED], ids=[i for i, _ in MASKED])
def test_fully_masked_rows_match_reference(case: validation.Case, deterministic: bool) -> None:
    seen = reference.visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window)
    assert seen.any() and (not seen.any(axis=1).all() or not seen.any(axis=0).all())  # live and dead rows or keys
    assert_matches(case, run_kernels(case, deterministic))



@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_backward_takes_the_old_plus_inf_lse(deterministic: bool) -> None:
    """lse was +inf for rows that see nothing before 2026-12: a caller's stored lse of that
    convention still gives the same gradients, bitwise, as the forward's -inf."""
    import cupy

    case = validation.Case("bfloat16", 128, True, 300, 50, group=2)  # causal, Sq > Sk: whole Q tiles see nothing
    dev = {name: cupy.asarray(array) for name, array in validation.make_inputs(case).items()}
    out, lse = cf.attention(dev["q"], dev["k"], dev["v"], causal=True, return_lse=True)
    assert int((lse == -cupy.inf).sum()) == lse.shape[0] * lse.shape[1] * 250  # rows 0..249 see no key
    old = cupy.where(lse == -cupy.inf, cupy.float32(cupy.inf), lse)
    ours, before = (cf.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, stats, causal=True,
                                          deterministic=deterministic) for stats in (lse, old))
    for name, new, was in zip(("dq", "dk", "dv"), ours, before):
        assert not bool(cupy.isnan(new).any()), f"{name} has NaN"
        assert cupy.array_equal(new, was), f"{name} differs between lse -inf and +inf for rows that see nothing"

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("case", [c for _, c in EMPTY], ids=[i for i, _ in EMPTY])
def test_empty_sizes_match_reference(case: validation.Case, deterministic: bool) -> None:
    ours = run_kernels(case, deterministic)
    assert_matches(case, ours)
    if case.seqlen_k == 0 and case.seqlen_q > 0 and case.batch > 0:
        assert np.all(ours["out"] == 0) and np.all(ours["lse"] == -np.inf) and np.all(ours["dq"] == 0)


def test_no_keys_numpy_in_numpy_out() -> None:
    case = validation.Case("float16", 64, True, 9, 0)
    host = validation.make_inputs(case)
    out, lse = cf.attention(host["q"], host["k"], host["v"], causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and np.all(out == 0)
    np.testing.assert_array_equal(lse, reference.attention_forward(host["q"], host["k"], host["v"], causal=True)[1])


# --- arrays the GPU run cannot take as they are ---

def test_torch_cpu_tensor_is_refused_with_what_to_do() -> None:
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 8, 2, 64, dtype=torch.float16) for _ in range(3))
    with pytest.raises(TypeError, match=re.escape("q is a torch CPU tensor; move it to the GPU with q.cuda()")):
        cf.attention(q, k, v)


def test_torch_float32_gets_a_torch_cast_hint() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    q, k, v = (torch.randn(1, 8, 2, 64, device="cuda") for _ in range(3))
    with pytest.raises(TypeError, match=re.escape("(cast with q.half() or q.to(torch.bfloat16))")):
        cf.attention(q, k, v)


def two_gpus() -> Any:
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    return cupy


def test_arrays_on_two_gpus_are_refused_with_what_to_do() -> None:
    cupy = two_gpus()
    host = validation.make_inputs(validation.Case("float16", 64, False, 33, 47))
    with cupy.cuda.Device(0):
        q = cupy.asarray(host["q"])
    with cupy.cuda.Device(1):
        k, v = cupy.asarray(host["k"]), cupy.asarray(host["v"])
    with pytest.raises(ValueError, match=re.escape("k is on GPU 1 but q is on GPU 0; pass every array on GPU 0: copy k "
                                                   "there with `with cupy.cuda.Device(0): k = cupy.asarray(k)`")):
        cf.attention(q, k, v)


def test_arrays_all_on_another_gpu_than_the_current_run_there() -> None:
    """Not an error: the call runs on the inputs' GPU and gives what it gives on the current one."""
    cupy = two_gpus()
    host = validation.make_inputs(validation.Case("bfloat16", 128, True, 113, 203, group=4))
    names = ("q", "k", "v", "dout")
    with cupy.cuda.Device(0):
        q, k, v, dout = (cupy.asarray(host[n]) for n in names)
        out, lse = cf.attention(q, k, v, causal=True, return_lse=True)
        expected = [x.get() for x in (out, *cf.attention_backward(dout, q, k, v, out, lse, causal=True,
                                                                   deterministic=True))]
    with cupy.cuda.Device(1):
        q, k, v, dout = (cupy.asarray(host[n]) for n in names)
    with cupy.cuda.Device(0):  # current device 0, arrays on 1
        out, lse = cf.attention(q, k, v, causal=True, return_lse=True)
        grads = cf.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert got.device.id == 1, f"{name} is on GPU {got.device.id}"
        np.testing.assert_array_equal(got.get().view(np.uint16), want.view(np.uint16), err_msg=name)
