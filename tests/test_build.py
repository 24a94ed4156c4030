"""The runtime build on a machine without a GPU: every variant the heuristics can pick compiles
with NVRTC for sm_80 and sm_90 without spilling registers; the kernels' shared-memory layout
agrees with config.py (each compile static_asserts it); the disk cache is keyed on every
kernel source and lets a second process skip NVRTC."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cupyflash import build, gpu_classes, heuristics, launch
from cupyflash.config import KERNEL_HEAD_DIMS, BwdConfig, DkdvConfig, TileConfig, dkdv_candidates
from cupyflash.device import DeviceLimits

cupy = pytest.importorskip("cupy", reason="the build tests need CuPy's NVRTC bindings")

# The devices the heuristics must serve (gpu_classes.PROMISED); the 99 KB class is compiled for
# sm_86 here (RTX 3090, A10) and forced on sm_90 by the GPU tests, which covers sm_89's configs.
H100, A100 = gpu_classes.H100, gpu_classes.A100
RTX3090 = DeviceLimits("RTX 3090", (8, 6), 82, 101376, 102400)
TINY = DeviceLimits("tiny", (8, 6), 8, 48 * 1024, 64 * 1024)


def heuristic_specs() -> list[tuple[str, build.KernelSpec]]:
    specs = []
    for limits in (H100, A100, RTX3090):
        for dtype in ("float16", "bfloat16"):
            for dim in KERNEL_HEAD_DIMS:
                specs.append((limits.arch, launch.fwd_spec(dtype, dim, heuristics.default_fwd_config(dim, limits))))
                bwd = heuristics.default_bwd_config(dim, limits)
                specs += [(limits.arch, launch.dkdv_spec(dtype, dim, bwd.dkdv, False)),
                          (limits.arch, launch.dq_spec(dtype, dim, bwd.dq))]
                if bwd.dq_atomic:
                    specs.append((limits.arch, launch.dkdv_spec(dtype, dim, bwd.dkdv, True)))
            specs += [(limits.arch, launch.prep_spec(dtype, e))
                      for e in ("flash_bwd_delta", "flash_bwd_convert_dq", "flash_bwd_convert_dq_tiled")]
    unique = {(arch, spec) for arch, spec in specs}
    return sorted(unique, key=lambda item: (item[0], item[1].source, item[1].defines))


@pytest.mark.parametrize("arch,spec", heuristic_specs(),
                         ids=lambda x: x if isinstance(x, str) else f"{x.entry}-{'-'.join(v for _, v in x.defines)}")
def test_every_heuristic_variant_compiles_without_spills(arch: str, spec: build.KernelSpec) -> None:
    kernel = build.compile_kernel(spec, arch)
    assert kernel.cubin[:4] == b"\x7fELF", "NVRTC must produce a cubin (ELF), not PTX"
    assert kernel.spill_bytes == 0, f"{spec} spills {kernel.spill_bytes} bytes:\n{kernel.log}"
    assert kernel.registers <= 255


def test_no_d256_backward_below_99_kb() -> None:
    """Below the promised classes, the error names the head dim and the device's limit."""
    with pytest.raises(RuntimeError, match="head_dim 256 fits tiny"):
        heuristics.default_bwd_config(256, TINY)


def test_smem_mismatch_is_caught_at_compile_time() -> None:
    config = TileConfig(128, 64, 8, 2)
    spec = launch.fwd_spec("float16", 128, config)
    wrong = build.KernelSpec(spec.source, spec.entry, tuple(
        (name, str(int(value) + 16) if name == "CF_SMEM_BYTES" else value) for name, value in spec.defines))
    with pytest.raises(RuntimeError, match="smem_bytes"):
        build.compile_kernel(wrong, "sm_90")


@pytest.mark.parametrize("config,head_dim", [(DkdvConfig(64, 128, 8, 2, 1), 128), (DkdvConfig(32, 64, 8, 2, 2), 256),
                                             (DkdvConfig(64, 64, 4, 3, 1), 64)])
def test_dkdv_smem_arithmetic_matches_the_kernel(config: DkdvConfig, head_dim: int) -> None:
    build.compile_kernel(launch.dkdv_spec("bfloat16", head_dim, config, True), "sm_80")


def test_dq_smem_arithmetic_matches_the_kernel() -> None:
    build.compile_kernel(launch.dq_spec("float16", 96, TileConfig(64, 32, 4, 3)), "sm_80")


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
        from cupyflash import build, launch
        from cupyflash.config import TileConfig
        spec = launch.fwd_spec("float16", 64, TileConfig(64, 64, 4, 2))
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
    spec = launch.prep_spec("float16", "flash_bwd_delta")
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


def test_bwd_config_round_trips_json() -> None:
    config = BwdConfig(DkdvConfig(64, 128, 8, 2, 1), TileConfig(128, 64, 8, 2), dq_atomic=False)
    assert BwdConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(BwdConfig.from_dict(config.to_dict()))


@pytest.mark.parametrize("config,head_dim", [(TileConfig(192, 64, 12, 2, wgmma=True), 128),
                                             (TileConfig(128, 64, 8, 2, wgmma=True), 192),
                                             (TileConfig(64, 128, 4, 3, wgmma=True), 64)])
def test_wgmma_smem_arithmetic_matches_the_kernel(config: TileConfig, head_dim: int) -> None:
    kernel = build.compile_kernel(launch.fwd_spec("bfloat16", head_dim, config), "sm_90")
    assert kernel.spill_bytes == 0
    assert "-arch=sm_90a" in launch.fwd_spec("bfloat16", head_dim, config).options("sm_90")


@pytest.mark.parametrize("head_dim,config", [(d, c) for d in (64, 128, 256) for c in dkdv_candidates(d, H100) if c.wgmma],
                         ids=lambda x: f"d{x}" if isinstance(x, int) else f"{x.block_m}x{x.num_warps}w{x.stages}s")
@pytest.mark.parametrize("accum_dq", [True, False])
def test_every_wgmma_dkdv_candidate_compiles_without_spills(head_dim: int, config: DkdvConfig, accum_dq: bool) -> None:
    spec = launch.dkdv_spec("float16", head_dim, config, accum_dq)
    kernel = build.compile_kernel(spec, "sm_90")  # static_asserts config.py's smem arithmetic
    assert kernel.spill_bytes == 0, f"{spec} spills {kernel.spill_bytes} bytes:\n{kernel.log}"
    assert "-arch=sm_90a" in spec.options("sm_90")


def test_wgmma_dkdv_runs_on_sm90_only() -> None:
    config = DkdvConfig(64, 128, 8, 2, 1, wgmma=True)
    assert config.fits(128, H100) and not config.fits(128, A100)
    assert not config.fits(256, H100) and config.problems(256)  # 256 shares 64 keys per block
    assert DkdvConfig(64, 64, 8, 2, 1, wgmma=True).fits(256, H100)
    assert DkdvConfig(64, 64, 4, 2, 1, wgmma=True).problems(128)
