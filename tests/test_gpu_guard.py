"""No kernel writes outside its buffers: every allocation of a forward and a backward call
(outputs, the dQ accumulator, delta, padded copies) gets guard bytes before and after it
(guarded_memory.py), checked after the call, over the memory-safety sweep (memory_sweep.py:
every path, head dim and awkward shape the sanitizer step runs). The results are checked too,
into NaN-filled memory. Before the fix of 2026-12-02 the Hopper dK/dV kernel at head_dim 64
added a 64-row unit past the end of the dQ accumulator, which this test reports.
Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import pytest

from cupyflash import memory_sweep, plan

from .guarded_memory import GuardedAllocator

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("sweep_case", memory_sweep.cases(), ids=lambda c: c.id)
def test_no_write_outside_the_buffers(sweep_case: memory_sweep.SweepCase) -> None:
    plan.clear()  # a cached plan is fine, but this test should see the plan's first call too
    with GuardedAllocator() as guard:
        results = memory_sweep.run(sweep_case)
        again = memory_sweep.run(sweep_case)  # the repeat call, served by the cached launch plan
    guard.assert_intact()
    failures = [r.message() for r in results + again if not r.ok]
    assert not failures, "\n".join(failures)


def test_the_guards_see_a_write_past_the_end() -> None:
    """The check itself: a write one float past a buffer, and one before it, are both reported."""
    import cupy

    with GuardedAllocator() as guard:
        buffer = cupy.empty(1000, cupy.float32)
        cupy.cuda.runtime.memset(buffer.data.ptr + buffer.nbytes, 0, 4)
        cupy.cuda.runtime.memset(buffer.data.ptr - 8, 0, 4)
    damaged = guard.damaged()
    assert len(damaged) == 2 and "after" in damaged[1] and "before" in damaged[0], damaged
