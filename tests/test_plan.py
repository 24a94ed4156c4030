"""Launch plans without a GPU: the packed kernel parameters, read back the way cuLaunchKernel
reads them and checked against each kernel's C++ signature; the plan key and every reason a
call must take the full path; the tuning generation that makes plans stale.

A fake CuPy stands in for the device: arrays are NumPy layouts at made-up device addresses,
kernels are never loaded, and launchKernel only records its arguments.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import threading
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import build, launch, plan, selection, tuning
from cupyflash.config import TileConfig, kernel_head_dim
from cupyflash.device import DeviceLimits
from cupyflash.problem import Problem

pytest.importorskip("cupy", reason="the tuning header reads CUDA and NVRTC versions through CuPy")

H100 = DeviceLimits("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472)
A100 = DeviceLimits("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 167936)
STREAM = 0x5EA
B, SQ, SK, HQ, HKV = 2, 5, 7, 4, 2  # GQA, seqlen_q != seqlen_k


class FakeMemory(NamedTuple):
    ptr: int
    device_id: int


class FakeArray:
    """Stands in for a cupy.ndarray: a NumPy array's layout at a made-up device address."""

    def __init__(self, host: np.ndarray, ptr: int, device_id: int = 0) -> None:
        self.shape, self.strides, self.dtype = host.shape, host.strides, host.dtype
        self.itemsize, self.size, self.ndim = host.itemsize, host.size, host.ndim
        self.data = FakeMemory(ptr, device_id)


class FakeCupy:
    """The part of CuPy that plans use; launchKernel records (function, geometry, stream, params)."""

    ndarray = FakeArray

    def __init__(self) -> None:
        self.next_ptr = 0x7F00_0000_0000
        self.launched: list[tuple[int, ...]] = []
        stream = SimpleNamespace(ptr=STREAM)
        self.cuda = SimpleNamespace(get_current_stream=lambda: stream,
                                    driver=SimpleNamespace(launchKernel=self.launch_kernel))

    def array(self, host: np.ndarray) -> FakeArray:
        self.next_ptr += 1 << 20  # 1 MiB apart: 16-byte aligned
        return FakeArray(host, self.next_ptr)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> FakeArray:
        return self.array(np.empty(shape, dtype))

    zeros = empty

    def launch_kernel(self, *args: int) -> None:
        self.launched.append(args)


class FakeFunction(NamedTuple):
    spec: build.KernelSpec
    ptr: int


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch, tmp_path) -> FakeCupy:
    fake = FakeCupy()
    monkeypatch.setenv("CUPYFLASH_TUNING_DIR", str(tmp_path))
    tuning._files.clear()
    tuning._answered.clear()
    for module in (plan, launch):
        monkeypatch.setattr(module, "require_cupy", lambda: fake)
    monkeypatch.setattr(build, "load_function", lambda spec, device_id, arch, smem: FakeFunction(spec, 0xF00 + len(
        spec.entry)))
    monkeypatch.setattr(plan, "current_device_id", lambda: 0)
    plan.clear()
    yield fake
    plan.clear()
    tuning._files.clear()
    tuning._answered.clear()


def use_device(monkeypatch: pytest.MonkeyPatch, limits: DeviceLimits) -> None:
    monkeypatch.setattr(plan, "device_limits", lambda device_id: limits)


def inputs(fake: FakeCupy, head_dim: int, packed: bool = False) -> dict[str, FakeArray]:
    """q, k, v, dout, out, lse; with packed, q, k, v are strided views of one (B, S, 3, H, D) array."""
    if packed:
        qkv = np.empty((B, SK, 3, HKV, head_dim), np.float16)
        q, k, v = (qkv[:, :, i] for i in range(3))
    else:
        q, k, v = np.empty((B, SQ, HQ, head_dim), np.float16), *(np.empty((B, SK, HKV, head_dim), np.float16),) * 2
    host = {"q": q, "k": k, "v": v, "dout": np.empty(q.shape, np.float16), "out": np.empty(q.shape, np.float16),
            "lse": np.empty((q.shape[0], q.shape[2], q.shape[1]), np.float32)}
    return {name: fake.array(array) for name, array in host.items()}


def problem_of(t: dict[str, FakeArray], **options: Any) -> Problem:
    layout = {name: np.lib.stride_tricks.as_strided(np.empty(1, t[name].dtype), t[name].shape, t[name].strides)
              for name in "qkv"}
    return Problem.from_arrays(layout["q"], layout["k"], layout["v"], **options)


