"""Config feasibility and the kernel families' heuristic tables against fake device limits (no
GPU needed)."""

from __future__ import annotations

import pytest

from cupyflash import autotune, gpu_classes, plan
from cupyflash.device import DeviceLimits
from cupyflash.kernels import (flash_bwd_dkdv, flash_bwd_dkdv_sm90, flash_bwd_dq, flash_bwd_dq_sm90, flash_fwd,
                               flash_fwd_sm90, flash_fwd_tma)
from cupyflash.kernels.common import KERNEL_HEAD_DIMS

H100, A100 = gpu_classes.H100, gpu_classes.A100
TINY = DeviceLimits("tiny", (8, 6), 8, 48 * 1024, 64 * 1024)
FAMILIES = (flash_fwd, flash_fwd_sm90, flash_bwd_dkdv, flash_bwd_dkdv_sm90, flash_bwd_dq, flash_bwd_dq_sm90)
FwdConfig, Sm90FwdConfig, TmaFwdConfig = flash_fwd.FwdConfig, flash_fwd_sm90.Sm90FwdConfig, flash_fwd_tma.TmaFwdConfig
DkdvConfig, Sm90DkdvConfig = flash_bwd_dkdv.DkdvConfig, flash_bwd_dkdv_sm90.Sm90DkdvConfig
Sm90DqConfig = flash_bwd_dq_sm90.Sm90DqConfig


@pytest.mark.parametrize("limits", gpu_classes.PROMISED, ids=lambda l: l.name)
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS)
def test_candidates_all_fit(limits: DeviceLimits, head_dim: int) -> None:
    """Every promised GPU class has autotune candidates for every pass, and each one fits."""
    fwd = plan.fwd_candidates(head_dim, limits)
    dkdv = plan.dkdv_candidates(head_dim, limits)
    dq = plan.dq_candidates(head_dim, limits)
    assert fwd and dkdv and dq, (len(fwd), len(dkdv), len(dq))
    for cfg in fwd + dkdv + dq:
        assert cfg.smem_bytes(head_dim) <= limits.smem_per_block_optin and not cfg.problems(head_dim), cfg


@pytest.mark.parametrize("limits", gpu_classes.PROMISED, ids=lambda l: l.name)
@pytest.mark.parametrize("head_dim", KERNEL_HEAD_DIMS)
def test_every_promised_gpu_has_default_configs(limits: DeviceLimits, head_dim: int) -> None:
    """The README promises head_dim up to 256 forward and backward from sm_80 on: the heuristic
    tables give each (GPU class, head dim, pass) a config that fits."""
    fwd = plan.default_fwd_config(head_dim, limits)
    bwd = plan.default_bwd_config(head_dim, limits)
    assert fwd.fits(head_dim, limits) and bwd.fits(head_dim, limits)
    if limits.compute_capability != (9, 0):
        assert type(fwd) is FwdConfig and type(bwd.dkdv) is DkdvConfig


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.ENTRY)
def test_every_table_row_is_a_feasible_config(family) -> None:
    """A row no promised GPU can run, or whose head-dim bound covers no compiled head dim its
    config fits, is dead: the table would say why a config wins that never runs."""
    for max_dim, config, why in family.TABLE:
        assert why, config
        assert any(config.fits(d, limits) for limits in gpu_classes.PROMISED for d in KERNEL_HEAD_DIMS if d <= max_dim), \
            config


def test_smaller_device_prunes_more() -> None:
    assert len(plan.fwd_candidates(256, TINY)) < len(plan.fwd_candidates(256, H100))
    assert plan.fwd_candidates(256, TINY) == []  # no head_dim 256 forward fits 48 KB
    with pytest.raises(RuntimeError, match="no built-in forward config for head_dim 256 fits tiny"):
        plan.default_fwd_config(256, TINY)


@pytest.mark.parametrize("cfg,reason", [
    (FwdConfig(64, 64, 8, 2), "block_m 64 must be 16 or 32 rows per warp"),
    (FwdConfig(128, 40, 4, 2), "block_n 40 must be a multiple of 16"),
    (FwdConfig(128, 64, 4, 1), "stages must be at least 2"),
    (flash_bwd_dq.DqConfig(64, 64, 8, 2), "block_m 64 must be 16 or 32 rows per warp"),
])
def test_row_tile_problems_name_the_rule(cfg, reason: str) -> None:
    assert any(reason in p for p in cfg.problems(128))


def test_register_estimate_prunes_spilling_tiles() -> None:
    # 32 rows per warp at head_dim 128 with 64-key tiles spills (ptxas): the estimate rejects it.
    assert not FwdConfig(128, 64, 4, 2).fits(128, H100)
    assert FwdConfig(128, 32, 4, 2).fits(128, H100)


