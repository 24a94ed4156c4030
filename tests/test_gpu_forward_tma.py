"""The Hopper forward with bulk tensor copies (flash_fwd_tma) against the float64 reference,
each config forced (plan.forced), not only the defaults. Every config the autotuner may
time, head dims 32 to 256 (32, 96 and 160 on tiles of whole 64-column slabs), on two cases; then
awkward ones: causal rows that see no key, a sliding window, one key, packed qkv views (strided
heads), head dims below the compiled one (the box columns past them read zeros). Skipped off
sm_90.
"""

from __future__ import annotations

import pytest

from cupyflash import plan, validation
from cupyflash.device import DeviceLimits
from cupyflash.kernels import flash_fwd_tma
from cupyflash.kernels.common import kernel_head_dim

pytestmark = pytest.mark.gpu

HOPPER = DeviceLimits("H100", (9, 0), 132, 232448, 233472)


def _configs() -> list[tuple[int, flash_fwd_tma.TmaFwdConfig]]:
    return [(d, c) for d in (32, 64, 96, 128, 160, 192, 256) for c in flash_fwd_tma.candidates(d, HOPPER)]


CASES = [  # (dtype, causal, seqlen_q, seqlen_k, group, extra Case fields)
    ("float16", True, 113, 203, 4, {}),
    ("bfloat16", False, 1023, 1024, 1, {}),
    ("bfloat16", True, 300, 129, 2, {"window": (70, 0)}),  # causal rows seeing no key, a window
    ("float16", False, 257, 1, 1, {"batch": 1, "heads_kv": 1}),  # one key
    ("bfloat16", False, 333, 333, 1, {"layout": "packed"}),  # q, k, v strided views of one array
]


def _run(head_dim: int, config: flash_fwd_tma.TmaFwdConfig, args: tuple) -> None:
    import cupy

    from cupyflash.device import device_limits

    if device_limits(cupy.cuda.runtime.getDevice()).compute_capability != (9, 0):
        pytest.skip("flash_fwd_tma runs on sm_90 only")
    dtype, causal, seqlen_q, seqlen_k, group, extra = args
    case = validation.Case(dtype, head_dim, causal, seqlen_q, seqlen_k, group, **extra)
    with plan.forced(fwd=config):
        results = validation.run_gpu_case(case, backward=False)
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)


def tma_id(config) -> str:
    return (f"n{config.block_n}s{config.stages}{'p' if config.pingpong else ''}c{config.consumers}"
            f"{'w' if config.wide_pv else ''}")


@pytest.mark.parametrize("head_dim,config", _configs(),
                         ids=lambda x: f"d{x}" if isinstance(x, int) else tma_id(x))
@pytest.mark.parametrize("args", CASES[:2], ids=["fp16-causal-113x203-gqa4", "bf16-1023x1024"])
def test_every_tma_config_matches_reference(head_dim: int, config: flash_fwd_tma.TmaFwdConfig, args: tuple) -> None:
    _run(head_dim, config, args)


@pytest.mark.parametrize("head_dim", [40, 80, 96, 120, 160, 250])
@pytest.mark.parametrize("args", CASES[2:], ids=["bf16-window", "fp16-one-key", "bf16-packed"])
def test_awkward_cases_match_reference(head_dim: int, args: tuple) -> None:
    config = flash_fwd_tma.candidates(kernel_head_dim(head_dim), HOPPER)[0]
    _run(head_dim, config, args)


def test_a_packed_batch_cannot_be_forced_onto_it() -> None:
    import cupy

    import cupyflash

    q = cupy.random.standard_normal((40, 2, 64), dtype=cupy.float32).astype(cupy.float16)
    cu = cupy.asarray([0, 17, 40], dtype=cupy.int32)
    with plan.forced(fwd=flash_fwd_tma.TmaFwdConfig(128, 2)), pytest.raises(ValueError, match="packed"):
        cupyflash.attention_varlen(q, q, q, cu, cu, 23, 23)


def test_arrays_without_a_tensor_map_take_the_next_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # kernel_ready gives every array 16-byte strides, which a tensor map always describes; a map
    # the driver's rules refuse (here: every one) must send the call to flash_fwd_sm90, not fail.
    import cupy

    from cupyflash import launch, tma
    from cupyflash.device import device_limits

    if device_limits(cupy.cuda.runtime.getDevice()).compute_capability != (9, 0):
        pytest.skip("flash_fwd_tma runs on sm_90 only")
    refused: list[tuple[int, ...]] = []

    def refuse(array: object, box: tuple[int, ...], swizzle: int = 0) -> str:
        refused.append(array.shape)
        return "refused by this test"

    built: list[plan.Plan] = []
    build_forward = plan.build_forward

    def record(*args: object) -> plan.Plan:
        built.append(build_forward(*args))
        return built[-1]

    monkeypatch.setattr(tma, "describe", refuse)
    monkeypatch.setattr(plan, "build_forward", record)
    plan.clear()
    try:
        results = validation.run_gpu_case(validation.Case("bfloat16", 128, True, 300, 300, 2), backward=False)
    finally:
        plan.clear()  # no plan built without tensor maps outlives this test
    failures = [r.message() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert refused and built
    assert not any(isinstance(p.params, launch.TensorMapParams) for p in built)