# --- the parameter buffer ---

def test_pack_arguments_puts_each_value_at_the_start_of_its_slot() -> None:
    args = ("q", np.int32(-2), np.int64(-3), np.float32(1.5), np.uint64(7), "lse")
    values, pointers, slots = launch.pack_arguments(args)
    raw = values.view(np.uint8)
    assert values.dtype == np.uint64 and values.shape == (6,)
    assert slots == ((0, "q"), (5, "lse"))
    assert raw[8:12].view(np.int32)[0] == -2 and not raw[12:16].any()  # 4 bytes, the rest zero
    assert raw[16:24].view(np.int64)[0] == -3
    assert raw[24:28].view(np.float32)[0] == 1.5 and not raw[28:32].any()
    assert values[4] == 7 and values[0] == values[5] == 0
    assert list(pointers) == [values.ctypes.data + 8 * i for i in range(6)]


@pytest.mark.parametrize("bad", [3, 0.5, np.float64(0.5), np.int16(1), None], ids=repr)
def test_pack_arguments_rejects_values_without_a_cuda_width(bad: Any) -> None:
    with pytest.raises(TypeError, match="kernel argument 1 is"):
        launch.pack_arguments(("q", bad))


def cuda_parameters(spec: build.KernelSpec) -> list[tuple[str, str]]:
    """(C++ type, name) of each parameter of the spec's extern "C" kernel."""
    text = (build.kernel_dir() / spec.source).read_text()
    match = re.search(rf"\b{spec.entry}\(([^)]*)\)\s*\{{", text)  # the definition: the body follows
    assert match, f"no definition of {spec.entry} in {spec.source}"
    parameters = []
    for parameter in match.group(1).split(","):
        *words, name = parameter.replace("*", " * ").split()
        parameters.append((" ".join(w for w in words if w not in ("const", "__restrict__")), name))
    return parameters


C_TYPES = {"cf::i64": ctypes.c_int64, "int": ctypes.c_int32, "float": ctypes.c_float}
NUMPY_TYPES = {"cf::i64": np.int64, "int": np.int32, "float": np.float32}
STRIDE_OWNER = {"o": "out", "do": "dout", "dqa": "dq_accum"}  # C++ stride prefix -> array name


def expected_value(name: str, t: dict[str, FakeArray], p: Problem) -> float:
    """What the kernel parameter `name` must hold, from the arrays and the problem."""
    stride = re.fullmatch(r"(\w+?)_(batch|row|head)_stride", name)
    if stride:
        array = t.get(STRIDE_OWNER.get(stride.group(1), stride.group(1)))
        index = ("batch", "row", "head").index(stride.group(2))
        return 0 if array is None else array.strides[index] // array.itemsize
    if name == "n_elements":
        return t["dq"].size
    if name == "accum_units":  # flash_bwd_convert_dq_tiled: 32-column units of the kernel's head dim
        return t["dq_accum"].shape[3]
    scale = p.softmax_scale
    return {"seqlen_q": p.seqlen_q, "seqlen_k": p.seqlen_k, "heads_q": p.heads_q, "group_size": p.group_size,
            "head_dim": t["q"].shape[3], "window_left": p.window[0], "window_right": p.window[1],
            "scale_log2": np.float32(scale * math.log2(math.e)), "softmax_scale": np.float32(scale)}[name]


def check_launch(record: tuple[int, ...], kernel: launch.Launch, t: dict[str, FakeArray], p: Problem) -> None:
    """Reads the parameters as cuLaunchKernel would (a void** of len(signature) addresses, each
    read with its C++ type's width) and compares them with the signature's names."""
    function_ptr, gx, gy, gz, bx, by, bz, smem, stream, params, extra = record
    assert (function_ptr, (gx, gy, gz), (bx, by, bz), smem) == (kernel.function.ptr, kernel.grid, kernel.block,
                                                               kernel.smem)
    assert stream == STREAM and extra == 0
    signature = cuda_parameters(kernel.function.spec)
    assert len(kernel.args) == len(signature), f"{kernel.function.spec.entry}: argument count"
    addresses = (ctypes.c_uint64 * len(signature)).from_address(params)
    for (c_type, name), address, arg in zip(signature, addresses, kernel.args):
        where = f"{kernel.function.spec.entry}({name})"
        if c_type.endswith("*"):
            got = ctypes.c_uint64.from_address(address).value
            want = t[name].data.ptr if name in t else 0  # dq_accum: a null pointer when not accumulating
            assert arg == (name if name in t else np.uint64(0)), where
        else:
            assert type(arg) is NUMPY_TYPES[c_type], f"{where}: {type(arg).__name__} for {c_type}"
            got, want = C_TYPES[c_type].from_address(address).value, expected_value(name, t, p)
        assert got == want, f"{where} = {got}, expected {want}"


