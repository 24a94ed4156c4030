"""merge_attention on the GPU: parts computed by attention over disjoint key slices, merged, and
compared with the float64 merge of the same parts and with float64 attention over all the keys
(merge_cases.py); rows no part saw; NaN and +inf marks; strided parts; NumPy in, NumPy out.
Outputs land in NaN-poisoned pool blocks. Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import reference
from cupyflash.merge_cases import MergeCase, compare_merge, run_merge

pytestmark = pytest.mark.gpu

CASES = [MergeCase(dtype, dim, seqlen_q, splits, group=group)
         for dtype in ("float16", "bfloat16")
         for dim, seqlen_q, splits, group in ((64, 1, (4096,), 1), (64, 17, (1, 1000), 4), (128, 1, (255, 0, 4097), 8),
                                              (128, 113, (300, 301, 302, 0, 5, 6, 7, 8), 1), (256, 16, (64, 65), 2),
                                              (40, 33, (0, 33), 4), (8, 2, (3, 4, 5), 1))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_matches_the_reference(case: MergeCase) -> None:
    host = case.inputs(seed=1)
    failures = [c.message() for c in compare_merge(case, host, run_merge(case, host)) if not c.ok]
    assert not failures, "\n".join(failures)


def _parts(seed: int = 0, parts: int = 3, shape: tuple[int, int, int, int] = (2, 5, 4, 64)):
    import cupy

    rng = np.random.default_rng(seed)
    outs = [cupy.asarray(rng.standard_normal(shape).astype(np.float16)) for _ in range(parts)]
    lses = [cupy.asarray((3 * rng.standard_normal((shape[0], shape[2], shape[1]))).astype(np.float32))
            for _ in range(parts)]
    return outs, lses


def test_rows_no_part_saw_are_zero_and_minus_inf_and_marks() -> None:
    import cupy

    outs, lses = _parts()
    for s in lses:
        s[0, 1, 2] = -cupy.inf  # no part saw row (b 0, i 2, h 1)
    lses[0][1, 0, 0] = cupy.inf  # flash_attn 2's mark: counts as -inf
    lses[1][1, 3, 4] = cupy.nan
    out, lse = cf.merge_attention(outs, lses)
    assert bool((out[0, 2, 1] == 0).all()) and float(lse[0, 1, 2]) == -np.inf
    ref_out, ref_lse = cf.merge_attention([outs[1], outs[2]], [lses[1], lses[2]])
    assert cupy.array_equal(out[1, 0, 0], ref_out[1, 0, 0]) and float(lse[1, 0, 0]) == float(ref_lse[1, 0, 0])
    assert bool(cupy.isnan(out[1, 4, 3]).all()) and bool(cupy.isnan(lse[1, 3, 4]))
    healthy = cupy.ones(out.shape, bool)
    healthy[1, 4, 3] = False
    assert not bool(cupy.isnan(out[healthy]).any())


def test_strided_and_numpy_parts() -> None:
    import cupy

    outs, lses = _parts(seed=2, parts=4)
    expect_out, expect_lse = cf.merge_attention(outs, lses)
    wide = cupy.zeros((2, 5, 8, 64), cupy.float16)
    wide[:, :, 2:6] = outs[1]
    strided = [outs[0], wide[:, :, 2:6], outs[2], outs[3]]  # one part's strides differ from the rest
    out, lse = cf.merge_attention(strided, lses)
    assert cupy.array_equal(out, expect_out) and cupy.array_equal(lse, expect_lse)
    host_out, host_lse = cf.merge_attention([o.get() for o in outs], tuple(s.get() for s in lses))
    assert isinstance(host_out, np.ndarray) and np.array_equal(host_out, expect_out.get())
    ref_out, ref_lse = reference.merge_attention([o.get().astype(np.float64) for o in outs],
                                                 [s.get() for s in lses])
    np.testing.assert_allclose(host_lse, ref_lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(host_out.astype(np.float64), ref_out, rtol=2**-10, atol=2**-10)


def test_head_dim_past_one_warp_pass() -> None:
    """head_dim 300 > 256 columns per warp pass (attention stops at 256, merge does not)."""
    outs, lses = _parts(seed=4, parts=5, shape=(1, 3, 2, 300))
    out, lse = cf.merge_attention(outs, lses)
    ref_out, ref_lse = reference.merge_attention([o.get().astype(np.float64) for o in outs], [s.get() for s in lses])
    np.testing.assert_allclose(lse.get(), ref_lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.get().astype(np.float64), ref_out, rtol=2**-10, atol=2**-10)


def test_one_part_is_itself_and_empty_sizes() -> None:
    import cupy

    outs, lses = _parts(seed=3, parts=1)
    out, lse = cf.merge_attention(outs, lses)
    assert cupy.array_equal(out, outs[0]) and cupy.array_equal(lse, lses[0])
    empty = [cupy.zeros((0, 5, 4, 64), cupy.float16)] * 2
    out, lse = cf.merge_attention(empty, [cupy.zeros((0, 4, 5), cupy.float32)] * 2)
    assert out.shape == (0, 5, 4, 64) and lse.shape == (0, 4, 5)
