"""Launch plans without a GPU: the packed kernel parameters, read back the way cuLaunchKernel
reads them and checked against each kernel's C++ signature; the plan key and every reason a
call must take the full path; the tuning generation that makes plans stale.

A fake CuPy stands in for the device: arrays are NumPy layouts at made-up device addresses,
kernels are never loaded, and launchKernel only records its arguments.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import threading
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import build, launch, plan, tma, tuning, varlen
from cupyflash.kernels.common import kernel_head_dim
from cupyflash.kernels.flash_fwd import FwdConfig
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
    # A tensor map is the driver's to encode; the fake one holds its array's address 16 times.
    monkeypatch.setattr(tma, "encode", lambda tmap, address: address.to_bytes(8, "little") * 16)
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


# --- the parameter block ---

@functools.lru_cache(maxsize=None)  # read once: every launch of every case is checked through it
def header_structs() -> dict[str, type]:
    """The structs of kernels_cu/params.cuh as ctypes Structures, parsed from the header itself
    (not from launch.py): ctypes lays them out by the platform's C rules, as nvcc does."""
    text = (build.kernel_dir() / "params.cuh").read_text()
    scalars = {"u16*": ctypes.c_uint64, "float*": ctypes.c_uint64, "int*": ctypes.c_uint64, "u64*": ctypes.c_uint64,
               "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "int": ctypes.c_int32, "float": ctypes.c_float}
    structs: dict[str, type] = {}
    for name, body in re.findall(r"^struct (\w+) \{\n(.*?)^\};", text, re.S | re.M):
        if "static constexpr" in body:  # a type trait of the layout checks, not a parameter struct
            continue
        fields = []
        for line in body.splitlines():
            code = line.split("//")[0].strip()
            if not code:
                continue
            match = re.fullmatch(r"(?:const )?(\w+\*?) ([\w, ]+);", code.replace(" *", "*"))
            assert match, f"params.cuh: cannot read {code!r} of {name}"
            kind = structs.get(match.group(1)) or scalars[match.group(1)]
            fields += [(field.strip(), kind) for field in match.group(2).split(",")]
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return structs


def test_launch_py_mirrors_the_header_layout() -> None:
    """Every field of every struct at the same offset with the same size, and the same sizes."""
    assert set(header_structs()) == set(launch.DTYPES)
    for name, struct in header_structs().items():
        dtype = launch.DTYPES[name]
        assert ctypes.sizeof(struct) == dtype.itemsize, name
        assert [f for f, _ in struct._fields_] == list(dtype.names), f"{name}: fields or their order"
        for field, _ in struct._fields_:
            assert getattr(struct, field).offset == dtype.fields[field][1], f"{name}.{field}"
            assert getattr(struct, field).size == dtype.fields[field][0].itemsize, f"{name}.{field}"


def expected_fields(t: dict[str, FakeArray], p: Problem, struct: str) -> dict[str, Any]:
    """What each field the kernels read must hold, from the arrays and the problem."""
    scale = p.softmax_scale
    want: dict[str, Any] = {
        "batch": p.batch, "seqlen_q": p.seqlen_q, "seqlen_k": p.seqlen_k, "heads_q": p.heads_q,
        "group_size": p.group_size, "head_dim": t["q"].shape[3], "window_left": p.window[0],
        "window_right": p.window[1], "scale_log2": np.float32(scale * math.log2(math.e)), "lse": t["lse"].data.ptr}
    tensors = ("q", "k", "v", "out") if struct == "FwdParams" else ("q", "k", "v", "out", "dout", "dq", "dk", "dv")
    for name in tensors:
        array = t[name]
        want[name] = (array.data.ptr, *(stride // array.itemsize for stride in array.strides[:3]))
    if struct == "BwdParams":
        accum = t.get("dq_accum")
        want.update(delta=t["delta"].data.ptr, lse_log2=t["lse_log2"].data.ptr, dq_accum=0 if accum is None else accum.data.ptr,
                    softmax_scale=np.float32(scale), dq_accum_head_dim=kernel_head_dim(p.head_dim))
        strides = (0, 0, 0) if accum is None or accum.ndim != 4 else (s // 4 for s in accum.strides[:3])
        for kind, value in zip(("batch", "row", "head"), strides):
            want[f"dq_accum_{kind}_stride"] = value
    return want


def check_launch(record: tuple[int, ...], kernel: launch.Launch, t: dict[str, FakeArray], p: Problem) -> None:
    """Reads the parameter block as cuLaunchKernel would (a void** whose one address points at
    the struct), through the header's layout, and compares every field with what it must hold."""
    function_ptr, gx, gy, gz, bx, by, bz, smem, stream, params, extra = record
    assert (function_ptr, (gx, gy, gz), (bx, by, bz), smem) == (kernel.function.ptr, kernel.grid, kernel.block,
                                                               kernel.smem)
    assert stream == STREAM and extra == 0
    source = (build.kernel_dir() / kernel.function.spec.source).read_text()
    signature = re.search(rf"\b{kernel.function.spec.entry}\(const __grid_constant__ cf::(\w+) p(, const "
                          rf"__grid_constant__ cf::FwdTensorMaps maps)?\)", source)
    struct = signature.group(1)
    block_params = kernel.params.block if signature.group(2) else kernel.params
    assert struct == block_params.struct, f"{kernel.function.spec.entry} takes {struct}"
    block = header_structs()[struct].from_address(ctypes.c_uint64.from_address(params).value)
    if signature.group(2):  # the second argument: q, k and v's maps, in FwdTensorMaps' order
        maps = ctypes.c_uint64.from_address(params + 8).value
        assert maps % 64 == 0
        assert [ctypes.c_uint64.from_address(maps + 128 * i).value for i in range(3)] == [
            t[name].data.ptr for name in "qkv"]
    for name, want in expected_fields(t, p, struct).items():
        got = getattr(block, name)
        if isinstance(want, tuple):
            got = (got.ptr, got.batch_stride, got.row_stride, got.head_stride)
        assert got == want, f"{kernel.function.spec.entry}: {struct}.{name} = {got}, expected {want}"
    features = block.next
    assert all(getattr(features, f) == 0 for f, _ in features._fields_), "NextFeatures must be zero"
    # A variant compiled without a window side ignores that side of the block (mask.cuh): each
    # masked kernel must be compiled for exactly the sides the block bounds.
    macros = dict(kernel.function.spec.defines)
    if "CF_WINDOW_LEFT" in macros or "mask.cuh" in source:
        assert (macros["CF_WINDOW_LEFT"], macros["CF_WINDOW_RIGHT"]) == (
            str(int(block.window_left >= 0)), str(int(block.window_right >= 0))), kernel.function.spec


CASES = [  # (id, limits, head_dim, packed, options, deterministic)
    ("a100-mma-d64-causal", A100, 64, False, {"causal": True}, False),
    ("h100-wgmma-d128-packed", H100, 128, True, {}, False),
    ("h100-d64-window-atomic-dq", H100, 64, False, {"window_size": (3, 1), "softmax_scale": 0.3}, False),
    ("h100-d64-deterministic", H100, 64, True, {"causal": True}, True),
    ("a100-d256", A100, 256, False, {}, False),
    ("a100-d40-padded", A100, 40, False, {}, False),
]


@pytest.mark.parametrize("limits,head_dim,packed,options,deterministic", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_launch_reads_the_right_parameters(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch,
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
    assert entries == [call.spec.entry for call in plan.backward_kernels(p, plan.choose("bwd", p, limits),
                                                                         deterministic)]
    hopper = limits is H100 and head_dim in (64, 128, 256)  # the wgmma dK/dV kernel: always atomic dQ
    assert entries[:2] == ["flash_bwd_delta", "flash_bwd_dkdv_sm90" if hopper else "flash_bwd_dkdv"]
    convert = "flash_bwd_convert_dq_tiled" if hopper else "flash_bwd_convert_dq"  # the sm90 kernel's own layout
    dq_pass = "flash_bwd_dq_sm90" if limits is H100 else "flash_bwd_dq"  # deterministic=True's dQ
    assert entries[2] == (convert if "dq_accum" in t else dq_pass)
    if hopper and "dq_accum" in t:
        assert t["dq_accum"].shape == (p.batch, p.heads_q, -(-p.seqlen_q // 64), kernel_head_dim(head_dim) // 32,
                                       64, 32)
    # flash_bwd_dkdv.MAX_ATOMIC_DQ_HEAD_DIM applies to mma.sync
    assert ("dq_accum" in t) == ((hopper or head_dim <= 64) and not deterministic)
    for record, kernel in zip(fake_cupy.launched, bwd.launches, strict=True):
        check_launch(record, kernel, t, p)


def test_a_repeat_run_rewrites_only_the_pointers(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch) -> None:
    use_device(monkeypatch, H100)
    first, second = inputs(fake_cupy, 64), inputs(fake_cupy, 64)
    p = problem_of(first, causal=True)
    bwd = plan.build_backward(p, first, False, 0)
    assert all(kernel.params is bwd.params for kernel in bwd.launches), "one block per plan"
    before = bwd.params.words.copy()
    bwd.run(second)  # allocates new gradients and temporaries into `second`
    changed = {int(i) for i in np.flatnonzero(bwd.params.words != before)}
    assert changed == {index for index, _ in bwd.params.array_slots}
    assert all(bwd.params.words[i] == second[name].data.ptr for i, name in bwd.params.array_slots)


def test_a_field_that_does_not_fit_its_type_raises() -> None:
    block = launch.ParamBlock("FwdParams")
    with pytest.raises(OverflowError):
        block.set(seqlen_q=2**31)


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
    assert plan.find("fwd", (q, k, v), FWD_OPTIONS, (0, None, 0, None)) is built  # int zeros: no softcap, no dropout


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
    # Equal values of other types: the full path checks them (it rejects a bool softmax_scale,
    # softcap or dropout_p, and True == 1.0, hash(True) == hash(1.0) in a dict key).
    ("bool-softcap", lambda a, o, u: (a, o, (False, None, 0.0, None))),
    ("bool-dropout", lambda a, o, u: (a, o, (0.0, None, False, None))),
    ("numpy-bool-dropout", lambda a, o, u: (a, o, (0.0, None, np.False_, None))),
]


def test_a_plan_for_scale_1_does_not_serve_scale_true(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch) -> None:
    """True == 1.0 and hash(True) == hash(1.0): the key holds the options' types too, so
    softmax_scale=True takes the full path, which rejects it, even after a call with 1.0."""
    use_device(monkeypatch, H100)
    t = inputs(fake_cupy, 64)
    qkv = (t["q"], t["k"], t["v"])
    p = problem_of(t, causal=True)
    built = plan.build_forward(p, dict(zip("qkv", qkv)), 0)
    plan.keep(built, p, "fwd", qkv, (True, 1.0, (-1, -1)), qkv, 0)
    assert plan.find("fwd", qkv, (True, 1.0, (-1, -1)), DEFAULTS) is built
    assert plan.find("fwd", qkv, (True, True, (-1, -1)), DEFAULTS) is None
    # The checks' own memo likewise: a problem checked with 1.0 does not answer for True.
    problem_of(t, causal=True, softmax_scale=1.0)
    with pytest.raises(TypeError, match="softmax_scale must be a number; got True"):
        problem_of(t, causal=True, softmax_scale=True)


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
    with plan.forced(fwd=FwdConfig(64, 64, 4, 2)):
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
    with plan.forced(fwd=FwdConfig(64, 64, 4, 2)):
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
    tuning.store(H100, bucket, FwdConfig(64, 64, 4, 2), {})
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
    entries = {bucket: {"config": FwdConfig(64, 64, 4, 2).to_dict()}}
    path.write_text(tuning.json.dumps({"header": tuning.header(H100), "entries": entries}))
    os.utime(path, (1, 1))  # an mtime no earlier read saw
    assert built.is_current()  # not looked for before RECHECK_SECONDS
    monkeypatch.setattr(tuning, "RECHECK_SECONDS", 0.0)  # as if that much time had passed
    built.recheck_at = 0.0
    assert not built.is_current()


def test_a_new_tuning_folder_changes_the_generation(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path) -> None:
    tuning.store(H100, "fwd/float16/d64/causal/s128/gqa", FwdConfig(64, 64, 4, 2), {})
    tuning.load_entries(H100)
    before = tuning.generation()
    monkeypatch.setenv("CUPYFLASH_TUNING_DIR", str(tmp_path / "elsewhere"))
    tuning.load_entries(H100)
    assert tuning.generation() != before


# --- packed variable-length batches ---

@pytest.mark.parametrize("limits,deterministic", [(H100, False), (A100, False), (A100, True)],
                         ids=["h100-atomic", "a100-atomic", "a100-deterministic"])
def test_a_packed_batch_reaches_every_kernel_as_offsets(fake_cupy: FakeCupy, monkeypatch: pytest.MonkeyPatch,
                                                        limits: DeviceLimits, deterministic: bool) -> None:
    """Batch strides 0, the offsets' pointers and the totals in NextFeatures, every kernel
    compiled with CF_VARLEN, grids sized by max_seqlen, lse/delta (heads_q, total_q)."""
    use_device(monkeypatch, limits)
    total_q, total_k, batch, max_q, max_k = 40, 33, 3, 20, 17
    host = {"q": np.empty((total_q, HQ, 64), np.float16), "k": np.empty((total_k, HKV, 64), np.float16)}
    host["v"] = host["k"].copy()
    offsets = {"cu_seqlens_q": np.array([0, 20, 20, 40], np.int32), "cu_seqlens_k": np.array([0, 17, 30, 33], np.int32),
               "seqused_k": np.array([17, 13, 1], np.int32)}
    p = varlen.problem_of(host["q"], host["k"], host["v"], offsets, max_q, max_k, causal=True, softmax_scale=None,
                          window_size=(-1, -1))
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k, p.varlen) == (batch, max_q, max_k, 40, 33, True)
    t = {name: fake_cupy.array(array[None]) for name, array in host.items()}
    t.update({name: fake_cupy.array(array) for name, array in offsets.items()})
    fwd = plan.build_forward(p, t, 0)
    fwd.launch(t)
    assert t["lse"].shape == (HQ, total_q)
    t.update(dout=fake_cupy.array(host["q"][None]), out=t["out"])
    zeros = fake_cupy.zeros = lambda shape, dtype: fake_cupy.empty(shape, dtype)  # told apart from empty
    bwd = plan.build_backward(p, t, deterministic, 0)
    bwd.launch(t)
    # keys past seqused_k or past cu_seqlens_k[-1] are zeroed by their own kernel first, one block
    # row per run of them (after each sequence, after the last); dk, dv are not allocated zeroed
    assert [b.name for b in bwd.buffers if b.allocate is zeros] == (["dq_accum"] if "dq_accum" in t else [])
    zero = bwd.launches[0]
    assert (zero.function.spec.entry, zero.grid, zero.block) == (
        "flash_bwd_zero_unused_keys", (launch.ZERO_BLOCKS_PER_GAP, batch + 1, 1), (launch.ZERO_THREADS, 1, 1))
    assert t["delta"].shape == (HQ, total_q)
    for kernel in (*fwd.launches, *bwd.launches):
        assert dict(kernel.function.spec.defines)["CF_VARLEN"] == "1", kernel.function.spec
        assert kernel.grid[2] in (1, batch), kernel.grid  # only the flat dQ conversion has one z
    for record, kernel in zip(fake_cupy.launched, (*fwd.launches, *bwd.launches), strict=True):
        block = header_structs()[kernel.params.struct].from_address(ctypes.c_uint64.from_address(record[9]).value)
        features = block.next
        assert (features.total_q, features.total_k) == (total_q, total_k)
        assert [features.cu_seqlens_q, features.cu_seqlens_k, features.seqused_k] == [
            t[name].data.ptr for name in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k")]
        assert (block.batch, block.seqlen_q, block.seqlen_k) == (batch, max_q, max_k)
        tensors = ("q", "k", "v", "out") if kernel.params.struct == "FwdParams" else (
            "q", "k", "v", "out", "dout", "dq", "dk", "dv")
        for name in tensors:
            view = getattr(block, name)
            assert (view.ptr, view.batch_stride) == (t[name].data.ptr, 0), name
            assert (view.row_stride, view.head_stride) == tuple(s // 2 for s in t[name].strides[1:3]), name
    if "dq_accum" in t and limits is H100:  # DqUnits of a packed batch: room for a unit start per sequence
        assert t["dq_accum"].shape == (HQ, -(-(total_q + 64 * batch) // 64), 2, 64, 32)
    elif "dq_accum" in t:
        assert t["dq_accum"].shape == (1, total_q, HQ, 64)


def test_arrays_a_tensor_map_cannot_describe_take_the_cp_async_forward(fake_cupy: FakeCupy,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """flash_fwd_tma reads q, k, v through tensor maps, whose strides must be multiples of 16
    bytes. A q whose rows lie 136 bytes apart (a view of 68-wide rows) has none: the plan runs
    the Hopper forward that copies with cp.async instead, and reads the same parameters."""
    use_device(monkeypatch, H100)
    t = inputs(fake_cupy, 64)
    wide = fake_cupy.array(np.empty((B, SQ, HQ, 68), np.float16))
    view = np.empty((B, SQ, HQ, 68), np.float16)[..., :64]
    t["q"] = FakeArray(view, wide.data.ptr)
    assert t["q"].strides[2] == 136
    p = problem_of(t)
    forward = {name: t[name] for name in "qkv"}
    fwd = plan.build_forward(p, forward, 0)
    assert [kernel.function.spec.entry for kernel in fwd.launches] == ["flash_fwd_sm90"]
    assert isinstance(fwd.params, launch.ParamBlock)
    fwd.launch(forward)
    (record,) = fake_cupy.launched
    check_launch(record, fwd.launches[0], forward, p)
    with plan.forced(fwd=plan.default_fwd_config(64, H100)), pytest.raises(ValueError, match="strides"):
        plan.build_forward(p, forward, 0)
