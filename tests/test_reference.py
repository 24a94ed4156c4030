"""Tests of cupyflash.reference (dense attention in NumPy).

The dense reference is checked three independent ways: against an explicit loop over
(b, h, i, j) written with the math module, against central finite differences, and (for the
mask) against hand-written boolean matrices.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import pytest

from cupyflash import reference as ref


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One attention problem: shapes and options (dropout given as p; the mask is random)."""

    batch: int = 1
    seqlen_q: int = 3
    seqlen_k: int = 5
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 4
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""  # "", "per_head" (Hq,) or "per_batch" (B, Hq)
    dropout_p: float = 0.0
    softmax_scale: float | None = None


CASES = {
    "plain": Case(batch=2),
    "square": Case(seqlen_q=5, seqlen_k=5),
    "single": Case(seqlen_q=1, seqlen_k=1),
    "causal_sq<sk": Case(seqlen_q=3, seqlen_k=5, causal=True),
    "causal_sq>sk": Case(seqlen_q=5, seqlen_k=3, causal=True),  # rows 0 and 1 see nothing
    "causal_q1": Case(seqlen_q=1, seqlen_k=5, causal=True),
    "window_1_0": Case(seqlen_q=5, seqlen_k=5, window_size=(1, 0)),
    "window_2_1": Case(seqlen_q=3, seqlen_k=5, window_size=(2, 1)),
    "window_left_only": Case(seqlen_q=5, seqlen_k=3, window_size=(1, -1)),
    "window_right_only": Case(seqlen_q=5, seqlen_k=3, window_size=(-1, 1)),
    "window_causal": Case(seqlen_q=5, seqlen_k=5, causal=True, window_size=(2, 3)),
    "softcap": Case(softcap=1.5, softmax_scale=1.3),
    "alibi_per_head": Case(batch=2, alibi="per_head"),
    "alibi_per_batch": Case(batch=2, alibi="per_batch", causal=True),
    "gqa_4_2": Case(heads_q=4, heads_kv=2),
    "mqa_4_1": Case(heads_q=4, heads_kv=1, seqlen_q=5, seqlen_k=3),
    "dropout": Case(batch=2, dropout_p=0.3),
    "everything": Case(batch=2, seqlen_q=5, seqlen_k=3, heads_q=4, heads_kv=2, causal=True,
                       window_size=(1, -1), softcap=2.0, alibi="per_batch", dropout_p=0.25),
    # Empty sizes, which the API accepts: out 0 and lse -inf for every row when there is no key.
    "no_keys": Case(batch=2, seqlen_k=0),
    "no_keys_everything": Case(batch=2, seqlen_q=4, seqlen_k=0, heads_q=4, heads_kv=2, causal=True,
                               window_size=(1, 0), softcap=2.0, alibi="per_batch", dropout_p=0.25),
    "no_queries": Case(seqlen_q=0, causal=True),
    "no_batch": Case(batch=0, alibi="per_head"),
    "no_queries_no_keys": Case(seqlen_q=0, seqlen_k=0),
}
EMPTY = [name for name in CASES if name.startswith("no_")]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random signed normal q, k, v, dout and the option keywords of ``case``."""
    rng = np.random.default_rng(seed)
    b, sq, sk, hq, hkv, d = (case.batch, case.seqlen_q, case.seqlen_k, case.heads_q,
                             case.heads_kv, case.head_dim)
    arrays = dict(q=rng.standard_normal((b, sq, hq, d)), k=rng.standard_normal((b, sk, hkv, d)),
                  v=rng.standard_normal((b, sk, hkv, d)), dout=rng.standard_normal((b, sq, hq, d)))
    slopes = {"": None, "per_head": rng.uniform(0.1, 1.0, hq),
              "per_batch": rng.uniform(0.1, 1.0, (b, hq))}[case.alibi]
    mask = rng.random((b, hq, sq, sk)) >= case.dropout_p if case.dropout_p else None
    opts = dict(causal=case.causal, window_size=case.window_size, softcap=case.softcap,
                alibi_slopes=slopes, dropout_p=case.dropout_p, dropout_mask=mask,
                softmax_scale=case.softmax_scale)
    return arrays, opts


# --------------------------------------------------------------------------- loop oracle


def sees(i: int, j: int, sq: int, sk: int, causal: bool, window: tuple[int, int]) -> bool:
    """Visibility written straight from the convention, independently of the library."""
    off = sk - sq
    left, right = window
    if causal and j > i + off:
        return False
    if left >= 0 and j < i + off - left:
        return False
    if right >= 0 and j > i + off + right:
        return False
    return 0 <= j < sk


def loop_attention(q, k, v, dout, causal=False, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, dropout_p=0.0, dropout_mask=None, softmax_scale=None):
    """out, lse, dq, dk, dv with explicit Python loops and the math module."""
    bsz, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    out, lse = np.zeros(q.shape), np.zeros((bsz, hq, sq))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(bsz):
        for h in range(hq):
            g = h // (hq // hkv)
            slope = 0.0
            if alibi_slopes is not None:
                slope = alibi_slopes[h] if alibi_slopes.ndim == 1 else alibi_slopes[b, h]
            for i in range(sq):
                row = loop_row(q, k, v, dout, b, h, g, i, scale, slope, causal, window_size,
                               softcap, dropout_p, dropout_mask)
                out[b, i, h], lse[b, h, i] = row["out"], row["lse"]
                dq[b, i, h] += row["dq"]
                for j, (dk_j, dv_j) in row["dkv"].items():
                    dk[b, j, g] += dk_j
                    dv[b, j, g] += dv_j
    return out, lse, dq, dk, dv


def loop_row(q, k, v, dout, b, h, g, i, scale, slope, causal, window, softcap, p, mask):
    """Forward and backward of one query row i of (batch b, q head h, kv head g)."""
    sq, d = q.shape[1], q.shape[3]
    sk = k.shape[1]
    xs, ss = {}, {}
    for j in range(sk):
        if sees(i, j, sq, sk, causal, window):
            s = scale * sum(q[b, i, h, c] * k[b, j, g, c] for c in range(d))
            x = softcap * math.tanh(s / softcap) if softcap else s
            xs[j], ss[j] = x - slope * abs(i + sk - sq - j), s
    if not xs:
        return dict(out=np.zeros(d), lse=-math.inf, dq=np.zeros(d), dkv={})
    top = max(xs.values())
    lse = top + math.log(sum(math.exp(x - top) for x in xs.values()))
    prob = {j: math.exp(x - lse) for j, x in xs.items()}
    drop = {j: (mask[b, h, i, j] / (1 - p) if p else 1.0) for j in xs}
    o = [sum(prob[j] * drop[j] * v[b, j, g, c] for j in xs) for c in range(d)]
    delta = sum(dout[b, i, h, c] * o[c] for c in range(d))
    dq, dkv = np.zeros(d), {}
    for j in xs:
        dp = drop[j] * sum(dout[b, i, h, c] * v[b, j, g, c] for c in range(d))
        ds = prob[j] * (dp - delta) * scale
        if softcap:
            ds *= 1 - math.tanh(ss[j] / softcap) ** 2
        dq += ds * k[b, j, g]
        dkv[j] = (ds * q[b, i, h], prob[j] * drop[j] * dout[b, i, h])
    return dict(out=np.array(o), lse=lse, dq=dq, dkv=dkv)


# --------------------------------------------------------------------------- vs the loops


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_loops(name: str) -> None:
    arrays, opts = make_inputs(CASES[name])
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
    out, lse = ref.attention_forward(q, k, v, **opts)
    dq, dk, dv = ref.attention_backward(dout, q, k, v, **opts)
    expected = loop_attention(q, k, v, dout, **opts)
    for got, want, what in zip((out, lse, dq, dk, dv), expected, ("out", "lse", "dq", "dk", "dv")):
        assert got.dtype == np.float64 and got.shape == want.shape, what
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=what)


# --------------------------------------------------------------------------- finite differences


def finite_difference(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() w.r.t. every entry of x (modified in place)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        saved = x[idx]
        x[idx] = saved + eps
        up = f()
        x[idx] = saved - eps
        down = f()
        x[idx] = saved
        grad[idx] = (up - down) / (2 * eps)
    return grad


FD_CASES = ["plain", "causal_sq<sk", "causal_sq>sk", "window_2_1", "window_causal", "softcap",
            "alibi_per_batch", "mqa_4_1", "dropout", "everything"]


@pytest.mark.parametrize("name", FD_CASES)
def test_backward_matches_finite_differences(name: str) -> None:
    arrays, opts = make_inputs(CASES[name], seed=1)
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]

    def loss() -> float:
        return float(np.sum(ref.attention_forward(q, k, v, **opts)[0] * dout))

    grads = ref.attention_backward(dout, q, k, v, **opts)
    for x, grad, what in zip((q, k, v), grads, ("dq", "dk", "dv")):
        np.testing.assert_allclose(grad, finite_difference(loss, x), rtol=1e-6, atol=1e-8,
                                   err_msg=what)


# --------------------------------------------------------------------------- masks


def test_bottom_right_causal_mask_short_queries() -> None:
    expected = np.array([[1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1]], dtype=bool)
    got = ref.visible_mask(3, 5, causal=True)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)


def test_bottom_right_causal_mask_long_queries() -> None:
    expected = np.array([[0, 0, 0],
                         [0, 0, 0],
                         [1, 0, 0],
                         [1, 1, 0],
                         [1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ref.visible_mask(5, 3, causal=True), expected)


@pytest.mark.parametrize("window, causal, expected", [
    ((1, 0), False, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
    ((0, 1), False, [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]]),
    ((-1, 1), True, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
    ((2, -1), False, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]),
], ids=["left1_right0", "left0_right1", "causal_overrides_right", "left2_only"])
def test_window_masks(window, causal, expected) -> None:
    got = ref.visible_mask(4, 4, causal=causal, window_size=window)
    np.testing.assert_array_equal(got, np.array(expected, dtype=bool))


@pytest.mark.parametrize("name", ["causal_sq>sk", "window_right_only", "everything"])
def test_fully_masked_rows(name: str) -> None:
    """Rows without a visible key: out 0, lse -inf, no gradient, no NaN, no warning."""
    case = CASES[name]
    arrays, opts = make_inputs(case)
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
    dead = ~ref.visible_mask(case.seqlen_q, case.seqlen_k, case.causal,
                             case.window_size).any(axis=1)
    assert dead.any() and not dead.all()
    dout_dead = np.where(dead[None, :, None, None], dout, 0.0)  # gradient only from dead rows
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error")
        out, lse = ref.attention_forward(q, k, v, **opts)
        grads_all = ref.attention_backward(dout, q, k, v, **opts)
        grads_dead = ref.attention_backward(dout_dead, q, k, v, **opts)
    assert np.all(out[:, dead] == 0) and np.all(lse[:, :, dead] == -np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[:, :, ~dead]))
    assert np.all(grads_all[0][:, dead] == 0)
    for g in grads_all:
        assert np.all(np.isfinite(g))
    for g in grads_dead:
        assert np.all(g == 0)


@pytest.mark.parametrize("compute_dtype", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("name", EMPTY)
def test_empty_sizes(name: str, compute_dtype: str | None) -> None:
    """seqlen_k = 0 (every row sees nothing), seqlen_q = 0, batch = 0: shapes as always, out 0,
    lse -inf, gradients 0, in float64 and in the baselines, with no NaN and no warning."""
    case = CASES[name]
    arrays, opts = make_inputs(case)
    q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out, lse = ref.attention_forward(q, k, v, compute_dtype=compute_dtype, **opts)
        dq, dk, dv = ref.attention_backward(dout, q, k, v, compute_dtype=compute_dtype, **opts)
    expected_dtype = np.float64 if compute_dtype is None else np.float32
    assert out.shape == q.shape and lse.shape == (case.batch, case.heads_q, case.seqlen_q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    for array in (out, lse, dq, dk, dv):
        assert array.dtype == expected_dtype
    assert np.all(out == 0) and np.all(lse == -np.inf)
    assert all(np.all(g == 0) for g in (dq, dk, dv))


def test_no_visible_key_at_all() -> None:
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, n, 2, 4)) for n in (4, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = ref.attention_forward(q, k, v, causal=True, window_size=(0, 0))
        grads = ref.attention_backward(q, q, k, v, causal=True, window_size=(0, 0))
    assert np.all(out[:, :3] == 0) and np.all(lse[:, :, :3] == -np.inf)
    assert np.all(np.isfinite(lse[:, :, 3])) and all(np.all(np.isfinite(g)) for g in grads)


# --------------------------------------------------------------------------- validation


def test_argument_errors() -> None:
    arrays, _ = make_inputs(Case(heads_q=3, heads_kv=3))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    with pytest.raises(ValueError, match="4-D"):
        ref.attention_forward(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        ref.attention_forward(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="differ"):
        ref.attention_forward(q, k, v[:, :4])
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.attention_forward(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="shape"):
        ref.attention_forward(q, k, v, dropout_p=0.1, dropout_mask=np.ones((1, 3, 3, 4), bool))
    with pytest.raises(ValueError, match="dropout_p"):
        ref.attention_forward(q, k, v, dropout_p=1.0, dropout_mask=np.ones((1, 3, 3, 5), bool))
    with pytest.raises(ValueError, match="alibi"):
        ref.attention_forward(q, k, v, alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match="dout"):
        ref.attention_backward(q[:, :2], q, k, v)


# --------------------------------------------------------------------------- baseline


BASELINE = [("float16", np.float16, 2e-3), ("bfloat16", ml_dtypes.bfloat16, 1e-2)]  # relative


@pytest.mark.parametrize("name, np_dtype, tol", BASELINE, ids=[b[0] for b in BASELINE])
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_baseline_close_but_not_exact(name, np_dtype, tol, case) -> None:
    """The half-precision baseline differs from float64 (on the same rounded inputs), a little."""
    arrays, opts = make_inputs(replace(CASES[case], seqlen_q=33, seqlen_k=40, head_dim=16))
    q, k, v, dout = (arrays[n].astype(np_dtype) for n in ("q", "k", "v", "dout"))
    exact = (*ref.attention_forward(q, k, v, **opts),
             *ref.attention_backward(dout, q, k, v, **opts))
    base = (*ref.attention_forward(q, k, v, compute_dtype=name, **opts),
            *ref.attention_backward(dout, q, k, v, compute_dtype=name, **opts))
    for got, want, what in zip(base, exact, ("out", "lse", "dq", "dk", "dv")):
        assert got.dtype == np.float32, what
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got), finite), what
        err = np.max(np.abs(got[finite] - want[finite]))
        assert 0 < err < tol * max(1.0, np.max(np.abs(want[finite]))), (what, err)
        if what != "lse":  # outputs are values of the baseline dtype
            np.testing.assert_array_equal(ref.round_to(got, name), got, err_msg=what)


def test_baseline_accepts_dtype_objects_and_float32_inputs() -> None:
    arrays, opts = make_inputs(CASES["plain"])
    q, k, v = (arrays[n].astype(np.float32) for n in ("q", "k", "v"))
    a = ref.attention_forward(q, k, v, compute_dtype="bfloat16")[0]
    b = ref.attention_forward(q, k, v, compute_dtype=ml_dtypes.bfloat16)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="compute_dtype"):
        ref.attention_forward(q, k, v, compute_dtype="int8")


# --------------------------------------------------------------------------- round_to


def special_float32_values(rng: np.random.Generator) -> np.ndarray:
    """Random normals at many scales plus ties, subnormals, extremes, infinities and NaN."""
    normals = rng.standard_normal(4000) * np.exp2(rng.integers(-140, 128, 4000).astype(float))
    kept = rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << np.uint32(16)
    ties = (kept | np.uint32(0x8000)).view(np.float32)  # exactly halfway between bfloat16s
    near = np.concatenate([kept | np.uint32(0x7FFF), kept | np.uint32(0x8001)]).view(np.float32)
    extremes = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 3.3895e38,
                         np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, 1e-45, 1e-40, 5.96e-8, 2.98e-8],
                        dtype=np.float32)
    with np.errstate(over="ignore"):
        return np.concatenate([normals.astype(np.float32), ties, near, extremes])


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values with equal signs of zero, NaN equal to NaN."""
    same_sign = np.array_equal(np.signbit(a), np.signbit(b))
    return bool(np.array_equal(a, b, equal_nan=True) and same_sign)


