"""Launch plans on the GPU: a repeat call, served by the cached plan, gives bitwise the results
of the first (plan-building) call, into NaN-poisoned memory and on the caller's stream; a
change of the tuned configs reaches the next call; inputs a plan may not serve take the full
path and stay correct. Skipped without a GPU (conftest.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cupyflash import api, build, launch, plan, tuning, validation
from cupyflash.kernels import flash_fwd
from cupyflash.kernels.common import Variant
from cupyflash.device import device_limits, gpu_count
from cupyflash.problem import Problem

pytestmark = pytest.mark.gpu

CASES = [validation.Case("float16", 64, True, 113, 203, group=4),
         validation.Case("bfloat16", 128, False, 1023, 1024),
         validation.Case("float16", 256, True, 500, 300, window=(32, -1)),
         validation.Case("bfloat16", 64, False, 203, 203, layout="packed")]


def device_inputs(case: validation.Case) -> dict[str, Any]:
    return validation.to_device(case, validation.make_inputs(case))


def options(case: validation.Case) -> dict[str, Any]:
    return {"causal": case.causal, "window_size": case.window}


def forbid_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, a call that takes the full path (wrap_all is its first step) fails."""
    def full_path(**_: Any) -> None:
        raise AssertionError("a repeat call took the full path instead of its cached plan")

    monkeypatch.setattr(api, "wrap_all", full_path)


def host32(array: Any) -> np.ndarray:
    """On the host as float32 (NumPy, through ml_dtypes, converts bfloat16)."""
    return array.get().astype(np.float32)


def assert_bitwise_equal(name: str, expected: Any, got: Any) -> None:
    unsigned = {2: np.uint16, 4: np.uint32}[expected.dtype.itemsize]
    assert not np.isnan(host32(got)).any(), f"{name}: NaN left (an element the kernels did not write)"
    same = np.array_equal(expected.get().view(unsigned), got.get().view(unsigned))
    assert same, f"{name} differs from the first call's"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_repeat_forward_is_bitwise_the_first(case: validation.Case, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = device_inputs(case)
    q, k, v = dev["q"], dev["k"], dev["v"]
    plan.clear()
    first = api.attention(q, k, v, return_lse=True, **options(case))
    forbid_full_path(monkeypatch)
    validation.poison_pool((q.shape, q.dtype), ((case.batch, q.shape[2], case.seqlen_q), np.float32))
    second = api.attention(q, k, v, return_lse=True, **options(case))
    for name, expected, got in zip(("out", "lse"), first, second):
        assert_bitwise_equal(name, expected, got)
    assert api.attention(q, k, v, **options(case)).shape == q.shape  # return_lse=False: out alone


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_repeat_backward_matches_the_first(case: validation.Case, deterministic: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dev = device_inputs(case)
    q, k, v, dout = dev["q"], dev["k"], dev["v"], dev["dout"]
    out, lse = api.attention(q, k, v, return_lse=True, **options(case))
    plan.clear()
    first = api.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options(case))
    forbid_full_path(monkeypatch)
    validation.poison_pool((q.shape, q.dtype), (k.shape, k.dtype), (k.shape, k.dtype))
    second = api.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options(case))
    for name, expected, got in zip(("dq", "dk", "dv"), first, second):
        if name == "dq" and not deterministic:  # float32 atomics add in any order: close, not bitwise
            got32, expected32 = host32(got), host32(expected)
            assert not np.isnan(got32).any(), "dq: NaN left (an element the kernels did not write)"
            error = float(np.abs(got32 - expected32).max())
            assert error <= 1e-2 * max(float(np.abs(expected32).max()), 1.0), f"dq: max |second - first| {error}"
        else:
            assert_bitwise_equal(name, expected, got)


def test_a_repeat_call_runs_on_the_callers_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    import cupy

    case = validation.Case("bfloat16", 128, True, 777, 1024, group=4)
    dev = device_inputs(case)
    q, k, v, dout = dev["q"], dev["k"], dev["v"], dev["dout"]
    plan.clear()
    out, lse = api.attention(q, k, v, causal=True, return_lse=True)
    grads = api.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    cupy.cuda.Device().synchronize()
    forbid_full_path(monkeypatch)
    streams = []
    run = launch.Launch.run
    monkeypatch.setattr(launch.Launch, "run", lambda self, ptr: (streams.append(ptr), run(self, ptr)))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got_out, got_lse = api.attention(q, k, v, causal=True, return_lse=True)
        got_grads = api.attention_backward(dout, q, k, v, got_out, got_lse, causal=True, deterministic=True)
    stream.synchronize()
    assert streams and set(streams) == {stream.ptr}
    names = ("out", "lse", "dq", "dk", "dv")
    for name, expected, got in zip(names, (out, lse, *grads), (got_out, got_lse, *got_grads)):
        assert_bitwise_equal(name, expected, got)


