"""merge_attention without a GPU: the float64 reference merge against attention over all the
keys, and every bad input refused, naming the argument, before any GPU is looked for."""

from __future__ import annotations

import numpy as np
import pytest

import cupyflash as cf
from cupyflash import reference


@pytest.mark.parametrize("splits", [(7,), (3, 4), (0, 5, 0, 2), (1, 1, 1, 1, 1, 1, 1, 1)])
def test_reference_merge_of_key_slices_is_attention_over_all(splits: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal((2, 7, 2, 8)), rng.standard_normal((2, 7, 2, 8))
    edges = np.concatenate([[0], np.cumsum(splits)]).astype(int)
    parts = [reference.attention_forward(q, k[:, a:b], v[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
    out, lse = reference.merge_attention([o for o, _ in parts], [s for _, s in parts])
    want_out, want_lse = reference.attention_forward(q, k, v)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_reference_merge_rows_no_part_saw() -> None:
    outs = [np.ones((1, 2, 1, 4)), np.full((1, 2, 1, 4), 2.0)]
    lses = [np.array([[[-np.inf, 0.0]]]), np.array([[[np.inf, -np.inf]]])]  # +inf counts as -inf
    out, lse = reference.merge_attention(outs, lses)
    assert np.all(out[0, 0] == 0) and lse[0, 0, 0] == -np.inf
    assert np.all(out[0, 1] == 1) and lse[0, 0, 1] == 0.0


def _ok(parts: int = 2, shape: tuple[int, ...] = (2, 3, 4, 8), dtype=np.float16):
    outs = [np.zeros(shape, dtype) for _ in range(parts)]
    lses = [np.zeros((shape[0], shape[2], shape[1]), np.float32) for _ in range(parts)]
    return outs, lses


BAD = [
    ("outs-not-a-list", lambda o, s: (o[0], s), TypeError, "outs must be a list or tuple of arrays"),
    ("lses-not-a-list", lambda o, s: (o, s[0]), TypeError, "lses must be a list or tuple of arrays"),
    ("counts-differ", lambda o, s: (o, s[:1]), ValueError, "outs has 2 parts but lses has 1"),
    ("no-parts", lambda o, s: ([], []), ValueError, "needs at least one part"),
    ("a-part-is-None", lambda o, s: ([o[0], None], s), TypeError, "outs[1] is None"),
    ("rank", lambda o, s: ([x[0] for x in o], s), ValueError, "outs[0] must be 4-D"),
    ("shape-differs", lambda o, s: ([o[0], o[1][:, :2]], s), ValueError, "outs[1] has shape (2, 2, 4, 8)"),
    ("float32-out", lambda o, s: ([x.astype(np.float32) for x in o], s), TypeError, "outs[0].dtype is float32"),
    ("dtype-differs", lambda o, s: ([o[0], o[1].astype(np.float32)], s), TypeError,
     "outs[1].dtype is float32 but outs[0].dtype is float16"),
    ("lse-float64", lambda o, s: (o, [s[0], s[1].astype(np.float64)]), TypeError, "lses[1].dtype is float64"),
    ("lse-shape", lambda o, s: (o, [s[0], s[1][:, :, :2]]), ValueError, "lses[1] has shape (2, 4, 2)"),
    ("strided-head-dim", lambda o, s: ([np.zeros((2, 3, 4, 16), np.float16)[..., ::2], o[1]], s), ValueError,
     "outs[0]'s last dimension (head_dim) must be contiguous"),
]


@pytest.mark.parametrize("make,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(make, error, message) -> None:
    outs, lses = make(*_ok())
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("*", r"\*")):
        cf.merge_attention(outs, lses)
