"""Forward kernel on the GPU against the float64 reference, with the tolerance rule.

Skipped without a GPU (conftest.py). Every case of cupyflash.validation.gpu_matrix(): fp16 and
bf16 x head dims 32..256 (40 and 80 run on padded kernels) x causal x awkward lengths x GQA 1/4
x batch 2, plus packed-qkv views, large logits and windows. Outputs come from a NaN-poisoned
memory pool, so an unwritten element fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupyflash import plan, validation
from cupyflash.kernels import flash_fwd_sm90
from cupyflash.kernels.common import kernel_head_dim
from cupyflash.kernels.flash_fwd import FwdConfig
from cupyflash.device import DeviceLimits

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", validation.gpu_matrix(), ids=lambda case: case.id)
def test_forward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=False)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def test_rows_that_see_nothing_give_zero_and_minus_inf() -> None:
    import cupy

    import cupyflash

    case = validation.Case("float16", 64, True, 200, 50)  # causal, Sq > Sk: rows 0..149 see no key
    host = validation.make_inputs(case)
    out, lse = cupyflash.attention(*(cupy.asarray(host[n]) for n in "qkv"), causal=True, return_lse=True)
    out, lse = out.get().astype(np.float32), lse.get()
    assert np.all(out[:, :150] == 0) and np.all(lse[:, :, :150] == -np.inf)
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


# On Hopper the defaults run the wgmma kernel for head dims that are multiples of 64. The
# mma.sync kernel (what sm_80/86/89 run) must stay correct there too: the quick matrix, forced.
MMA_SYNC = {64: FwdConfig(128, 64, 4, 2), 128: FwdConfig(128, 32, 4, 2), 256: FwdConfig(128, 64, 8, 2)}


@pytest.mark.parametrize("case", [c for c in validation.gpu_matrix(quick=True) if kernel_head_dim(c.head_dim) in MMA_SYNC],
                         ids=lambda case: case.id)
def test_mma_sync_forward_matches_reference(case: validation.Case) -> None:
    with plan.forced(fwd=MMA_SYNC[kernel_head_dim(case.head_dim)]):
        results = validation.run_gpu_case(case, backward=False)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def _wgmma_candidates() -> list[tuple[int, flash_fwd_sm90.Sm90FwdConfig]]:
    hopper = DeviceLimits("H100", (9, 0), 132, 232448, 233472)
    return [(d, c) for d in (64, 128, 192, 256) for c in flash_fwd_sm90.candidates(d, hopper)]


# Every wgmma tile the autotuner may pick, on two awkward cases (tails, causal, GQA, bf16).
@pytest.mark.parametrize("head_dim,config", _wgmma_candidates(),
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.block_n}s{x.stages}")
@pytest.mark.parametrize("case_args", [("float16", True, 113, 203, 4), ("bfloat16", False, 1023, 1024, 1)],
                         ids=["fp16-causal-113x203-gqa4", "bf16-1023x1024"])
def test_every_wgmma_tile_matches_reference(head_dim: int, config: flash_fwd_sm90.Sm90FwdConfig,
                                            case_args: tuple) -> None:
    import cupy

    from cupyflash.device import device_limits

    if device_limits(cupy.cuda.runtime.getDevice()).compute_capability != (9, 0):
        pytest.skip("wgmma runs on sm_90 only")
    dtype, causal, seqlen_q, seqlen_k, group = case_args
    case = validation.Case(dtype, head_dim, causal, seqlen_q, seqlen_k, group)
    with plan.forced(fwd=config):
        results = validation.run_gpu_case(case, backward=False)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
