"""The runtime build on a machine without a GPU: every variant the heuristics can pick compiles
with NVRTC for sm_80 and sm_90 without spilling registers; the kernels' shared-memory layout
agrees with each family's smem_bytes (each compile static_asserts it); the disk cache is keyed
on every kernel source and lets a second process skip NVRTC."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from types import SimpleNamespace

import pytest

from cupyflash import build, gpu_classes, plan
from cupyflash.device import DeviceLimits
from cupyflash.kernels import (flash_bwd_dkdv, flash_bwd_dkdv_sm90, flash_bwd_dq, flash_bwd_dq_sm90, flash_bwd_prep,
                               flash_decode, flash_fwd, flash_fwd_sm90, flash_fwd_tma, flash_merge)
from cupyflash.kernels.common import KERNEL_HEAD_DIMS, Variant
from cupyflash.plan import BwdConfig
from cupyflash.problem import Problem

# ptxas's C7519/C7520 "Potential Performance Loss": every wgmma of the kernel waits for the one
# before (a branch on the warpgroup around a wgmma did it once, 8c4baed). NVRTC 12.9 and 13.0 say so.
SERIALIZED_WGMMA = "wgmma.mma_async instructions are serialized"


def assert_built_clean(spec: build.KernelSpec, kernel: build.CompiledKernel) -> None:
    """ptxas spilled nothing and kept the kernel's wgmma asynchronous."""
    assert kernel.spill_bytes == 0, f"{spec} spills {kernel.spill_bytes} bytes:\n{kernel.log}"
    assert SERIALIZED_WGMMA not in kernel.log, f"{spec}: ptxas serialised its wgmma:\n{kernel.log}"

cupy = pytest.importorskip("cupy", reason="the build tests need CuPy's NVRTC bindings")

# The devices the heuristics must serve (gpu_classes.PROMISED); the 99 KB class is compiled for
# sm_86 here (RTX 3090, A10) and forced on sm_90 by the GPU tests, which covers sm_89's configs.
H100, A100 = gpu_classes.H100, gpu_classes.A100
RTX3090 = DeviceLimits("RTX 3090", (8, 6), 82, 101376, 102400)
TINY = DeviceLimits("tiny", (8, 6), 8, 48 * 1024, 64 * 1024)


# The kernel windows a call can have (Problem.window): none, causal, and both sides bounded (the
# general variant, which holds the most in registers).
WINDOWS = ((-1, -1), (-1, 0), (5, 5))
GENERAL = Variant(True, True, False)  # tests both window sides at run time
UNMASKED = Variant(False, False, False)


def _problem(dtype: str, head_dim: int, window: tuple[int, int] = (-1, -1)) -> Problem:
    return Problem(1, 100, 100, 2, 2, head_dim, dtype, window == (-1, 0), head_dim ** -0.5, window)


def heuristic_specs() -> list[tuple[str, build.KernelSpec]]:
    """Every kernel a call on these GPUs runs by default (plan.py's lists), both backward kinds,
    for each kind of window (each compiles its own variant)."""
    specs = []
    for limits in (H100, A100, RTX3090):
        for dtype in ("float16", "bfloat16"):
            for dim in KERNEL_HEAD_DIMS:
                for window in WINDOWS:
                    problem = _problem(dtype, dim, window)
                    calls = plan.forward_kernels(problem, plan.default_fwd_config(dim, limits))
                    for deterministic in (False, True):
                        calls += plan.backward_kernels(problem, plan.default_bwd_config(dim, limits), deterministic)
                    specs += [(limits.arch, call.spec) for call in calls]
            specs += [(limits.arch, flash_bwd_prep.spec(dtype, e, variant=UNMASKED)) for e in flash_bwd_prep.ENTRIES]
            specs.append((limits.arch, flash_merge.spec(dtype)))
            specs += decode_specs(limits, dtype)
    unique = {(arch, spec) for arch, spec in specs}
    return sorted(unique, key=lambda item: (item[0], item[1].source, item[1].defines))


