"""Dense ("naive") attention: the ground truth every cupyflash kernel is tested against.

Everything here favours clarity over speed: the whole (Sq, Sk) score matrix is built for
every (batch, head).  The functions are array-module generic: pass ``xp=cupy`` to run them
on a GPU (only :func:`visible_mask` always returns a small NumPy matrix).

Layout (the public layout of the library)::

    q     (B, Sq, Hq,  D)          out  (B, Sq, Hq, D)
    k, v  (B, Sk, Hkv, D)          lse  (B, Hq, Sq)    natural log of the softmax denominator

Query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (MQA / GQA).  Queries and keys
are aligned at the bottom right: query ``i`` sits at key position ``i + Sk - Sq``.

Two precisions:

* ``compute_dtype=None``: inputs upcast to float64, all math in float64 (the "exact" answer).
* ``compute_dtype="float16" | "bfloat16"``: the same-precision *baseline*, which emulates a
  tensor-core kernel: operands of every matmul are values of that dtype, accumulation and
  softmax are float32, outputs are rounded to the dtype (returned as float32 arrays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

import numpy as np

Array = Any  # a numpy.ndarray or a cupy.ndarray

#: Names accepted by ``compute_dtype`` for the same-precision baseline.
BASELINE_DTYPES = ("float16", "bfloat16")


# --------------------------------------------------------------------------- visibility


def effective_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """Return ``(left, right)`` with ``causal`` folded in; -1 means unbounded on that side.

    Causal attention is a window whose right side is 0 (a query never sees a key after its
    own position), so ``causal=True`` forces ``right = 0`` whatever ``window_size`` says.
    """
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (max(int(w), -1) for w in window_size)  # any negative value = unbounded
    return left, (0 if causal else right)


def visible(rows: Array, cols: Array, seqlen_q: int, seqlen_k: int, causal: bool = False,
            window_size: tuple[int, int] = (-1, -1)) -> Array:
    """True where key position ``cols`` is visible to query position ``rows``.

    rows, cols: integer arrays of absolute positions that broadcast together (e.g. (M, 1)
    and (1, N)); the result is a boolean array of the broadcast shape.
    """
    left, right = effective_window(causal, window_size)
    diag = rows + (seqlen_k - seqlen_q)  # the key aligned with each query (bottom right)
    # The range checks on both rows and cols also make the result broadcast to (M, N).
    ok = (rows >= 0) & (rows < seqlen_q) & (cols >= 0) & (cols < seqlen_k)
    if left >= 0:
        ok = ok & (cols >= diag - left)
    if right >= 0:
        ok = ok & (cols <= diag + right)
    return ok


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool = False,
                 window_size: tuple[int, int] = (-1, -1)) -> np.ndarray:
    """Boolean NumPy matrix (Sq, Sk): entry (i, j) is True iff key j is visible to query i."""
    rows = np.arange(seqlen_q)[:, None]
    cols = np.arange(seqlen_k)[None, :]
    return np.asarray(visible(rows, cols, seqlen_q, seqlen_k, causal, window_size))


# --------------------------------------------------------------------------- logits


@dataclass(frozen=True)
class LogitOptions:
    """Everything (besides ALiBi slopes) that turns ``q . k`` into the logit ``x_ij``.

    Shared by this module and the tiled reference so that both mask and score identically.
    ``scale`` is the softmax scale (1/sqrt(D) by default); ``softcap`` 0 means no capping.
    """

    seqlen_q: int
    seqlen_k: int
    scale: float
    softcap: float = 0.0
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)


def logits(q: Array, k: Array, rows: Array, cols: Array, opts: LogitOptions,
           slopes: Array | None = None, xp: ModuleType = np) -> tuple[Array, Array]:
    """Masked logits ``S_ij`` and the scaled raw scores ``s_ij = scale * q_i . k_j``.

    q: (..., M, D) queries at absolute positions ``rows`` (broadcastable to (..., M, 1)).
    k: (..., N, D) keys at absolute positions ``cols`` (broadcastable to (..., 1, N)).
    slopes: ALiBi slopes broadcastable to (..., 1, 1), or None.
    Returns (S, s), both (..., M, N) in the dtype of q; S is -inf where a key is masked.
    The raw scores are returned because the softcap gradient needs them.
    """
    s = xp.matmul(q, xp.swapaxes(k, -1, -2)) * opts.scale
    x = opts.softcap * xp.tanh(s / opts.softcap) if opts.softcap > 0 else s
    if slopes is not None:
        distance = xp.abs(rows + (opts.seqlen_k - opts.seqlen_q) - cols).astype(x.dtype)
        x = x - slopes * distance
    ok = visible(rows, cols, opts.seqlen_q, opts.seqlen_k, opts.causal, opts.window_size)
    return xp.where(ok, x, -xp.inf), s


def softcap_grad(s: Array, softcap: float, xp: ModuleType = np) -> Array | float:
    """d(softcap * tanh(s / softcap)) / ds = 1 - tanh^2(s / softcap); 1.0 without softcap."""
    if softcap <= 0:
        return 1.0
    return 1.0 - xp.tanh(s / softcap) ** 2


def softmax_rows(x: Array, xp: ModuleType = np) -> tuple[Array, Array]:
    """Row softmax over the last axis of logits x (..., N) with -inf for masked entries.

    Returns P (..., N) and lse (...).  A row with no visible key gets P = 0 and lse = -inf,
    without producing NaN or a floating point warning; so does every row when N = 0.
    """
    if x.shape[-1] == 0:  # no key at all (seqlen_k = 0): max has no identity, every row is empty
        return xp.zeros_like(x), xp.full(x.shape[:-1], -xp.inf, dtype=x.dtype)
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(m == -xp.inf, 0.0, m)  # avoids (-inf) - (-inf); exp(-inf - 0) is just 0
    e = xp.exp(x - m)
    l = xp.sum(e, axis=-1, keepdims=True)
    empty = l == 0
    l_safe = xp.where(empty, 1.0, l)
    lse = xp.where(empty, -xp.inf, m + xp.log(l_safe))
    return e / l_safe, lse[..., 0]


def default_softmax_scale(head_dim: int) -> float:
    """The default softmax scale 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------- validation