def test_dkdv_problems() -> None:
    assert DkdvConfig(64, 64, 8, 2, 2).problems(256) == []
    assert DkdvConfig(64, 48, 8, 2, 1).problems(128)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_autotune_candidates_start_with_the_heuristic(head_dim: int) -> None:
    for kind in ("fwd", "bwd"):
        bucket = autotune.Bucket(kind, "float16", head_dim, True, 4096)
        found = autotune.candidates(bucket, H100)
        default = (plan.default_fwd_config if kind == "fwd" else plan.default_bwd_config)(head_dim, H100)
        assert found[0] == default and len(found) == len(set(found)) > 1
        assert all(c.fits(head_dim, H100) for c in found)


def test_default_buckets_cover_the_grid() -> None:
    buckets = autotune.default_buckets()
    assert len(buckets) == 48 and len({b.key for b in buckets}) == 48
    problem = buckets[0].problem()
    assert problem.batch * problem.seqlen_q == 16384 and problem.heads_q * problem.head_dim == 2048


def test_wgmma_configs_fit_hopper_only() -> None:
    hopper = Sm90FwdConfig(128, 128, 3)
    assert hopper.fits(128, H100)
    assert not hopper.fits(128, A100)  # no wgmma before sm_90
    assert all(type(c) is FwdConfig for c in plan.fwd_candidates(128, A100))
    assert any(type(c) is Sm90FwdConfig for c in plan.fwd_candidates(128, H100))
    assert all(type(c) is DkdvConfig for c in plan.dkdv_candidates(128, A100))


@pytest.mark.parametrize("cfg,head_dim,reason", [
    (Sm90FwdConfig(96, 128, 2), 128, "block_m 96 must be 64, 128 or 192"),
    (Sm90FwdConfig(128, 96, 2), 128, "block_n 96 must be 64 or 128"),
    (Sm90FwdConfig(128, 128, 2), 96, "head_dim 96 must be a multiple of 64"),
    (Sm90DkdvConfig(64, 128, 2), 256, "block_n must be 64 at head_dim 256"),
    (Sm90DkdvConfig(32, 128, 2), 128, "block_m 32 must be 64 or 128"),
    (Sm90DkdvConfig(64, 128, 2), 192, "block_n must be 64 at head_dim 192"),
    (Sm90DkdvConfig(64, 128, 2), 80, "head_dim 80 has no kernel"),
])
def test_wgmma_problems_name_the_rule(cfg, head_dim: int, reason: str) -> None:
    assert any(reason in p for p in cfg.problems(head_dim))


def test_hopper_defaults_use_wgmma_where_it_applies() -> None:
    for dim in (64, 96, 128, 160, 192, 256):  # the TMA forward, on whole 64-column slabs
        assert type(plan.default_fwd_config(dim, H100)) is TmaFwdConfig, dim
    assert type(plan.default_fwd_config(32, H100)) is FwdConfig  # not yet run on a GPU at 32
    # a packed batch: the cp.async wgmma forward where the head dim is whole slabs, else mma.sync
    assert type(plan.default_fwd_config(128, H100, varlen=True)) is Sm90FwdConfig
    assert type(plan.default_fwd_config(96, H100, varlen=True)) is FwdConfig
    assert type(plan.default_fwd_config(128, A100)) is FwdConfig
    for dim in (32, 64, 96, 128, 160, 192, 256):  # wgmma dK/dV, in tiles of 64 at 32, 128 or 256 at 96 ... 192
        assert type(plan.default_bwd_config(dim, H100).dkdv) is Sm90DkdvConfig, dim
        assert type(plan.default_bwd_config(dim, H100).dq) is Sm90DqConfig, dim
    assert type(plan.default_bwd_config(128, A100).dkdv) is DkdvConfig


def test_atomic_dq_defaults() -> None:
    """wgmma dK/dV adds dQ in tiles of up to 128 columns, else the dQ pass runs; mma.sync adds it only
    up to flash_bwd_dkdv.MAX_ATOMIC_DQ_HEAD_DIM."""
    for dim in (32, 64, 96, 128):
        assert plan.default_bwd_config(dim, H100).dq_atomic, dim
    for dim in (160, 192, 256):
        assert not plan.default_bwd_config(dim, H100).dq_atomic, dim
    assert plan.default_bwd_config(64, A100).dq_atomic
    assert not plan.default_bwd_config(128, A100).dq_atomic


def test_wgmma_smem_counts_the_alignment_slack() -> None:
    # Q (128 rows) + 3 stages of K and V (128 rows each), 128 columns, 2 bytes, + 1024 slack
    assert Sm90FwdConfig(128, 128, 3).smem_bytes(128) == (128 + 6 * 128) * 128 * 2 + 1024
    assert Sm90FwdConfig(192, 64, 2).num_warps == 12
