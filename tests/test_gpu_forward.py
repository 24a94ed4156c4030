"""Forward kernel on the GPU against the float64 reference, with the tolerance rule.

Skipped without a GPU (conftest.py). Every case of cupyflash.validation.gpu_matrix(): fp16 and
bf16 x head dims 32..256 (40 and 80 run on padded kernels) x causal x awkward lengths x GQA 1/4
x batch 2, plus packed-qkv views, large logits and windows. Outputs come from a NaN-poisoned
memory pool, so an unwritten element fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupyflash import validation

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", validation.gpu_matrix(), ids=lambda case: case.id)
def test_forward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=False)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def test_rows_that_see_nothing_give_zero_and_inf() -> None:
    import cupy

    import cupyflash

    case = validation.Case("float16", 64, True, 200, 50)  # causal, Sq > Sk: rows 0..149 see no key
    host = validation.make_inputs(case)
    out, lse = cupyflash.attention(*(cupy.asarray(host[n]) for n in "qkv"), causal=True, return_lse=True)
    out, lse = out.get().astype(np.float32), lse.get()
    assert np.all(out[:, :150] == 0) and np.all(np.isinf(lse[:, :, :150]))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[:, :, 150:]))


def test_non_default_stream_gives_same_result() -> None:
    import cupy

    import cupyflash

    case = validation.Case("bfloat16", 128, True, 777, 1024, group=4)
    q, k, v = (cupy.asarray(validation.make_inputs(case)[n]) for n in "qkv")
    expected = cupyflash.attention(q, k, v, causal=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = cupyflash.attention(q, k, v, causal=True)
    stream.synchronize()
    assert cupy.array_equal(expected.view(cupy.uint16), got.view(cupy.uint16))


def test_numpy_in_numpy_out() -> None:
    import cupyflash

    case = validation.Case("float16", 64, False, 33, 65)
    host = validation.make_inputs(case)
    out = cupyflash.attention(host["q"], host["k"], host["v"])
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == host["q"].shape


class PeakTracker:
    """Samples the memory pool's used bytes at every allocation: the peak is the true peak,
    since usage only grows at allocations."""

    def __init__(self) -> None:
        import cupy

        self.pool = cupy.get_default_memory_pool()
        self.base = self.pool.used_bytes()
        self.peak = self.base

    def malloc(self, size: int):
        pointer = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return pointer

    @property
    def extra(self) -> int:
        return self.peak - self.base


@pytest.mark.parametrize("seqlen", [1024, 8192])
def test_forward_memory_is_outputs_plus_a_few_mb(seqlen: int) -> None:
    import cupy

    import cupyflash

    q, k, v = (cupy.random.standard_normal((2, seqlen, 8, 128), dtype=cupy.float32).astype(cupy.float16)
               for _ in range(3))
    cupyflash.attention(q, k, v, causal=True)  # compile and load outside the measurement
    tracker = PeakTracker()
    cupy.cuda.set_allocator(tracker.malloc)
    try:
        out, lse = cupyflash.attention(q, k, v, causal=True, return_lse=True)
    finally:
        cupy.cuda.set_allocator(tracker.pool.malloc)
    outputs = out.nbytes + lse.nbytes
    assert tracker.extra <= outputs + 4 * 2**20, (tracker.extra, outputs)