def check_qkv(q: Array, k: Array, v: Array) -> None:
    """Raise ValueError unless q (B, Sq, Hq, D), k = v (B, Sk, Hkv, D) with Hq % Hkv == 0."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must be 4-D: (batch, seqlen, heads, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"batch or head_dim of q {q.shape} and k {k.shape} differ")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def dropout_keep(dropout_p: float, dropout_mask: Array | None, shape: tuple[int, ...],
                 dtype: Any, xp: ModuleType = np) -> Array | None:
    """The keep mask as 0/1 values of ``dtype`` and shape (B, Hq, Sq, Sk), or None.

    Without dropout (``dropout_p == 0``) any given mask is ignored and None is returned.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return None
    if dropout_mask is None:
        raise ValueError("dropout_p > 0 needs an explicit boolean dropout_mask (B, Hq, Sq, Sk)")
    keep = xp.asarray(dropout_mask)
    if tuple(keep.shape) != tuple(shape):
        raise ValueError(f"dropout_mask shape {tuple(keep.shape)} != expected {tuple(shape)}")
    return keep.astype(dtype)


def alibi_slopes_2d(alibi_slopes: Array | None, batch: int, heads: int, dtype: Any,
                    xp: ModuleType = np) -> Array | None:
    """ALiBi slopes as a (B, Hq) array of ``dtype`` (from (Hq,) or (B, Hq)), or None."""
    if alibi_slopes is None:
        return None
    slopes = xp.asarray(_as_float(alibi_slopes, dtype))
    if slopes.shape == (heads,):
        return xp.broadcast_to(slopes, (batch, heads))
    if slopes.shape != (batch, heads):
        raise ValueError(f"alibi_slopes must be ({heads},) or ({batch}, {heads}), "
                         f"got {tuple(slopes.shape)}")
    return slopes


def _as_float(x: Any, dtype: Any) -> Any:
    """Convert with ``.astype`` first: bfloat16 (ml_dtypes) arrays cannot go through asarray."""
    return x.astype(dtype) if hasattr(x, "astype") else np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------- precision


def round_to(x: Array, dtype: Any, xp: ModuleType = np) -> Array:
    """Round float32/float64 values to the nearest float16 or bfloat16 value (ties to even).

    x: array of float32 or float64.  dtype: "float16", "bfloat16" or the matching dtype.
    Returns an array of the same dtype as x holding only values of the target type
    (out-of-range values become +-inf, NaN stays NaN).  bfloat16 needs no bfloat16 array type.
    """
    name = _dtype_name(dtype)
    x = xp.asarray(x)
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"round_to expects float32 or float64 values, got {x.dtype}")
    with np.errstate(over="ignore"):  # overflow to inf is the correct rounding, not an error
        if name == "float16":
            return x.astype(xp.float16).astype(x.dtype)
        if name == "bfloat16":
            return _round_bfloat16(x, xp).astype(x.dtype)
    raise ValueError(f"round_to: dtype must be float16 or bfloat16, got {dtype!r}")


