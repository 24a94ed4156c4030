"""Shared test set-up.

- Tests marked ``@pytest.mark.gpu`` skip cleanly on a machine without a CUDA GPU (the markers
  themselves are registered in pyproject.toml).
- The session is hermetic: CUPYFLASH_CACHE_DIR is a fresh temporary folder (the cubins, and the
  tuned configs in its tuning/), CUPYFLASH_TUNING_DIR and CUPYFLASH_NO_DISK_CACHE are unset, so
  neither a user's tuned configs nor an earlier run's cubins change what the tests see
  (subprocesses the tests start inherit the same folder).
- After each GPU test the CuPy memory pool gives its free blocks back to the driver, so that the
  GPU suite can run in several processes on one GPU (PYTEST_JOBS in scripts/gpu_check.sh)
  without one process's cached blocks starving the others.
- ``--test-order reverse`` or ``--test-order random:SEED`` runs the collected tests in another
  order, to show that none depends on what ran before it (scripts/gpu_check.sh runs the GPU
  suite in two orders).
- ``--test-shard I/N`` keeps the I-th of N contiguous slices of the (ordered) tests, so that N
  processes can share the GPU suite (TEST_SHARDS in scripts/gpu_check.sh): a cold NVRTC cache
  is what makes the suite slow, and contiguous slices keep one kernel's tests in one process.
  Those processes share one fresh cache folder when CUPYFLASH_TEST_CACHE_DIR names it (the
  caller creates it empty and removes it; cache writes are atomic, so sharing it is safe).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest

NO_GPU_REASON = "needs a CUDA GPU: cupyflash.device.gpu_count() is 0 (no CuPy, no CUDA driver or no device)"
_HERMETIC_VARIABLES = ("CUPYFLASH_CACHE_DIR", "CUPYFLASH_TUNING_DIR", "CUPYFLASH_NO_DISK_CACHE")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--test-order", default="collected", metavar="ORDER",
                     help="collected (default), reverse, or random:SEED")
    parser.addoption("--test-shard", default="1/1", metavar="I/N",
                     help="run only the I-th of N contiguous slices of the tests (1 <= I <= N)")


def pytest_configure(config: pytest.Config) -> None:
    shared = os.environ.get("CUPYFLASH_TEST_CACHE_DIR")
    root = shared or tempfile.mkdtemp(prefix="cupyflash-tests-")
    config._cupyflash_saved_env = {name: os.environ.get(name) for name in _HERMETIC_VARIABLES}
    config._cupyflash_cache_root = None if shared else root  # a shared folder is its creator's to remove
    os.environ["CUPYFLASH_CACHE_DIR"] = root
    os.environ.pop("CUPYFLASH_TUNING_DIR", None)
    os.environ.pop("CUPYFLASH_NO_DISK_CACHE", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in getattr(config, "_cupyflash_saved_env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    root = getattr(config, "_cupyflash_cache_root", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)


def _reorder(order: str, items: list[pytest.Item]) -> None:
    if order == "collected":
        return
    if order == "reverse":
        items.reverse()
        return
    kind, _, seed = order.partition(":")
    if kind != "random" or not seed.isdigit():
        raise pytest.UsageError(f"--test-order is {order!r}; use collected, reverse or random:SEED (SEED an integer)")
    random.Random(int(seed)).shuffle(items)


def _shard(shard: str, items: list[pytest.Item], config: pytest.Config) -> None:
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise pytest.UsageError(f"--test-shard is {shard!r}; use I/N with integers 1 <= I <= N")
    index, count = int(index), int(count)
    if count == 1:
        return
    start, stop = (index - 1) * len(items) // count, index * len(items) // count
    config.hook.pytest_deselected(items=items[:start] + items[stop:])
    items[:] = items[start:stop]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Reorder if asked, keep this process's shard; skip every gpu-marked test when no GPU is visible."""
    _reorder(config.getoption("--test-order"), items)
    _shard(config.getoption("--test-shard"), items, config)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # no GPU test collected: do not even ask the driver
    from cupyflash.device import gpu_count

    if gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_gpu_memory(request: pytest.FixtureRequest):
    yield
    if request.node.get_closest_marker("gpu") is None:
        return
    import cupy

    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
