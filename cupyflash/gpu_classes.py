"""The GPU classes cupyflash promises to run on, as the limits its configs depend on.

The README promises every head dim from 1 to 256, forward and backward, from compute capability
8.0 on. The configs a GPU runs follow from its shared memory per block (the tables in kernels/*.py), so three
classes cover the promise: 99 KB (sm_86 / sm_89: RTX 3090 and 4090, A10, L4), 163 KB (sm_80:
A100) and 227 KB with wgmma (sm_90: H100, H200). Tests check that each class has a config for
every (head dim, pass), and the GPU tests and the sanitizer sweep force the configs the smaller
classes would pick, so that a Hopper machine runs the kernels an A100 or an RTX 4090 would.
Numbers are the devices' own (cudaGetDeviceProperties).
"""

from __future__ import annotations

from .device import DeviceLimits

RTX_4090 = DeviceLimits("RTX 4090 (sm_89, 99 KB)", (8, 9), 128, 101376, 102400)
A100 = DeviceLimits("A100 (sm_80, 163 KB)", (8, 0), 108, 166912, 167936)
H100 = DeviceLimits("H100 (sm_90, 227 KB)", (9, 0), 132, 232448, 233472)

PROMISED = (RTX_4090, A100, H100)
# The ones whose configs a Hopper GPU can be made to run (plan.forced): every config of a
# smaller class fits the larger one, and none of them uses wgmma.
SMALLER_THAN_HOPPER = {"a100": A100, "rtx4090": RTX_4090}