def _round_bfloat16(x: Array, xp: ModuleType) -> Array:
    """bfloat16 rounding as float32: keep the top 16 bits, round to nearest, ties to even."""
    x32 = x.astype(xp.float32)
    bits = x32.view(xp.uint32)
    low = bits & xp.uint32(0xFFFF)  # the 16 bits that are dropped
    odd = (bits >> xp.uint32(16)) & xp.uint32(1)
    # Adding 0x7FFF (+1 when the kept part is odd) carries into bit 16 exactly when the
    # dropped part is above half, or exactly half and the kept part is odd.
    rounded = (bits + xp.uint32(0x7FFF) + odd) & xp.uint32(0xFFFF0000)
    if x.dtype == np.float64:
        # float64 -> float32 can itself round onto an exact bfloat16 tie (double rounding):
        # decide that tie from the side of the tie on which x really lies.
        tie = (low == xp.uint32(0x8000)) & (x32 != x)
        up = (bits & xp.uint32(0xFFFF0000)) + xp.uint32(0x10000)  # next magnitude up
        down = bits & xp.uint32(0xFFFF0000)
        rounded = xp.where(tie, xp.where(xp.abs(x) > xp.abs(x32), up, down), rounded)
    return xp.where(xp.isnan(x32), x32, rounded.view(xp.float32))  # keep NaN a NaN