CASES = [  # (id, limits, head_dim, packed, options, deterministic)
    ("a100-mma-d64-causal", A100, 64, False, {"causal": True}, False),
    ("h100-wgmma-d128-packed", H100, 128, True, {}, False),
    ("h100-d64-window-atomic-dq", H100, 64, False, {"window_size": (3, 1), "softmax_scale": 0.3}, False),
    ("h100-d64-deterministic", H100, 64, True, {"causal": True}, True),
    ("a100-d256", A100, 256, False, {}, False),
]


@pytest.mark.parametrize("limits,head_dim,packed,options,deterministic", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_launch_matches_its_cuda_signature(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch,
                                                 limits: DeviceLimits, head_dim: int, packed: bool,
                                                 options: dict[str, Any], deterministic: bool) -> None:
    use_device(monkeypatch, limits)
    t = inputs(fake_cupy, head_dim, packed)
    p = problem_of(t, **options)
    forward = {name: t[name] for name in "qkv"}
    fwd = plan.build_forward(p, forward, 0)
    out, lse = fwd.launch(forward)
    assert (out.shape, lse.shape, lse.dtype) == (t["q"].shape, (p.batch, p.heads_q, p.seqlen_q), np.float32)
    (record,) = fake_cupy.launched
    check_launch(record, fwd.launches[0], forward, p)
    fake_cupy.launched.clear()
    bwd = plan.build_backward(p, t, deterministic, 0)
    bwd.launch(t)
    entries = [kernel.function.spec.entry for kernel in bwd.launches]
    hopper = limits is H100  # the wgmma dK/dV kernel, which always makes dQ with atomics
    assert entries[:2] == ["flash_bwd_delta", "flash_bwd_dkdv_sm90" if hopper else "flash_bwd_dkdv"]
    convert = "flash_bwd_convert_dq_tiled" if hopper else "flash_bwd_convert_dq"  # the sm90 kernel's own layout
    assert entries[2] == (convert if "dq_accum" in t else "flash_bwd_dq")
    if hopper and "dq_accum" in t:
        assert t["dq_accum"].shape == (p.batch, p.heads_q, -(-p.seqlen_q // 64), kernel_head_dim(head_dim) // 32,
                                       64, 32)
    # heuristics.MAX_ATOMIC_DQ_HEAD_DIM applies to mma.sync
    assert ("dq_accum" in t) == ((hopper or head_dim <= 64) and not deterministic)
    for record, kernel in zip(fake_cupy.launched, bwd.launches, strict=True):
        check_launch(record, kernel, t, p)


def test_a_repeat_run_rewrites_only_the_array_slots(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch) -> None:
    use_device(monkeypatch, H100)
    first, second = inputs(fake_cupy, 64), inputs(fake_cupy, 64)
    p = problem_of(first, causal=True)
    bwd = plan.build_backward(p, first, False, 0)
    before = [kernel.values.copy() for kernel in bwd.launches]
    bwd.run(second)  # allocates new gradients and temporaries into `second`
    for kernel, old in zip(bwd.launches, before):
        changed = {int(i) for i in np.flatnonzero(kernel.values != old)}
        assert changed == {index for index, _ in kernel.array_slots}
        assert all(kernel.values[i] == second[name].data.ptr for i, name in kernel.array_slots)


def test_zero_grids_are_not_launched(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch) -> None:
    use_device(monkeypatch, H100)
    t = inputs(fake_cupy, 64)
    t["q"] = fake_cupy.array(np.empty((B, 0, HQ, 64), np.float16))
    p = problem_of(t)
    assert plan.build_forward(p, {n: t[n] for n in "qkv"}, 0).launches == ()
    t["dout"] = t["out"] = t["q"]
    t["lse"] = fake_cupy.array(np.empty((B, HQ, 0), np.float32))
    bwd = plan.build_backward(p, t, True, 0)  # seqlen_q 0: delta and dQ have no rows; dK/dV writes zeros
    assert [kernel.function.spec.entry for kernel in bwd.launches] == ["flash_bwd_dkdv_sm90"]


# --- the key, and when a call may not use a plan ---

FWD_OPTIONS = (True, None, (-1, -1))  # causal, softmax_scale, window_size
DEFAULTS = (0.0, None, 0.0, None)  # softcap, alibi_slopes, dropout_p, seed


@pytest.fixture
def kept(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch) -> tuple[plan.Plan, tuple[FakeArray, ...]]:
    """A forward plan kept for fake CuPy arrays q, k, v (d64, causal) on device 0."""
    use_device(monkeypatch, H100)
    t = inputs(fake_cupy, 64)
    qkv = (t["q"], t["k"], t["v"])
    p = problem_of(t, causal=True)
    built = plan.build_forward(p, dict(zip("qkv", qkv)), 0)
    plan.keep(built, p, "fwd", qkv, FWD_OPTIONS, qkv, 0)
    return built, qkv


def test_a_kept_plan_serves_the_same_signature(kept) -> None:
    built, (q, k, v) = kept
    assert plan.find("fwd", (q, k, v), FWD_OPTIONS, DEFAULTS) is built
    assert plan.find("fwd", (q, k, v), (1, None, (-1, -1)), (0, None, 0, None)) is built  # equal values


def test_attention_runs_a_kept_plan(kept, fake_cupy: FakeCupy) -> None:
    _, (q, k, v) = kept
    fake_cupy.launched.clear()
    out, lse = cf.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, FakeArray) and out.shape == q.shape and lse.dtype == np.float32
    (record,) = fake_cupy.launched
    assert record[8] == STREAM


def moved(array: FakeArray, offset: int = 0, device_id: int = 0) -> FakeArray:
    twin = FakeArray(np.empty(0), array.data.ptr + offset, device_id)
    twin.shape, twin.strides, twin.dtype = array.shape, array.strides, array.dtype
    return twin


MISSES = [  # (id, change to (arrays, options, unsupported))
    ("numpy-inputs", lambda a, o, u: (tuple(np.empty(x.shape, x.dtype) for x in a), o, u)),
    ("misaligned-pointer", lambda a, o, u: ((moved(a[0], 8), *a[1:]), o, u)),
    ("array-on-another-device", lambda a, o, u: ((a[0], moved(a[1], device_id=1), a[2]), o, u)),
    ("other-strides", lambda a, o, u: ((a[0], a[1], FakeArray(np.empty((B, SK, 2 * HKV, 64), np.float16)[:, :, ::2],
                                                                   a[2].data.ptr)), o, u)),
    ("not-causal", lambda a, o, u: (a, (False, None, (-1, -1)), u)),
    ("softmax-scale", lambda a, o, u: (a, (True, 0.125, (-1, -1)), u)),
    ("unhashable-window", lambda a, o, u: (a, (True, None, [-1, -1]), u)),
    ("softcap", lambda a, o, u: (a, o, (30.0, None, 0.0, None))),
    ("ambiguous-softcap", lambda a, o, u: (a, o, (np.zeros(2), None, 0.0, None))),
    ("alibi", lambda a, o, u: (a, o, (0.0, np.ones(HQ, np.float32), 0.0, None))),
    ("dropout", lambda a, o, u: (a, o, (0.0, None, 0.1, None))),
    ("seed", lambda a, o, u: (a, o, (0.0, None, 0.0, 0))),
]


@pytest.mark.parametrize("change", [m[1] for m in MISSES], ids=[m[0] for m in MISSES])
def test_calls_a_plan_may_not_serve_take_the_full_path(kept, change) -> None:
    _, qkv = kept
    assert plan.find("fwd", *change(qkv, FWD_OPTIONS, DEFAULTS)) is None


def test_no_plan_on_another_current_device(kept, monkeypatch: pytest.MonkeyPatch) -> None:
    _, qkv = kept
    monkeypatch.setattr(plan, "current_device_id", lambda: 1)
    assert plan.find("fwd", qkv, FWD_OPTIONS, DEFAULTS) is None


def test_no_plan_inside_forced(kept) -> None:
    built, qkv = kept
    with selection.forced(fwd=TileConfig(64, 64, 4, 2)):
        assert plan.find("fwd", qkv, FWD_OPTIONS, DEFAULTS) is None
    assert plan.find("fwd", qkv, FWD_OPTIONS, DEFAULTS) is built


def test_plans_are_per_thread(kept) -> None:
    _, qkv = kept
    found = []
    thread = threading.Thread(target=lambda: found.append(plan.find("fwd", qkv, FWD_OPTIONS, DEFAULTS)))
    thread.start()
    thread.join()
    assert found == [None]


REFUSALS = [  # (id, change to (inputs, ready)) that keep() must not cache
    ("numpy-inputs", lambda a: (tuple(np.empty(x.shape, x.dtype) for x in a),) * 2),
    ("copied-by-kernel-ready", lambda a: (a, (moved(a[0]), *a[1:]))),
]


@pytest.mark.parametrize("change", [r[1] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_keep_refuses_inputs_that_did_not_reach_the_kernels_as_they_were(kept, change) -> None:
    built, qkv = kept
    plan.clear()
    problem = problem_of(dict(zip("qkv", qkv)), causal=True)
    inputs_, ready = change(qkv)
    plan.keep(built, problem, "fwd", inputs_, FWD_OPTIONS, ready, 0)
    assert not plan._local.plans


def test_keep_refuses_forced_configs_and_empty_problems(kept, fake_cupy: FakeCupy) -> None:
    built, qkv = kept
    plan.clear()
    problem = problem_of(dict(zip("qkv", qkv)), causal=True)
    with selection.forced(fwd=TileConfig(64, 64, 4, 2)):
        plan.keep(built, problem, "fwd", qkv, FWD_OPTIONS, qkv, 0)
    empty_k = fake_cupy.array(np.empty((B, 0, HKV, 64), np.float16))
    empty = (qkv[0], empty_k, empty_k)
    plan.keep(built, problem_of(dict(zip("qkv", empty))), "fwd", empty, FWD_OPTIONS, empty, 0)
    assert not plan._local.plans


def test_the_plan_cache_is_bounded(kept) -> None:
    built, qkv = kept
    problem = problem_of(dict(zip("qkv", qkv)), causal=True)
    for scale in range(plan.MAX_PLANS + 5):
        plan.keep(built, problem, "fwd", qkv, (True, 1.0 + scale, (-1, -1)), qkv, 0)
    assert 0 < len(plan._local.plans) <= plan.MAX_PLANS


# --- staleness: the tuning generation ---

def test_store_and_clear_change_the_generation_and_stale_the_plan(kept) -> None:
    built, qkv = kept
    bucket = tuning.bucket_key("fwd", problem_of(dict(zip("qkv", qkv)), causal=True), 64)
    before = tuning.generation()
    tuning.store(H100, bucket, TileConfig(64, 64, 4, 2), {})
    stored = tuning.generation()
    assert stored != before and not built.is_current()
    assert plan.find("fwd", qkv, FWD_OPTIONS, DEFAULTS) is None
    tuning.load_entries(H100)  # the new file, read once
    read = tuning.generation()
    tuning.load_entries(H100)  # unchanged: same generation
    assert tuning.generation() == read
    tuning.clear(H100)
    assert tuning.generation() != read


def test_a_file_written_by_another_process_is_noticed(kept, monkeypatch: pytest.MonkeyPatch) -> None:
    built, qkv = kept
    assert built.is_current()
    path = tuning.tuning_file(H100)
    bucket = tuning.bucket_key("fwd", problem_of(dict(zip("qkv", qkv)), causal=True), 64)
    entries = {bucket: {"config": TileConfig(64, 64, 4, 2).to_dict()}}
    path.write_text(tuning.json.dumps({"header": tuning.header(H100), "entries": entries}))
    os.utime(path, (1, 1))  # an mtime no earlier read saw
    assert built.is_current()  # not looked for before RECHECK_SECONDS
    monkeypatch.setattr(tuning, "RECHECK_SECONDS", 0.0)  # as if that much time had passed
    built.recheck_at = 0.0
    assert not built.is_current()


def test_a_new_tuning_folder_changes_the_generation(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path) -> None:
    tuning.store(H100, "fwd/float16/d64/causal/s128/gqa", TileConfig(64, 64, 4, 2), {})
    tuning.load_entries(H100)
    before = tuning.generation()
    monkeypatch.setenv("CUPYFLASH_TUNING_DIR", str(tmp_path / "elsewhere"))
    tuning.load_entries(H100)
    assert tuning.generation() != before