def decode_specs(limits: DeviceLimits, dtype: str) -> list[tuple[str, build.KernelSpec]]:
    """attention_with_kvcache's kernels: each compiled head dim and block (1, 2, 4 row warps) as
    decoding runs them (causal), the other mask variants at head_dim 128, append and combine;
    where the GPU merges splits in a cluster, each block with 8 splits, and 2 and 4 at 128; the
    4-stage blocks of grids with one block per SM, alone and with 8 splits in a cluster; on sm_90,
    the bulk-copy blocks (flash_decode.bulk_copies) of both kinds of grid."""
    causal, arch = Variant(False, True, False), limits.arch
    specs = []
    for dim in flash_decode.KERNEL_HEAD_DIMS:
        for rows in (16, 32, 64):
            cfg = flash_decode.config(rows, dim, limits)
            if cfg is None:  # head_dim 256 on a 99 KB GPU: refused with a message (test_kvcache.py)
                continue
            variants = (causal, UNMASKED, GENERAL) if dim == 128 else (causal,)
            specs += [(arch, flash_decode.spec(dtype, dim, cfg, variant)) for variant in variants]
            clusters = [n for n in (flash_decode.CLUSTER_SPLITS if dim == 128 else flash_decode.CLUSTER_SPLITS[-1:])
                        if flash_decode.cluster_size(n, 1, 4 * n, limits)]  # a grid that allows each size
            specs += [(arch, flash_decode.spec(dtype, dim, cfg, causal, n)) for n in clusters]
            deeper = flash_decode.deeper_pipeline(cfg, dim, 1, limits)  # a grid of one block per SM
            if deeper != cfg:
                specs += [(arch, flash_decode.spec(dtype, dim, deeper, causal, n)) for n in [0, *clusters[-1:]]]
            # Bulk tensor copies: one block per SM (the most stages) and a full grid, contiguous and in
            # pages of 16 and 32 keys; with 8 splits in a cluster where the GPU has them.
            for blocks in (1, 10 ** 6):
                for box in (64, 16, 32):
                    bulk = flash_decode.bulk_copies(cfg, dim, box, blocks, limits)
                    if bulk.box_rows:
                        specs += [(arch, flash_decode.spec(dtype, dim, bulk, causal, n))
                                  for n in [0, *clusters[-1:]] if box == 64 or n == 0]
    specs += [(arch, flash_decode.helper_spec(dtype, e)) for e in (flash_decode.APPEND_ENTRY, flash_decode.COMBINE_ENTRY)]
    return specs


@pytest.mark.parametrize("arch,spec", heuristic_specs(),
                         ids=lambda x: x if isinstance(x, str) else f"{x.entry}-{'-'.join(v for _, v in x.defines)}")
def test_every_heuristic_variant_compiles_without_spills(arch: str, spec: build.KernelSpec) -> None:
    kernel = build.compile_kernel(spec, arch)
    assert kernel.cubin[:4] == b"\x7fELF", "NVRTC must produce a cubin (ELF), not PTX"
    assert_built_clean(spec, kernel)
    assert kernel.registers <= 255


def test_no_d256_backward_below_99_kb() -> None:
    """Below the promised classes, the error names the head dim and the device's limit."""
    with pytest.raises(RuntimeError, match="head_dim 256 fits tiny"):
        plan.default_bwd_config(256, TINY)


def test_smem_mismatch_is_caught_at_compile_time() -> None:
    config = flash_fwd.FwdConfig(128, 64, 8, 2)
    spec = flash_fwd.spec("float16", 128, config, variant=GENERAL)
    wrong = build.KernelSpec(spec.source, spec.entry, tuple(
        (name, str(int(value) + 16) if name == "CF_SMEM_BYTES" else value) for name, value in spec.defines))
    with pytest.raises(RuntimeError, match="smem_bytes"):
        build.compile_kernel(wrong, "sm_90")


DkdvConfig = flash_bwd_dkdv.DkdvConfig


@pytest.mark.parametrize("config,head_dim", [(DkdvConfig(64, 128, 8, 2, 1), 128), (DkdvConfig(32, 64, 8, 2, 2), 256),
                                             (DkdvConfig(64, 64, 4, 3, 1), 64)])
def test_dkdv_smem_arithmetic_matches_the_kernel(config: DkdvConfig, head_dim: int) -> None:
    build.compile_kernel(flash_bwd_dkdv.spec("bfloat16", head_dim, config, True, variant=GENERAL), "sm_80")