def test_a_tuning_change_reaches_the_next_call(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import cupy

    monkeypatch.setenv("CUPYFLASH_TUNING_DIR", str(tmp_path))
    tuning._files.clear()
    # Switching folders is itself a change of the tuned entries (when an earlier test had loaded
    # some): let it be noticed now, or the first plan below is stale at once and rebuilt, which
    # made this test depend on what ran before it.
    tuning.load_entries(device_limits(cupy.cuda.runtime.getDevice()))
    loaded = []
    load = build.load_function
    monkeypatch.setattr(build, "load_function", lambda spec, *args: (loaded.append(spec), load(spec, *args))[1])
    case = validation.Case("float16", 64, True, 300, 300)
    dev = device_inputs(case)
    q, k, v = dev["q"], dev["k"], dev["v"]
    plan.clear()
    expected = api.attention(q, k, v, causal=True)
    default_spec = loaded[-1]
    api.attention(q, k, v, causal=True)
    assert len(loaded) == 1, "the repeat call loaded a kernel: it did not use its plan"
    limits = device_limits(cupy.cuda.runtime.getDevice())
    tuned = flash_fwd.FwdConfig(64, 32, 4, 2)  # mma.sync, and no GPU's default for head_dim 64
    bucket = tuning.bucket_key("fwd", Problem.from_arrays(q, k, v, causal=True), 64)
    tuning.store(limits, bucket, tuned, {})
    got = api.attention(q, k, v, causal=True)
    assert loaded[-1] == flash_fwd.spec("float16", 64, tuned, variant=Variant(False, True, False)) != default_spec
    assert float(np.abs(host32(got) - host32(expected)).max()) < 1e-2
    tuning.clear(limits)
    api.attention(q, k, v, causal=True)
    assert loaded[-1] == default_spec
    tuning._files.clear()


def test_a_misaligned_input_takes_the_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import cupy

    case = validation.Case("float16", 64, False, 203, 113)
    dev = device_inputs(case)
    q, k, v = dev["q"], dev["k"], dev["v"]
    plan.clear()
    expected = api.attention(q, k, v)  # builds and keeps the plan for q's layout
    storage = cupy.empty(q.size + 4, q.dtype)
    shifted = storage[4:].reshape(q.shape)  # q's shape and strides, 8 bytes past a 16-byte boundary
    shifted[...] = q
    full_path = []
    wrap_all = api.wrap_all
    monkeypatch.setattr(api, "wrap_all", lambda **named: (full_path.append(1), wrap_all(**named))[1])
    got = api.attention(shifted, k, v)
    assert full_path, "the misaligned call was served by the plan of an aligned one"
    assert_bitwise_equal("out", expected, got)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_arrays_on_another_device_take_the_full_path() -> None:
    import cupy

    case = validation.Case("float16", 64, True, 113, 203)
    host = validation.make_inputs(case)
    with cupy.cuda.Device(1):
        q1, k1, v1 = (cupy.asarray(host[n]) for n in "qkv")
        plan.clear()
        expected = api.attention(q1, k1, v1, causal=True)  # a plan for device 1, in this thread
    with cupy.cuda.Device(0):
        got = api.attention(q1, k1, v1, causal=True)  # current device 0: the full path runs on GPU 1
    assert got.device.id == 1
    with cupy.cuda.Device(1):
        assert_bitwise_equal("out", expected, got)


def test_threads_on_their_own_streams_give_the_serial_results() -> None:
    """8 threads, each with its own non-blocking stream and inputs, calling forward and the
    deterministic backward 4 times, give bitwise what one thread gave serially (plans and their
    parameter buffers are per thread: plan.py)."""
    import threading

    import cupy

    cases = [validation.Case("float16" if i % 2 else "bfloat16", (64, 128, 256, 40)[i % 4], bool(i % 3), 200 + 37 * i,
                             300 - 11 * i, group=1 + i % 2) for i in range(8)]
    inputs = [device_inputs(case) for case in cases]

    def call(case: validation.Case, dev: dict[str, Any]) -> tuple[Any, ...]:
        out, lse = api.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **options(case))
        grads = api.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse, deterministic=True,
                                       **options(case))
        return (out, lse, *grads)

    serial = [call(case, dev) for case, dev in zip(cases, inputs)]
    cupy.cuda.Device().synchronize()
    results: dict[int, list[tuple[Any, ...]]] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                results[index] = [call(cases[index], inputs[index]) for _ in range(4)]
            stream.synchronize()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, expected in enumerate(serial):
        for repeat in results[index]:
            for name, want, got in zip(("out", "lse", "dq", "dk", "dv"), expected, repeat):
                assert_bitwise_equal(f"{cases[index].id} {name}", want, got)
