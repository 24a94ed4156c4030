"""Backward kernels on the GPU against the float64 reference gradients (tolerance rule), on the
same matrix as the forward; determinism; zero gradients for rows that see nothing; memory.
Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cupyflash import plan, validation
from cupyflash.kernels import flash_bwd_dkdv_sm90, flash_bwd_dq_sm90
from cupyflash.kernels.common import kernel_head_dim
from cupyflash.kernels.flash_bwd_dkdv import DkdvConfig
from cupyflash.kernels.flash_bwd_dq import DqConfig
from cupyflash.plan import BwdConfig
from cupyflash.device import DeviceLimits

from .test_gpu_forward import PeakTracker

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", validation.gpu_matrix(), ids=lambda case: case.id)
def test_backward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", [validation.Case("float16", 128, True, 1023, 1024, group=4),
                                  validation.Case("bfloat16", 64, False, 203, 113),
                                  validation.Case("float16", 256, False, 1024, 1024),
                                  validation.Case("bfloat16", 80, True, 300, 177, group=2),
                                  validation.Case("float16", 160, False, 129, 1000, window=(70, 3)),
                                  validation.Case("bfloat16", 192, True, 1000, 129),
                                  validation.Case("float16", 32, False, 77, 333, group=8)], ids=lambda c: c.id)
def test_deterministic_backward_matches_reference(case: validation.Case) -> None:
    results = validation.run_gpu_case(case, backward=True, deterministic=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("head_dim", [64, 96, 128, 160, 256])
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


# On Hopper the defaults run the wgmma dK/dV kernel above head dim 32 (every build of it, forced,
# below). The mma.sync kernels (what sm_80/86/89 run) must stay correct there too: the quick
# matrix, forced.
MMA_SYNC_BWD = {64: BwdConfig(DkdvConfig(32, 128, 4, 2, 1), DqConfig(128, 64, 8, 2), dq_atomic=True),
                128: BwdConfig(DkdvConfig(64, 128, 8, 2, 2), DqConfig(128, 64, 8, 2), dq_atomic=False),
                256: BwdConfig(DkdvConfig(64, 64, 8, 2, 2), DqConfig(128, 32, 8, 2), dq_atomic=False)}


@pytest.mark.parametrize("case", [c for c in validation.gpu_matrix(quick=True)
                                  if kernel_head_dim(c.head_dim) in MMA_SYNC_BWD], ids=lambda case: case.id)
def test_mma_sync_backward_matches_reference(case: validation.Case) -> None:
    with plan.forced(bwd=MMA_SYNC_BWD[kernel_head_dim(case.head_dim)]):
        results = validation.run_gpu_case(case, backward=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def _wgmma_dkdv_candidates() -> list[tuple[int, flash_bwd_dkdv_sm90.Sm90DkdvConfig]]:
    hopper = DeviceLimits("H100", (9, 0), 132, 232448, 233472)
    # 64, 128, 256: whole tiles; 32 in tiles of 64; 96 in tiles of 128 (half a dQ stage left
    # out); 160 and 192 in tiles of 256 (160: a dQ stage and a slab left out).
    return [(d, c) for d in (32, 64, 96, 128, 160, 192, 256) for c in flash_bwd_dkdv_sm90.candidates(d, hopper)]


# Every wgmma dK/dV tile the autotuner may pick, with dQ by atomics and in its own pass, on two
# awkward cases (tails on both sides, causal, GQA, bf16).
@pytest.mark.parametrize("head_dim,config", _wgmma_dkdv_candidates(),
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.block_n}s{x.stages}")
@pytest.mark.parametrize("dq_atomic", [True, False], ids=["atomic-dq", "dq-pass"])
@pytest.mark.parametrize("case_args", [("float16", True, 113, 203, 4), ("bfloat16", False, 1023, 1024, 1)],
                         ids=["fp16-causal-113x203-gqa4", "bf16-1023x1024"])
def test_every_wgmma_dkdv_tile_matches_reference(head_dim: int, config: flash_bwd_dkdv_sm90.Sm90DkdvConfig,
                                                 dq_atomic: bool,
                                                 case_args: tuple) -> None:
    import cupy

    from cupyflash.device import device_limits

    if device_limits(cupy.cuda.runtime.getDevice()).compute_capability != (9, 0):
        pytest.skip("wgmma runs on sm_90 only")
    dtype, causal, seqlen_q, seqlen_k, group = case_args
    case = validation.Case(dtype, head_dim, causal, seqlen_q, seqlen_k, group)
    dq_pass = plan.default_bwd_config(head_dim, device_limits(cupy.cuda.runtime.getDevice())).dq
    with plan.forced(bwd=BwdConfig(config, dq_pass, dq_atomic=dq_atomic)):
        results = validation.run_gpu_case(case, backward=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def _wgmma_dq_candidates() -> list[tuple[int, flash_bwd_dq_sm90.Sm90DqConfig]]:
    hopper = DeviceLimits("H100", (9, 0), 132, 232448, 233472)
    # 32 and 96 zero-filled in tiles of 64 and 128, 160 in tiles of 192.
    return [(d, c) for d in (32, 64, 96, 128, 160, 192, 256) for c in flash_bwd_dq_sm90.candidates(d, hopper)]


# Every wgmma dQ-pass tile the autotuner may pick (deterministic=True's dQ on Hopper), on an
# awkward causal GQA case with rows that see no key and on a windowed one with tails.
@pytest.mark.parametrize("head_dim,config", _wgmma_dq_candidates(),
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.block_n}s{x.stages}")
@pytest.mark.parametrize("case_args", [("float16", True, 203, 113, 4, (-1, -1)),
                                       ("bfloat16", False, 130, 1000, 1, (100, 17))],
                         ids=["fp16-causal-203x113-gqa4", "bf16-130x1000-window"])
def test_deterministic_backward_on_every_wgmma_dq_tile(head_dim: int, config: flash_bwd_dq_sm90.Sm90DqConfig,
                                               case_args: tuple) -> None:
    import cupy

    from cupyflash.device import device_limits

    limits = device_limits(cupy.cuda.runtime.getDevice())
    if limits.compute_capability != (9, 0):
        pytest.skip("wgmma runs on sm_90 only")
    dtype, causal, seqlen_q, seqlen_k, group, window = case_args
    case = validation.Case(dtype, head_dim, causal, seqlen_q, seqlen_k, group, window=window)
    bwd = BwdConfig(plan.default_bwd_config(head_dim, limits).dkdv, config, dq_atomic=False)
    with plan.forced(bwd=bwd):
        results = validation.run_gpu_case(case, backward=True, deterministic=True)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