def test_dq_smem_arithmetic_matches_the_kernel() -> None:
    build.compile_kernel(flash_bwd_dq.spec("float16", 96, flash_bwd_dq.DqConfig(64, 32, 4, 3), variant=GENERAL),
                         "sm_80")


def test_source_hash_covers_headers(tmp_path, monkeypatch) -> None:
    for path in build.kernel_dir().glob("*.cu*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "kernel_dir", lambda: tmp_path)
    build.source_hash.cache_clear()
    try:
        before = build.source_hash()
        (tmp_path / "softmax.cuh").write_text((tmp_path / "softmax.cuh").read_text() + "\n// edited\n")
        build.source_hash.cache_clear()
        assert build.source_hash() != before, "editing an included header must change the cache key"
    finally:
        build.source_hash.cache_clear()


def test_disk_cache_second_process_skips_nvrtc(tmp_path) -> None:
    """The first process compiles and writes the cubin; a second process must load it without
    calling NVRTC (its compile_kernel is replaced by one that fails)."""
    script = textwrap.dedent("""
        import sys
        from cupyflash import build
        from cupyflash.kernels import flash_fwd
        from cupyflash.kernels.common import Variant
        spec = flash_fwd.spec("float16", 64, flash_fwd.FwdConfig(64, 64, 4, 2), variant=Variant(False, False, False))
        if sys.argv[1] == "second":
            def no_nvrtc(*args):
                raise AssertionError("NVRTC called although the disk cache has the cubin")
            build.compile_kernel = no_nvrtc
        kernel = build.cached_kernel(spec, "sm_90")
        print(len(kernel.cubin), kernel.registers)
    """)
    env = {"CUPYFLASH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    import os
    env = {**os.environ, **env}
    first = subprocess.run([sys.executable, "-c", script, "first"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", script, "second"], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    cubins = list((tmp_path / "kernels").glob("*.cubin"))
    assert len(cubins) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))


def test_corrupt_cache_entry_is_recompiled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CUPYFLASH_CACHE_DIR", str(tmp_path))
    spec = flash_bwd_prep.spec("float16", "flash_bwd_delta", variant=UNMASKED)
    good = build.cached_kernel(spec, "sm_80")
    meta = next((tmp_path / "kernels").glob("*.json"))
    meta.write_text("{ not json")
    with pytest.warns(build.CacheWarning, match="cache"):
        again = build.cached_kernel(spec, "sm_80")
    assert again.cubin == good.cubin


def test_compile_error_names_the_variant() -> None:
    spec = build.KernelSpec("flash_fwd.cu", "flash_fwd", (("CF_ELEMENT", "cf::Half"),))  # macros missing
    with pytest.raises(RuntimeError, match="flash_fwd.cu"):
        build.compile_kernel(spec, "sm_90")


@pytest.mark.parametrize("config", [
    BwdConfig(DkdvConfig(64, 128, 8, 2, 1), flash_bwd_dq.DqConfig(128, 64, 8, 2), dq_atomic=False),
    BwdConfig(flash_bwd_dkdv_sm90.Sm90DkdvConfig(64, 128, 3), flash_bwd_dq.DqConfig(128, 64, 8, 2)),
    flash_fwd.FwdConfig(128, 64, 4, 3), flash_fwd_sm90.Sm90FwdConfig(128, 64, 2),
    flash_fwd_tma.TmaFwdConfig(128, 3), flash_fwd_tma.TmaFwdConfig(64, 2, wide_pv=True)], ids=repr)
def test_configs_round_trip_json(config) -> None:
    import json

    again = plan.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and type(again) is type(config) and hash(again) == hash(config)


Sm90FwdConfig, Sm90DkdvConfig = flash_fwd_sm90.Sm90FwdConfig, flash_bwd_dkdv_sm90.Sm90DkdvConfig


@pytest.mark.parametrize("config,head_dim", [(Sm90FwdConfig(192, 64, 2), 128), (Sm90FwdConfig(128, 64, 2), 192),
                                             (Sm90FwdConfig(64, 128, 3), 64)])
def test_wgmma_smem_arithmetic_matches_the_kernel(config: Sm90FwdConfig, head_dim: int) -> None:
    spec = flash_fwd_sm90.spec("bfloat16", head_dim, config, variant=GENERAL)
    kernel = build.compile_kernel(spec, "sm_90")
    assert kernel.spill_bytes == 0
    assert "-arch=sm_90a" in spec.options("sm_90")


@pytest.mark.parametrize("head_dim,config", [(d, c) for d in KERNEL_HEAD_DIMS
                                             for c in flash_bwd_dkdv_sm90.candidates(d, H100)],
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.block_n}s{x.stages}")
@pytest.mark.parametrize("accum_dq", [True, False])
@pytest.mark.parametrize("variant", [UNMASKED, GENERAL, Variant(True, True, True)], ids=("unmasked", "windowed",
                                                                                       "windowed-varlen"))
def test_every_wgmma_dkdv_candidate_compiles_without_spills(head_dim: int, config: Sm90DkdvConfig,
                                                            accum_dq: bool, variant: Variant) -> None:
    spec = flash_bwd_dkdv_sm90.spec("float16", head_dim, config, accum_dq, variant=variant)
    kernel = build.compile_kernel(spec, "sm_90")  # static_asserts the family's smem arithmetic
    assert_built_clean(spec, kernel)
    assert "-arch=sm_90a" in spec.options("sm_90")


@pytest.mark.parametrize("head_dim,config", [(d, c) for d in KERNEL_HEAD_DIMS
                                             for c in flash_bwd_dq_sm90.candidates(d, H100)],
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.block_n}s{x.stages}")
@pytest.mark.parametrize("variant", [UNMASKED, GENERAL, Variant(True, True, True)], ids=("unmasked", "windowed",
                                                                                       "windowed-varlen"))
def test_every_wgmma_dq_candidate_compiles_without_spills(head_dim: int, config, variant: Variant) -> None:
    spec = flash_bwd_dq_sm90.spec("bfloat16", head_dim, config, variant=variant)
    kernel = build.compile_kernel(spec, "sm_90")  # static_asserts the family's smem arithmetic
    assert_built_clean(spec, kernel)
    assert "-arch=sm_90a" in spec.options("sm_90")


def tma_id(config) -> str:
    return (f"n{config.block_n}s{config.stages}{'p' if config.pingpong else ''}c{config.consumers}"
            f"{'w' if config.wide_pv else ''}")


@pytest.mark.parametrize("head_dim,config", [(d, c) for d in (32, 64, 96, 128, 160, 192, 256)
                                             for c in flash_fwd_tma.candidates(d, H100)],
                         ids=lambda x: f"d{x}" if isinstance(x, int) else tma_id(x))
@pytest.mark.parametrize("variant", [UNMASKED, GENERAL], ids=("unmasked", "windowed"))
def test_every_tma_forward_candidate_compiles_without_spills(head_dim: int, config, variant: Variant) -> None:
    spec = flash_fwd_tma.spec("bfloat16", head_dim, config, variant=variant)
    kernel = build.compile_kernel(spec, "sm_90")  # static_asserts the family's smem arithmetic
    assert_built_clean(spec, kernel)
    assert "-arch=sm_90a" in spec.options("sm_90")


def test_the_tma_forward_takes_no_packed_batch() -> None:
    assert flash_fwd_tma.unsupported(SimpleNamespace(varlen=True)) and not flash_fwd_tma.unsupported(
        SimpleNamespace(varlen=False))
    with pytest.raises(ValueError, match="variable-length"):
        flash_fwd_tma.spec("bfloat16", 128, flash_fwd_tma.TmaFwdConfig(128, 2), variant=Variant(False, False, True))
    assert not flash_fwd_tma.TmaFwdConfig(128, 2).fits(128, A100)


def test_tma_forward_warpgroup_rules_name_the_rule() -> None:
    three = flash_fwd_tma.TmaFwdConfig(128, 2, consumers=3)
    assert three.block_m == 192 and three.threads == 512 and not three.problems(64)
    assert any("only up to head_dim 64" in r for r in three.problems(96))
    assert any("exactly 2" in r for r in flash_fwd_tma.TmaFwdConfig(128, 2, True, 3).problems(64))
    assert any("must be 2 or 3" in r for r in flash_fwd_tma.TmaFwdConfig(128, 2, consumers=4).problems(64))


def test_wgmma_dkdv_runs_on_sm90_only() -> None:
    config = Sm90DkdvConfig(64, 128, 2)
    assert config.fits(128, H100) and not config.fits(128, A100)
    assert not config.fits(256, H100) and config.problems(256)  # 256 shares 64 keys per block
    assert Sm90DkdvConfig(64, 64, 2).fits(256, H100)
    assert Sm90DkdvConfig(64, 64, 2).problems(128)


@pytest.mark.parametrize("head_dim,tile", [(32, 64), (64, 64), (96, 128), (128, 128), (160, 256), (192, 256),
                                           (256, 256)])
def test_wgmma_dkdv_runs_each_head_dim_in_tiles_of_whole_slabs(head_dim: int, tile: int) -> None:
    """Head dims between 64, 128 and 256 take the shared memory, registers and keys per block of
    the next of those up; dQ keeps its own head dim's units (the accumulator is no wider)."""
    assert flash_bwd_dkdv_sm90.tile_dim(head_dim) == tile
    config = flash_bwd_dkdv_sm90.default(tile, H100)
    assert config in flash_bwd_dkdv_sm90.candidates(head_dim, H100)
    assert config.block_n == (64 if tile == 256 else 128)
    assert config.smem_bytes(head_dim) == config.smem_bytes(tile)
    assert config.acc_floats(head_dim) == config.acc_floats(tile)
    problem = Problem(2, 130, 70, 4, 2, head_dim, "bfloat16", False, head_dim ** -0.5, (-1, -1))
    assert config.dq_accum_shape(problem) == (2, 4, 3, head_dim // 32, 64, 32)


def _layout_with(monkeypatch: pytest.MonkeyPatch, struct: str, fields: tuple, constants: dict | None = None) -> None:
    """Make every compile check the kernels against a launch.py whose `struct` has `fields`."""
    from cupyflash import launch

    structs = {**launch.STRUCTS, struct: fields}
    monkeypatch.setattr(launch, "STRUCTS", structs)
    monkeypatch.setattr(launch, "DTYPES", {name: launch._dtype(name) for name in structs})
    monkeypatch.setattr(launch, "CONSTANTS", constants or launch.CONSTANTS)
    text = launch.host_layout.__wrapped__()
    monkeypatch.setattr(launch, "host_layout", lambda: text)


def _swapped(fields: tuple, a: str, b: str) -> tuple:
    names = [name for name, _ in fields]
    i, j = names.index(a), names.index(b)
    swapped = list(fields)
    swapped[i], swapped[j] = fields[j], fields[i]
    return tuple(swapped)


@pytest.mark.parametrize("struct,change,message", [
    ("FwdParams", lambda f: _swapped(f, "seqlen_q", "seqlen_k"), "FwdParams.seqlen_q is not where"),
    ("BwdParams", lambda f: _swapped(f, "delta", "dq_accum"), "BwdParams.delta is not where"),
    ("FwdParams", lambda f: f[:-1], "size or alignment of FwdParams"),
    ("NextFeatures", lambda f: tuple((n, "cf::i64" if n == "page_size" else k) for n, k in f),
     "NextFeatures.page_size is not of the type"),
], ids=["two-ints-swapped", "two-pointers-swapped", "field-missing", "wrong-type"])
def test_a_layout_that_differs_from_params_cuh_does_not_compile(monkeypatch: pytest.MonkeyPatch, struct: str,
                                                                change, message: str) -> None:
    from cupyflash import launch

    _layout_with(monkeypatch, struct, change(launch.STRUCTS[struct]))
    with pytest.raises(RuntimeError, match=message):
        build.compile_kernel(flash_bwd_prep.spec("float16", "flash_bwd_delta", variant=UNMASKED), "sm_80")


def test_a_constant_that_differs_from_params_cuh_does_not_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupyflash import launch

    _layout_with(monkeypatch, "Tensor16", launch.STRUCTS["Tensor16"], {**launch.CONSTANTS, "kDeltaRows": 32})
    with pytest.raises(RuntimeError, match="kDeltaRows differs"):
        build.compile_kernel(flash_bwd_prep.spec("float16", "flash_bwd_delta", variant=UNMASKED), "sm_80")