@pytest.mark.parametrize("target", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("source", [np.float32, np.float64], ids=["from_f32", "from_f64"])
def test_round_to_matches_casts(target, source) -> None:
    x = special_float32_values(np.random.default_rng(7)).astype(source)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float32).astype(target).astype(source)  # exact: x is a float32
    got = ref.round_to(x, np.dtype(target).name)
    assert got.dtype == source
    assert same_values(got, expected)


def test_round_to_bfloat16_from_float64_avoids_double_rounding() -> None:
    """Just above / below a bfloat16 tie, but a float32 cast lands exactly on the tie."""
    tie = 1 + 2.0 ** -8  # halfway between the bfloat16 values 1 and 1 + 2**-7
    x = np.array([tie + 2.0 ** -40, tie - 2.0 ** -40, -(tie + 2.0 ** -40), tie])
    got = ref.round_to(x, "bfloat16")
    np.testing.assert_array_equal(got, [1 + 2.0 ** -7, 1.0, -(1 + 2.0 ** -7), 1.0])


def test_round_to_rejects_other_types() -> None:
    with pytest.raises(ValueError):
        ref.round_to(np.ones(3, np.float16), "bfloat16")
    with pytest.raises(ValueError):
        ref.round_to(np.ones(3, np.float32), "float8")
