"""Config feasibility and the heuristic tables against fake device limits (no GPU needed)."""

from __future__ import annotations

import pytest

from cupyflash import autotune, config, gpu_classes, heuristics
from cupyflash.config import KERNEL_HEAD_DIMS, DkdvConfig, TileConfig
from cupyflash.device import DeviceLimits

H100 = gpu_classes.H100
TINY = DeviceLimits("tiny", (8, 6), 8, 48 * 1024, 64 * 1024)


@pytest.mark.parametrize("limits", gpu_classes.PROMISED, ids=lambda l: l.name)
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS)
def test_candidates_all_fit(limits: DeviceLimits, head_dim: int) -> None:
    """Every promised GPU class has autotune candidates for every pass, and each one fits."""
    fwd = config.fwd_candidates(head_dim, limits)
    dkdv = config.dkdv_candidates(head_dim, limits)
    dq = config.dq_candidates(head_dim, limits)
    assert fwd and dkdv and dq, (len(fwd), len(dkdv), len(dq))
    for cfg in fwd:
        assert cfg.smem_bytes(head_dim) <= limits.smem_per_block_optin and not cfg.problems(head_dim), cfg
    for cfg in dkdv:
        assert cfg.smem_bytes(head_dim) <= limits.smem_per_block_optin and not cfg.problems(head_dim), cfg
    for cfg in dq:
        assert cfg.smem_bytes(head_dim, "dq") <= limits.smem_per_block_optin and not cfg.problems(head_dim), cfg


@pytest.mark.parametrize("limits", gpu_classes.PROMISED, ids=lambda l: l.name)
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS)
def test_every_promised_gpu_has_default_configs(limits: DeviceLimits, head_dim: int) -> None:
    """The README promises head_dim up to 256 forward and backward from sm_80 on: the heuristic
    tables give each (GPU class, head dim, pass) a config that fits (the 99 KB class at d256 was
    missing its backward)."""
    fwd = heuristics.default_fwd_config(head_dim, limits)
    bwd = heuristics.default_bwd_config(head_dim, limits)
    assert fwd.fits(head_dim, limits) and bwd.fits(head_dim, limits)
    if limits.compute_capability != (9, 0):
        assert not fwd.wgmma and not bwd.dkdv.wgmma


def test_smaller_device_prunes_more() -> None:
    assert len(config.fwd_candidates(256, TINY)) < len(config.fwd_candidates(256, H100))
    assert config.fwd_candidates(256, TINY) == []  # no head_dim 256 forward fits 48 KB
    with pytest.raises(RuntimeError, match="no built-in forward config for head_dim 256 fits tiny"):
        heuristics.default_fwd_config(256, TINY)


@pytest.mark.parametrize("cfg,reason", [
    (TileConfig(64, 64, 8, 2), "block_m 64 must be 16 or 32 rows per warp"),
    (TileConfig(128, 40, 4, 2), "block_n 40 must be a multiple of 16"),
    (TileConfig(128, 64, 4, 1), "stages must be at least 2"),
])
def test_tile_config_problems_name_the_rule(cfg: TileConfig, reason: str) -> None:
    assert any(reason in p for p in cfg.problems(128))


def test_register_estimate_prunes_spilling_tiles() -> None:
    # 32 rows per warp at head_dim 128 with 64-key tiles spills (ptxas): the estimate rejects it.
    assert not TileConfig(128, 64, 4, 2).fits(128, H100)
    assert TileConfig(128, 32, 4, 2).fits(128, H100)


def test_dkdv_problems() -> None:
    assert DkdvConfig(64, 64, 8, 2, 2).problems(256) == []
    assert DkdvConfig(64, 48, 8, 2, 1).problems(128)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_autotune_candidates_start_with_the_heuristic(head_dim: int) -> None:
    for kind in ("fwd", "bwd"):
        bucket = autotune.Bucket(kind, "float16", head_dim, True, 4096)
        found = autotune.candidates(bucket, H100)
        default = (heuristics.default_fwd_config if kind == "fwd" else heuristics.default_bwd_config)(head_dim, H100)
        assert found[0] == default and len(found) == len(set(found)) > 1
        assert all(c.fits(head_dim, H100) for c in found)


def test_default_buckets_cover_the_grid() -> None:
    buckets = autotune.default_buckets()
    assert len(buckets) == 48 and len({b.key for b in buckets}) == 48
    problem = buckets[0].problem()
    assert problem.batch * problem.seqlen_q == 16384 and problem.heads_q * problem.head_dim == 2048


A100 = gpu_classes.A100


def test_wgmma_configs_fit_hopper_only() -> None:
    hopper = TileConfig(128, 128, 8, 3, wgmma=True)
    assert hopper.fits(128, H100)
    assert not hopper.fits(128, A100)  # no wgmma before sm_90
    assert not hopper.fits(128, H100, kind="dq")  # only the forward has a wgmma kernel
    assert all(not c.wgmma for c in config.fwd_candidates(128, A100))
    assert any(c.wgmma for c in config.fwd_candidates(128, H100))


@pytest.mark.parametrize("cfg,head_dim,reason", [
    (TileConfig(64, 128, 8, 2, wgmma=True), 128, "block_m 64 per warpgroup"),
    (TileConfig(128, 96, 8, 2, wgmma=True), 128, "block_n 96 must be 64 or 128"),
    (TileConfig(128, 128, 8, 2, wgmma=True), 96, "head_dim 96 must be a multiple of 64"),
])
def test_wgmma_problems_name_the_rule(cfg: TileConfig, head_dim: int, reason: str) -> None:
    assert any(reason in p for p in cfg.problems(head_dim))


def test_hopper_defaults_use_wgmma_where_it_applies() -> None:
    assert heuristics.default_fwd_config(128, H100).wgmma
    assert heuristics.default_fwd_config(192, H100).wgmma
    assert not heuristics.default_fwd_config(96, H100).wgmma  # 96 is not whole 128-byte slabs
    assert not heuristics.default_fwd_config(128, A100).wgmma


def test_wgmma_smem_counts_the_alignment_slack() -> None:
    # Q (128 rows) + 3 stages of K and V (128 rows each), 128 columns, 2 bytes, + 1024 slack
    assert TileConfig(128, 128, 8, 3, wgmma=True).smem_bytes(128) == (128 + 6 * 128) * 128 * 2 + 1024
