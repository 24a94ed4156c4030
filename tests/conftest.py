"""Shared test set-up: tests marked ``@pytest.mark.gpu`` skip cleanly on a machine without a
CUDA GPU (the markers themselves are registered in pyproject.toml)."""

from __future__ import annotations

import pytest

NO_GPU_REASON = "needs a CUDA GPU: cupyflash.device.gpu_count() is 0 (no CuPy, no CUDA driver or no device)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every gpu-marked test when no GPU is visible; the GPU suite runs unchanged on one."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # no GPU test collected: do not even ask the driver
    from cupyflash.device import gpu_count

    if gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in gpu_items:
        item.add_marker(skip)
