"""The tuned-config cache: keys, atomic store, and corrupt or stale files (warn, never raise)."""

from __future__ import annotations

import json
import warnings

import pytest

from cupyflash import autotune, plan, tuning
from cupyflash.device import DeviceLimits
from cupyflash.kernels.flash_bwd_dkdv import DkdvConfig
from cupyflash.kernels.flash_bwd_dq import DqConfig
from cupyflash.kernels.flash_fwd import FwdConfig
from cupyflash.plan import BwdConfig

pytest.importorskip("cupy", reason="the tuning header reads CUDA and NVRTC versions through CuPy")
H100 = DeviceLimits("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472)


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYFLASH_TUNING_DIR", str(tmp_path))
    tuning._files.clear()
    yield tmp_path
    tuning._files.clear()


def bucket(kind: str = "fwd") -> autotune.Bucket:
    return autotune.Bucket(kind, "float16", 128, True, 4096)


def test_store_then_lookup_round_trips() -> None:
    fwd = FwdConfig(128, 32, 4, 2)
    bwd = BwdConfig(DkdvConfig(64, 128, 8, 2, 2), DqConfig(128, 64, 8, 2), dq_atomic=False)
    tuning.store(H100, bucket("fwd").key, fwd, {"ms": 1.0})
    tuning.store(H100, bucket("bwd").key, bwd, {"ms": 2.0})
    assert plan.tuned_config("fwd", bucket("fwd").problem(), H100) == fwd
    assert plan.tuned_config("bwd", bucket("bwd").problem(), H100) == bwd
    assert not list(tuning.tuning_file(H100).parent.glob("*.tmp"))


def test_bucket_key_separates_what_changes_the_kernel_choice() -> None:
    keys = {autotune.Bucket(k, d, h, c, s).key for k in ("fwd", "bwd") for d in ("float16", "bfloat16")
            for h in (64, 128) for c in (False, True) for s in (1024, 8192)}
    assert len(keys) == 32
    assert tuning.seqlen_bucket(1000) == tuning.seqlen_bucket(1024) == 1024
    assert tuning.seqlen_bucket(100000) == 16384


A100 = DeviceLimits("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 167936)


def test_a_different_gpu_does_not_see_the_file() -> None:
    """Each GPU model has its own file: without warnings (a shared file would be stale for the
    other GPU and warn), and storing for one GPU keeps the other's winner."""
    fwd, other_fwd = FwdConfig(128, 32, 4, 2), FwdConfig(64, 64, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning.store(H100, bucket().key, fwd, {})
        assert plan.tuned_config("fwd", bucket().problem(), A100) is None
        tuning.store(A100, bucket().key, other_fwd, {})
        assert plan.tuned_config("fwd", bucket().problem(), H100) == fwd
        assert plan.tuned_config("fwd", bucket().problem(), A100) == other_fwd
    assert tuning.tuning_file(H100) != tuning.tuning_file(A100)


def test_corrupt_file_warns_and_is_ignored() -> None:
    path = tuning.tuning_file(H100)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ this is not json")
    with pytest.warns(RuntimeWarning, match="unreadable tuned-config file"):
        assert plan.tuned_config("fwd", bucket().problem(), H100) is None


def test_stale_file_warns_and_is_ignored() -> None:
    tuning.store(H100, bucket().key, FwdConfig(128, 32, 4, 2), {})
    path = tuning.tuning_file(H100)
    data = json.loads(path.read_text())
    data["header"]["kernel_source"] = "0000000000000000"  # kernels edited since tuning
    path.write_text(json.dumps(data))
    tuning._files.clear()
    with pytest.warns(RuntimeWarning, match="run `cupyflash autotune` again"):
        assert plan.tuned_config("fwd", bucket().problem(), H100) is None


def test_malformed_entry_warns_and_is_ignored() -> None:
    tuning.store(H100, bucket().key, FwdConfig(128, 32, 4, 2), {})
    path = tuning.tuning_file(H100)
    data = json.loads(path.read_text())
    data["entries"][bucket().key]["config"] = {"block_m": 128}
    path.write_text(json.dumps(data))
    tuning._files.clear()
    with pytest.warns(RuntimeWarning, match="malformed tuned config"):
        assert plan.tuned_config("fwd", bucket().problem(), H100) is None


def test_infeasible_tuned_config_is_not_used() -> None:
    tuning.store(H100, bucket().key, FwdConfig(128, 64, 4, 2), {})  # spills at head_dim 128: fits() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.tuned_config("fwd", bucket().problem(), H100) is None


def test_clear_removes_the_file() -> None:
    tuning.store(H100, bucket().key, FwdConfig(128, 32, 4, 2), {})
    assert tuning.clear(H100) == [tuning.tuning_file(H100)]
    assert tuning.load_entries(H100) == {}


def test_clear_without_limits_removes_every_gpu_file(tuning_dir) -> None:
    tuning.store(H100, bucket().key, FwdConfig(128, 32, 4, 2), {})
    tuning.store(A100, bucket().key, FwdConfig(64, 64, 4, 2), {})
    (tuning_dir / "notes.txt").write_text("not a tuning file")
    assert tuning.clear() == sorted([tuning.tuning_file(H100), tuning.tuning_file(A100)])
    assert tuning.tuning_files() == [] and (tuning_dir / "notes.txt").exists()
    assert tuning.load_entries(H100) == tuning.load_entries(A100) == {}


def test_stored_entries_of_one_gpu_or_of_every_file(tuning_dir) -> None:
    """With limits: this GPU's file as lookup() sees it; without: every file as stored, needing
    no GPU (no header check), None for an unreadable one; missing files are left out."""
    tuning.store(H100, bucket().key, FwdConfig(128, 32, 4, 2), {"ms": 1.0})
    (tuning_dir / "Old_GPU-sm_70.json").write_text(json.dumps({"header": {"gpu": "old"}, "entries": {"k": {}}}))
    (tuning_dir / "Broken-sm_80.json").write_text('{"entries": [1, 2]}')
    h100 = {bucket().key: {"config": FwdConfig(128, 32, 4, 2).to_dict(), "ms": 1.0}}
    assert tuning.stored_entries(H100) == {tuning.tuning_file(H100): h100}
    assert tuning.stored_entries(A100) == {}
    assert tuning.stored_entries() == {tuning_dir / "Broken-sm_80.json": None, tuning.tuning_file(H100): h100,
                                       tuning_dir / "Old_GPU-sm_70.json": {"k": {}}}
    assert list(tuning.stored_entries()) == tuning.tuning_files()  # sorted by name
