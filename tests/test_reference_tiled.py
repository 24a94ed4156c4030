"""Tests of cupyflash.reference_tiled (FlashAttention-2 tile by tile, float64).

The tiled algorithm must agree with the dense reference to rounding error (1e-12) for any
block sizes, including ones that do not divide the sequence lengths, and must visit exactly
the tiles that hold a visible (query, key) pair.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cupyflash import reference as ref
from cupyflash import reference_tiled as tiled

# Any floating point warning (e.g. from a fully masked row) is a failure.
pytestmark = pytest.mark.filterwarnings("error")

TOL = 1e-12

# name -> (heads_q, heads_kv, options); "dropout" options get a random keep mask.
FEATURES = {
    "plain": (2, 2, {}),
    "causal": (2, 2, dict(causal=True)),
    "window": (2, 2, dict(window_size=(4, 2))),
    "window_left": (2, 2, dict(window_size=(7, -1))),
    "causal_window": (2, 2, dict(causal=True, window_size=(3, -1))),
    "softcap": (2, 2, dict(softcap=1.5, softmax_scale=1.2)),
    "alibi": (2, 2, dict(alibi=True)),
    "gqa": (4, 2, {}),
    "mqa_causal": (4, 1, dict(causal=True)),
    "dropout": (2, 2, dict(dropout_p=0.3)),
    "everything": (4, 2, dict(causal=True, window_size=(9, -1), softcap=2.0, alibi=True,
                              dropout_p=0.2)),
}


def make_problem(feature: str, seqlen_q: int, seqlen_k: int, seed: int = 0,
                 batch: int = 1, head_dim: int = 4) -> tuple[dict, dict]:
    """Random signed normal q, k, v, dout and the options of ``feature``."""
    rng = np.random.default_rng(seed)
    heads_q, heads_kv, opts = FEATURES[feature]
    opts = dict(opts)
    arrays = dict(q=rng.standard_normal((batch, seqlen_q, heads_q, head_dim)),
                  k=rng.standard_normal((batch, seqlen_k, heads_kv, head_dim)),
                  v=rng.standard_normal((batch, seqlen_k, heads_kv, head_dim)),
                  dout=rng.standard_normal((batch, seqlen_q, heads_q, head_dim)))
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = rng.uniform(0.05, 0.5, (batch, heads_q))
    if opts.get("dropout_p"):
        shape = (batch, heads_q, seqlen_q, seqlen_k)
        opts["dropout_mask"] = rng.random(shape) >= opts["dropout_p"]
    return arrays, opts


def check_tiled_matches_dense(feature: str, seqlen_q: int, seqlen_k: int, block_m: int,
                              block_n: int, batch: int = 1, dq_pass: bool = False) -> None:
    """Forward (out, lse) and backward (dq, dk, dv) of both references agree to TOL."""
    arrays, opts = make_problem(feature, seqlen_q, seqlen_k, batch=batch)
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
    out, lse = ref.attention_forward(q, k, v, **opts)
    grads = ref.attention_backward(dout, q, k, v, **opts)
    t_out, t_lse = tiled.flash_forward(q, k, v, block_m=block_m, block_n=block_n, **opts)
    t_grads = tiled.flash_backward(dout, q, k, v, t_out, t_lse, block_m=block_m,
                                   block_n=block_n, dq_pass=dq_pass, **opts)
    np.testing.assert_array_equal(np.isinf(t_lse), np.isinf(lse))  # the same dead rows
    live = np.isfinite(lse)
    assert np.max(np.abs(t_lse[live] - lse[live]), initial=0.0) <= TOL
    for got, want, what in zip((t_out, *t_grads), (out, *grads), ("out", "dq", "dk", "dv")):
        assert got.shape == want.shape and got.dtype == np.float64, what
        assert np.max(np.abs(got - want)) <= TOL, (what, np.max(np.abs(got - want)))


BLOCKS = list(itertools.product([1, 3, 16], [1, 5, 32]))
SMALL_LENGTHS = list(itertools.product([1, 17], [1, 17]))


@pytest.mark.parametrize("block_m, block_n", BLOCKS, ids=[f"bm{m}_bn{n}" for m, n in BLOCKS])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SMALL_LENGTHS,
                         ids=[f"sq{q}_sk{k}" for q, k in SMALL_LENGTHS])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_tiled_matches_dense_small(feature, seqlen_q, seqlen_k, block_m, block_n) -> None:
    check_tiled_matches_dense(feature, seqlen_q, seqlen_k, block_m, block_n)


LARGE = [(113, 203), (203, 113)]


LARGE_BLOCKS = [(16, 32), (3, 5), (1, 32), (16, 1)]


@pytest.mark.parametrize("block_m, block_n", LARGE_BLOCKS,
                         ids=[f"bm{m}_bn{n}" for m, n in LARGE_BLOCKS])
@pytest.mark.parametrize("seqlen_q, seqlen_k", LARGE, ids=[f"sq{q}_sk{k}" for q, k in LARGE])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_tiled_matches_dense_large(feature, seqlen_q, seqlen_k, block_m, block_n) -> None:
    check_tiled_matches_dense(feature, seqlen_q, seqlen_k, block_m, block_n)


def test_tiled_two_batches() -> None:
    check_tiled_matches_dense("everything", 17, 23, 4, 8, batch=2)


# dQ in a pass of its own (the dQ kernels: deterministic=True, and Hopper above head dim 128).
@pytest.mark.parametrize("block_m, block_n", LARGE_BLOCKS[:2], ids=[f"bm{m}_bn{n}" for m, n in LARGE_BLOCKS[:2]])
@pytest.mark.parametrize("seqlen_q, seqlen_k", LARGE, ids=[f"sq{q}_sk{k}" for q, k in LARGE])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_tiled_dq_pass_matches_dense(feature, seqlen_q, seqlen_k, block_m, block_n) -> None:
    check_tiled_matches_dense(feature, seqlen_q, seqlen_k, block_m, block_n, dq_pass=True)


# --------------------------------------------------------------------------- tile ranges


MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "local_2_0": dict(window_size=(2, 0)),
    "local_0_3": dict(window_size=(0, 3)),
    "local_0_0": dict(window_size=(0, 0)),
    "left_only": dict(window_size=(3, -1)),
    "right_only": dict(window_size=(-1, 2)),
    "causal_left": dict(causal=True, window_size=(4, -1)),
    "causal_right_ignored": dict(causal=True, window_size=(-1, 5)),
}
RANGE_SHAPES = [(1, 1), (7, 7), (5, 13), (13, 5), (17, 33), (33, 17), (2, 30), (30, 2)]
RANGE_BLOCKS = [(1, 1), (2, 3), (4, 4), (5, 2), (16, 8)]


def visible_tiles(mask: np.ndarray, block_m: int, block_n: int) -> set[tuple[int, int]]:
    """Brute force: the (m_block, n_block) pairs holding at least one visible pair."""
    rows, cols = np.nonzero(mask)
    return set(zip((rows // block_m).tolist(), (cols // block_n).tolist()))


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_tile_ranges_visit_exactly_the_visible_tiles(mask_name: str) -> None:
    opts = MASKS[mask_name]
    for (sq, sk), (bm, bn) in itertools.product(RANGE_SHAPES, RANGE_BLOCKS):
        kw = dict(block_m=bm, block_n=bn, seqlen_q=sq, seqlen_k=sk, **opts)
        expected = visible_tiles(ref.visible_mask(sq, sk, **opts), bm, bn)
        by_rows = {(m, n) for m in range(tiled.ceil_div(sq, bm))
                   for n in range(*tiled.n_block_range(m, **kw))}
        by_cols = {(m, n) for n in range(tiled.ceil_div(sk, bn))
                   for m in range(*tiled.m_block_range(n, **kw))}
        assert by_rows == expected, (sq, sk, bm, bn)
        assert by_cols == expected, (sq, sk, bm, bn)


def test_n_block_range_example() -> None:
    """Causal, Sq = 4, Sk = 10 (off = 6), tiles of 2 queries and 4 keys."""
    kw = dict(block_m=2, block_n=4, seqlen_q=4, seqlen_k=10, causal=True)
    assert tiled.n_block_range(0, **kw) == (0, 2)  # rows 0-1 see keys 0..7
    assert tiled.n_block_range(1, **kw) == (0, 3)  # rows 2-3 see keys 0..9
    kw["window_size"] = (1, -1)
    assert tiled.n_block_range(1, **kw) == (1, 3)  # rows 2-3 see keys 7..9


# --------------------------------------------------------------------------- validation


def test_argument_errors() -> None:
    arrays, _ = make_problem("plain", 5, 7)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    with pytest.raises(ValueError, match="block"):
        tiled.flash_forward(q, k, v, block_m=0, block_n=4)
    with pytest.raises(ValueError, match="dropout_mask"):
        tiled.flash_forward(q, k, v, block_m=2, block_n=4, dropout_p=0.5)
    out, lse = tiled.flash_forward(q, k, v, block_m=2, block_n=4)
    with pytest.raises(ValueError, match="lse"):
        tiled.flash_backward(arrays["dout"], q, k, v, out, lse[:, :1], block_m=2, block_n=4)
