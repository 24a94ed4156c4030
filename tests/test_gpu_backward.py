"""Backward kernels on the GPU against the float64 reference gradients (tolerance rule), on the
same matrix as the forward; determinism; zero gradients for rows that see nothing; memory.
Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cupyflash import validation

from .test_gpu_forward import PeakTracker

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", validation.gpu_matrix(), ids=lambda case: case.id)
def test_backward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", [validation.Case("float16", 128, True, 1023, 1024, group=4),
                                  validation.Case("bfloat16", 64, False, 203, 113),
                                  validation.Case("float16", 256, False, 1024, 1024)], ids=lambda c: c.id)
def test_deterministic_backward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=True, deterministic=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_deterministic_backward_is_bitwise_repeatable(head_dim: int) -> None:
    import cupy

    import cupyflash

    case = validation.Case("bfloat16", head_dim, True, 1500, 2048, group=4)
    host = validation.make_inputs(case)
    q, k, v, dout = (cupy.asarray(host[n]) for n in ("q", "k", "v", "dout"))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    first = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    second = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)), f"{name} differs between runs"


def test_gradients_of_rows_that_see_nothing_are_zero() -> None:
    import cupy

    import cupyflash

    case = validation.Case("float16", 64, True, 200, 50)  # rows 0..149 see no key
    host = validation.make_inputs(case)
    q, k, v, dout = (cupy.asarray(host[n]) for n in ("q", "k", "v", "dout"))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    for deterministic in (False, True):
        dq, dk, dv = (g.get().astype(np.float32) for g in cupyflash.attention_backward(
            dout, q, k, v, out, lse, causal=True, deterministic=deterministic))
        assert np.all(dq[:, :150] == 0), "dq of rows that see nothing must be 0"
        assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))


@pytest.mark.parametrize("seqlen", [1024, 8192])
def test_backward_memory_is_gradients_plus_o_n(seqlen: int) -> None:
    import cupy

    import cupyflash

    q, k, v, dout = (cupy.random.standard_normal((2, seqlen, 8, 128), dtype=cupy.float32).astype(cupy.float16)
                     for _ in range(4))
    out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)  # compile outside the measurement
    tracker = PeakTracker()
    cupy.cuda.set_allocator(tracker.malloc)
    try:
        dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    finally:
        cupy.cuda.set_allocator(tracker.pool.malloc)
    grads = dq.nbytes + dk.nbytes + dv.nbytes
    dq_accum, delta = q.size * 4, lse.nbytes  # float32 dQ accumulator and delta: O(batch * heads * seqlen)
    assert tracker.extra <= grads + dq_accum + delta + 4 * 2**20, (tracker.extra, grads)