def _dtype_name(dtype: Any) -> str:
    """'float16' / 'bfloat16' / ... from a string, a numpy dtype or an ml_dtypes type."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


@dataclass(frozen=True)
class _Precision:
    """How the math is done: all float64, or the float32 baseline rounding to ``rounding``."""

    dtype: Any  # np.float64 or np.float32 (CuPy accepts NumPy dtypes)
    rounding: str | None  # None, "float16" or "bfloat16"

    def operand(self, x: Array, xp: ModuleType) -> Array:
        """Round a matmul operand or a final output to the baseline dtype (float64: as is)."""
        return x if self.rounding is None else round_to(x, self.rounding, xp)


def _precision(compute_dtype: Any) -> _Precision:
    """Map ``compute_dtype`` (None, "float64", "float16", "bfloat16") to a _Precision."""
    name = None if compute_dtype is None else _dtype_name(compute_dtype)
    if name in (None, "float64"):
        return _Precision(np.float64, None)
    if name in BASELINE_DTYPES:
        return _Precision(np.float32, name)
    raise ValueError(f"compute_dtype must be None, 'float16' or 'bfloat16', got {compute_dtype!r}")


def _load(x: Array, prec: _Precision, xp: ModuleType) -> Array:
    """An input array in the compute dtype, rounded to the baseline dtype if there is one."""
    return prec.operand(xp.asarray(_as_float(x, prec.dtype)), xp)


# --------------------------------------------------------------------------- dense attention


@dataclass
class _Dense:
    """Forward quantities the backward pass needs, heads first: (B, Hq, S, D) / (B, Hq, Sq, Sk)."""

    q: Array  # (B, Hq, Sq, D)
    k: Array  # (B, Hq, Sk, D): kv heads repeated for their q heads
    v: Array  # (B, Hq, Sk, D)
    s: Array  # (B, Hq, Sq, Sk) raw scaled scores, before softcap
    P: Array  # (B, Hq, Sq, Sk) softmax probabilities (before dropout)
    lse: Array  # (B, Hq, Sq)
    out: Array  # (B, Hq, Sq, D), with dropout, rounded in the baseline
    keep: Array | None  # (B, Hq, Sq, Sk) 0/1, or None without dropout
    dropout_p: float
    scale: float
    softcap: float


def query_rows(rows: tuple[int, int] | None, seqlen_q: int) -> tuple[int, int]:
    """``(start, stop)`` of the query rows to compute: all of them when ``rows`` is None."""
    if rows is None:
        return 0, seqlen_q
    if len(rows) != 2:
        raise ValueError(f"rows must be (start, stop), got {rows!r}")
    start, stop = (int(r) for r in rows)
    if not 0 <= start <= stop <= seqlen_q:
        raise ValueError(f"rows is ({start}, {stop}); it must satisfy 0 <= start <= stop <= seqlen_q "
                         f"= {seqlen_q}")
    return start, stop


def _dense_forward(q: Array, k: Array, v: Array, prec: _Precision, xp: ModuleType,
                   causal: bool, softmax_scale: float | None, window_size: tuple[int, int],
                   softcap: float, alibi_slopes: Array | None, dropout_p: float,
                   dropout_mask: Array | None, rows: tuple[int, int] | None = None) -> _Dense:
    """Full-matrix forward pass, keeping every intermediate (see attention_forward); with
    ``rows``, only those query rows (their scores are (B, Hq, stop - start, Sk))."""
    q, k, v = (_load(t, prec, xp) for t in (q, k, v))
    check_qkv(q, k, v)
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, group = k.shape[1], heads // k.shape[2]
    start, stop = query_rows(rows, seqlen_q)
    scale = default_softmax_scale(head_dim) if softmax_scale is None else float(softmax_scale)
    # The full seqlen_q stays in the options: it places every row against the keys.
    opts = LogitOptions(seqlen_q, seqlen_k, scale, float(softcap), causal, tuple(window_size))
    shape = (batch, heads, seqlen_q, seqlen_k)
    keep = dropout_keep(dropout_p, dropout_mask, shape, prec.dtype, xp)
    keep = None if keep is None else keep[:, :, start:stop]
    slopes = alibi_slopes_2d(alibi_slopes, batch, heads, prec.dtype, xp)
    slopes = None if slopes is None else slopes[:, :, None, None]  # over (Sq, Sk)
    qh = xp.swapaxes(q[:, start:stop], 1, 2)
    kh = xp.swapaxes(xp.repeat(k, group, axis=2), 1, 2)  # q head h reads kv head h // group
    vh = xp.swapaxes(xp.repeat(v, group, axis=2), 1, 2)
    rows, cols = xp.arange(start, stop)[:, None], xp.arange(seqlen_k)[None, :]
    x, s = logits(qh, kh, rows, cols, opts, slopes, xp)
    P, lse = softmax_rows(x, xp)
    out = xp.matmul(_drop(prec.operand(P, xp), keep), vh) * (1.0 / (1.0 - dropout_p))
    return _Dense(qh, kh, vh, s, P, lse, prec.operand(out, xp), keep, dropout_p, scale,
                  float(softcap))


def _drop(P: Array, keep: Array | None) -> Array:
    """Zero the dropped probabilities; the 1/(1-p) factor is applied after the matmul, as the
    kernels do, so that in the baseline the matmul operand stays a float16/bfloat16 value."""
    return P if keep is None else P * keep


def _dense_backward(dO: Array, d: _Dense, prec: _Precision, xp: ModuleType
                    ) -> tuple[Array, Array, Array]:
    """Analytic gradients, heads first: dO (B, Hq, Sq, D) -> dQ, dK, dV (B, Hq, S, D)."""
    rescale = 1.0 / (1.0 - d.dropout_p)
    P_drop = _drop(prec.operand(d.P, xp), d.keep)
    dV = xp.matmul(xp.swapaxes(P_drop, -1, -2), dO) * rescale
    dP = xp.matmul(dO, xp.swapaxes(d.v, -1, -2))  # gradient w.r.t. the dropped P
    if d.keep is not None:
        dP = dP * d.keep * rescale  # ... and through dropout to P itself
    delta = xp.sum(dO * d.out, axis=-1, keepdims=True)  # rowsum(dO o O) = rowsum(P o dP)
    dS = d.P * (dP - delta) * softcap_grad(d.s, d.softcap, xp)  # gradient w.r.t. s_ij
    dS = prec.operand(dS, xp)  # kernels round dS before the two matmuls below
    dQ = xp.matmul(dS, d.k) * d.scale
    dK = xp.matmul(xp.swapaxes(dS, -1, -2), d.q) * d.scale
    return dQ, dK, dV


def _sum_groups(g: Array, kv_heads: int) -> Array:
    """(B, Hq, Sk, D) per q head -> (B, Sk, Hkv, D), summing the q heads of each kv head."""
    batch, heads, seqlen, dim = g.shape
    g = g.reshape(batch, kv_heads, heads // kv_heads, seqlen, dim).sum(axis=2)
    return g.transpose(0, 2, 1, 3)


def attention_forward(q: Array, k: Array, v: Array, *, causal: bool = False,
                      softmax_scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes: Array | None = None, dropout_p: float = 0.0,
                      dropout_mask: Array | None = None, xp: ModuleType | None = None,
                      compute_dtype: Any = None,
                      rows: tuple[int, int] | None = None) -> tuple[Array, Array]:
    """Dense attention forward pass.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any float dtype (incl. ml_dtypes bfloat16).
    alibi_slopes: (Hq,) or (B, Hq).  dropout_mask: boolean keep mask (B, Hq, Sq, Sk),
    required when dropout_p > 0.  xp: array module (NumPy by default).
    Returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) (natural log; -inf for rows that see
    no key, whose out row is 0): float64, or float32 in the float16/bfloat16 baseline.
    Any size may be 0 except Hkv (and D in practice): seqlen_k = 0 gives out 0 and lse -inf.
    rows: ``(start, stop)`` computes only query rows start <= i < stop of this problem (masks
    and alignment those of the full seqlen_q): out (B, stop - start, Hq, D), lse
    (B, Hq, stop - start), in (B, Hq, stop - start, Sk) of memory instead of (B, Hq, Sq, Sk).
    """
    xp = np if xp is None else xp
    d = _dense_forward(q, k, v, _precision(compute_dtype), xp, causal, softmax_scale,
                       window_size, softcap, alibi_slopes, dropout_p, dropout_mask, rows)
    return xp.ascontiguousarray(xp.swapaxes(d.out, 1, 2)), d.lse


def attention_backward(dout: Array, q: Array, k: Array, v: Array, *, causal: bool = False,
                       softmax_scale: float | None = None,
                       window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Array | None = None, dropout_p: float = 0.0,
                       dropout_mask: Array | None = None, xp: ModuleType | None = None,
                       compute_dtype: Any = None,
                       rows: tuple[int, int] | None = None) -> tuple[Array, Array, Array]:
    """Dense attention backward pass (recomputes the forward).

    dout: (B, Sq, Hq, D), the gradient of the loss w.r.t. ``out``; other arguments as in
    attention_forward.  Returns dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D), summed over
    the q heads that share a kv head; float64, or float32 rounded values in the baseline.
    Rows that see no key (all of them when seqlen_k = 0) contribute no gradient.
    rows: ``(start, stop)`` as in attention_forward: dq (B, stop - start, Hq, D) of those
    rows, and dk, dv the gradients of those rows' outputs alone (dout elsewhere is ignored).
    """
    xp = np if xp is None else xp
    prec = _precision(compute_dtype)
    d = _dense_forward(q, k, v, prec, xp, causal, softmax_scale, window_size, softcap,
                       alibi_slopes, dropout_p, dropout_mask, rows)
    dO = _load(dout, prec, xp)
    if tuple(dO.shape) != tuple(q.shape):
        raise ValueError(f"dout shape {tuple(dO.shape)} != q shape {tuple(q.shape)}")
    start, stop = query_rows(rows, q.shape[1])
    dQ, dK, dV = _dense_backward(xp.swapaxes(dO[:, start:stop], 1, 2), d, prec, xp)
    kv_heads = k.shape[2]
    grads = (xp.swapaxes(dQ, 1, 2), _sum_groups(dK, kv_heads), _sum_groups(dV, kv_heads))
    return tuple(xp.ascontiguousarray(prec.operand(g, xp)) for g in grads)


def merge_attention(outs: Sequence[Array], lses: Sequence[Array], xp: ModuleType | None = None) -> tuple[Array, Array]:
    """Results for the same queries over disjoint key sets, merged into the result over their
    union, in float64. outs: (B, Sq, Hq, D) each; lses: (B, Hq, Sq) each, -inf where a part saw
    no key (+inf is read as -inf too, flash_attn 2's mark). Returns out (B, Sq, Hq, D) and lse
    (B, Hq, Sq); a row no part saw gets 0 and -inf."""
    xp = np if xp is None else xp
    lse = xp.stack([xp.asarray(x, dtype=xp.float64) for x in lses])  # (P, B, Hq, Sq)
    lse = xp.where(lse == xp.inf, -xp.inf, lse)
    m = lse.max(axis=0)
    m_safe = xp.where(m == -xp.inf, 0.0, m)  # exp(-inf - 0) = 0 where no part saw a key
    w = xp.exp(lse - m_safe)
    total = w.sum(axis=0)
    empty = total == 0
    weights = xp.where(empty, 0.0, w / xp.where(empty, 1.0, total))  # (P, B, Hq, Sq)
    out = sum(xp.swapaxes(wi, 1, 2)[..., None] * xp.asarray(o, dtype=xp.float64) for wi, o in zip(weights, outs))
    return out, xp.where(empty, -xp.inf, m_safe + xp.log(xp.where(empty, 1.0, total)))
