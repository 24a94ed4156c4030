"""A CuPy allocator that puts guard bytes before and after every allocation, for tests that
prove the kernels write nothing outside their buffers (outputs and workspaces alike).

    with GuardedAllocator() as guard:
        ...calls that allocate and launch...
    guard.assert_intact()

Inside the block every allocation (cupy.empty, cupy.zeros, the library's outputs, its float32 dQ
accumulator and padded copies) is a fresh cudaMalloc of size + 2 * GUARD_BYTES, its guards filled
with a pattern and its own bytes with 0xFF (NaN in float16, bfloat16 and float32: an element a
kernel leaves unwritten shows). The pattern holds -0.0, the smallest denormal and a signalling
NaN, so even an add of +0.0 past the end changes a guard (it flips -0.0, flushes the denormal
and quiets the NaN). Memory is kept until the block's allocator is dropped, so the guards of
temporaries freed during the call are still checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GUARD_BYTES = 256 * 1024  # more than the largest overrun a tile can make (64 rows x 256 floats)
_PATTERN = np.array([0x80000000, 0x00000001, 0x7FA00001, 0xDEADBEEF], np.uint32)


class GuardedAllocator:
    def __init__(self, guard_bytes: int = GUARD_BYTES) -> None:
        import cupy

        self._cupy = cupy
        self.guard_bytes = guard_bytes
        self.pattern = np.resize(_PATTERN, guard_bytes // 4)
        self.blocks: list[tuple[Any, int]] = []  # (cupy Memory, the caller's size in bytes)
        self._context: Any = None

    def malloc(self, size: int) -> Any:
        cupy = self._cupy
        memory = cupy.cuda.memory.Memory(size + 2 * self.guard_bytes)
        runtime = cupy.cuda.runtime
        for offset in (0, self.guard_bytes + size):
            runtime.memcpy(memory.ptr + offset, self.pattern.ctypes.data, self.guard_bytes,
                           runtime.memcpyHostToDevice)
        if size:
            runtime.memset(memory.ptr + self.guard_bytes, 0xFF, size)
        self.blocks.append((memory, size))
        return cupy.cuda.MemoryPointer(memory, self.guard_bytes)

    def __enter__(self) -> GuardedAllocator:
        self._context = self._cupy.cuda.using_allocator(self.malloc)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    def damaged(self) -> list[str]:
        """One line per guard whose bytes changed: the allocation's size, the side, the first
        changed byte's distance from the buffer's edge and how many bytes changed."""
        cupy = self._cupy
        cupy.cuda.Device().synchronize()
        runtime, found = cupy.cuda.runtime, []
        seen = np.empty(self.guard_bytes // 4, np.uint32)
        for memory, size in self.blocks:
            for side, offset in (("before", 0), ("after", self.guard_bytes + size)):
                runtime.memcpy(seen.ctypes.data, memory.ptr + offset, self.guard_bytes, runtime.memcpyDeviceToHost)
                changed = np.flatnonzero(seen != self.pattern)
                if changed.size:
                    first = changed[-1] if side == "before" else changed[0]
                    distance = (self.guard_bytes // 4 - first) * 4 if side == "before" else first * 4
                    found.append(f"{size}-byte buffer: {changed.size * 4} guard bytes {side} it changed, "
                                 f"the nearest {distance} bytes from its edge")
        return found

    def assert_intact(self) -> None:
        damaged = self.damaged()
        assert not damaged, "a kernel wrote outside its buffers:\n" + "\n".join(damaged)
