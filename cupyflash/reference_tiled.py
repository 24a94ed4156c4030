"""FlashAttention-2 (Dao, 2023), Algorithms 1 and 2, tile by tile in NumPy float64.

This module is the blueprint of the CUDA kernels: it computes exactly what
:mod:`cupyflash.reference` computes, but the way a kernel does, so it can be read side by
side with the kernel source.

* Forward (Algorithm 1): one thread block per (batch, q head, Q tile of ``block_m`` rows).
  It streams over the K/V tiles of ``block_n`` keys that can hold a visible key, keeping a
  running row max ``m_i``, row sum ``l_i`` and unnormalised output ``acc_o`` (online softmax).
* Backward (Algorithm 2): one thread block per (batch, kv head, K/V tile).  It loops over
  the q heads sharing that kv head and over the Q tiles that can see the K/V tile,
  recomputes ``P_ij`` from the saved ``lse``, accumulates ``dK_j``, ``dV_j`` locally and
  adds into ``dQ_i`` (atomically, in the kernel). With ``dq_pass=True`` it leaves dQ out, and
  a second pass makes it the forward's way: one thread block per (batch, q head, Q tile) walks
  its K/V tiles in order and keeps ``dQ_i`` locally (the dQ kernels, flash_bwd_dq*.cu: what
  deterministic=True runs, and the Hopper default above head dim 128).

Layout and conventions are those of :mod:`cupyflash.reference`: q (B, Sq, Hq, D),
k and v (B, Sk, Hkv, D), lse (B, Hq, Sq), bottom-right aligned masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cupyflash.reference import (
    LogitOptions,
    alibi_slopes_2d,
    check_qkv,
    default_softmax_scale,
    dropout_keep,
    effective_window,
    logits,
    softcap_grad,
)


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b) for b > 0 (also right for negative a)."""
    return -(-a // b)


# --------------------------------------------------------------------------- tile ranges


def n_block_range(m_block: int, *, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int,
                  causal: bool = False, window_size: tuple[int, int] = (-1, -1)
                  ) -> tuple[int, int]:
    """K/V tiles ``[n_block_min, n_block_max)`` holding a key visible to Q tile ``m_block``.

    Query i sees keys j in [i + off - left, i + off + right] (off = Sk - Sq) clipped to
    [0, Sk).  Both ends grow with i, so the tile's first row gives the lowest key and its
    last row the highest.  Returns (0, 0) when no row of the tile sees any key.
    """
    left, right = effective_window(causal, window_size)
    off = seqlen_k - seqlen_q
    first_row = m_block * block_m
    last_row = min(seqlen_q, first_row + block_m) - 1  # the last tile may be partial
    key_lo = 0 if left < 0 else max(0, first_row + off - left)
    key_hi = seqlen_k if right < 0 else min(seqlen_k, last_row + off + right + 1)  # exclusive
    if key_hi <= key_lo:
        return 0, 0
    return key_lo // block_n, ceil_div(key_hi, block_n)


def m_block_range(n_block: int, *, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int,
                  causal: bool = False, window_size: tuple[int, int] = (-1, -1)
                  ) -> tuple[int, int]:
    """Q tiles ``[m_block_min, m_block_max)`` holding a query that sees a key of K/V tile
    ``n_block`` (the mirror image of :func:`n_block_range`, used by the backward pass).

    Key j is seen by queries i in [j - off - right, j - off + left] clipped to [0, Sq).
    Returns (0, 0) when no key of the tile is seen by any query.
    """
    left, right = effective_window(causal, window_size)
    off = seqlen_k - seqlen_q
    first_col = n_block * block_n
    last_col = min(seqlen_k, first_col + block_n) - 1
    row_lo = 0 if right < 0 else max(0, first_col - off - right)
    row_hi = seqlen_q if left < 0 else min(seqlen_q, last_col - off + left + 1)  # exclusive
    if row_hi <= row_lo:
        return 0, 0
    return row_lo // block_m, ceil_div(row_hi, block_m)


def _tile(block: int, size: int, length: int) -> slice:
    """Positions of tile ``block`` of ``size`` in a sequence of ``length`` (last may be short)."""
    return slice(block * size, min(length, (block + 1) * size))


# --------------------------------------------------------------------------- problem setup


@dataclass(frozen=True)
class _Problem:
    """The inputs and options of one call: float64 arrays in the (B, S, H, D) layout."""

    q: np.ndarray  # (B, Sq, Hq, D)
    k: np.ndarray  # (B, Sk, Hkv, D)
    v: np.ndarray  # (B, Sk, Hkv, D)
    opts: LogitOptions
    slopes: np.ndarray | None  # (B, Hq) ALiBi slopes
    keep: np.ndarray | None  # (B, Hq, Sq, Sk) 0/1 dropout keep mask
    dropout_p: float
    block_m: int
    block_n: int

    @property
    def group(self) -> int:
        """Number of q heads sharing one kv head (1 = MHA, Hq = MQA)."""
        return self.q.shape[2] // self.k.shape[2]

    def ranges(self) -> dict:
        """Keyword arguments for n_block_range / m_block_range."""
        o = self.opts
        return dict(block_m=self.block_m, block_n=self.block_n, seqlen_q=o.seqlen_q,
                    seqlen_k=o.seqlen_k, causal=o.causal, window_size=o.window_size)


def _problem(q: np.ndarray, k: np.ndarray, v: np.ndarray, block_m: int, block_n: int,
             causal: bool, softmax_scale: float | None, window_size: tuple[int, int],
             softcap: float, alibi_slopes: np.ndarray | None, dropout_p: float,
             dropout_mask: np.ndarray | None) -> _Problem:
    """Validate and convert the arguments shared by flash_forward and flash_backward."""
    q, k, v = (np.asarray(t.astype(np.float64)) for t in (q, k, v))
    check_qkv(q, k, v)
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = default_softmax_scale(head_dim) if softmax_scale is None else float(softmax_scale)
    opts = LogitOptions(seqlen_q, seqlen_k, scale, float(softcap), causal, tuple(window_size))
    slopes = alibi_slopes_2d(alibi_slopes, batch, heads, np.float64)
    keep = dropout_keep(dropout_p, dropout_mask, (batch, heads, seqlen_q, seqlen_k), np.float64)
    return _Problem(q, k, v, opts, slopes, keep, float(dropout_p), block_m, block_n)


def _tile_logits(pb: _Problem, b: int, h: int, rows: slice, cols: slice
                 ) -> tuple[np.ndarray, np.ndarray]:
    """S_ij (masked logits) and s_ij (raw scaled scores), both (M, N), for one tile pair."""
    Q_i = pb.q[b, rows, h]
    K_j = pb.k[b, cols, h // pb.group]
    row_pos = np.arange(rows.start, rows.stop)[:, None]
    col_pos = np.arange(cols.start, cols.stop)[None, :]
    slope = None if pb.slopes is None else pb.slopes[b, h]
    return logits(Q_i, K_j, row_pos, col_pos, pb.opts, slope)


def _dropout_scale(pb: _Problem, b: int, h: int, rows: slice, cols: slice) -> np.ndarray | float:
    """keep_ij / (1 - p) for one tile (M, N), or 1.0 without dropout."""
    if pb.keep is None:
        return 1.0
    return pb.keep[b, h, rows, cols] / (1.0 - pb.dropout_p)


# --------------------------------------------------------------------------- forward


def flash_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, block_m: int, block_n: int,
                  causal: bool = False, softmax_scale: float | None = None,
                  window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: np.ndarray | None = None, dropout_p: float = 0.0,
                  dropout_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FlashAttention-2 forward (Algorithm 1) in float64.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); block_m / block_n: Q / K tile sizes in rows
    (keys).  Other options as in reference.attention_forward.
    Returns out (B, Sq, Hq, D) float64 and lse (B, Hq, Sq) float64 (natural log).
    """
    pb = _problem(q, k, v, block_m, block_n, causal, softmax_scale, window_size, softcap,
                  alibi_slopes, dropout_p, dropout_mask)
    batch, seqlen_q, heads, _ = pb.q.shape
    out = np.zeros_like(pb.q)
    lse = np.full((batch, heads, seqlen_q), -np.inf)
    # Each (b, h, m_block) is one thread block of the kernel's grid.
    for b in range(batch):
        for h in range(heads):
            for m_block in range(ceil_div(seqlen_q, block_m)):
                rows = _tile(m_block, block_m, seqlen_q)
                out[b, rows, h], lse[b, h, rows] = _forward_q_tile(pb, b, h, m_block)
    return out, lse


def _forward_q_tile(pb: _Problem, b: int, h: int, m_block: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Online softmax over the K/V tiles for Q tile ``m_block``: O_i (M, D) and lse_i (M,)."""
    rows = _tile(m_block, pb.block_m, pb.opts.seqlen_q)
    M, D = rows.stop - rows.start, pb.q.shape[3]
    m_i = np.full(M, -np.inf)  # running row max of S
    l_i = np.zeros(M)  # running row sum of exp(S - m_i)
    acc_o = np.zeros((M, D))  # running sum of exp(S - m_i) @ V, not yet divided by l_i
    n_block_min, n_block_max = n_block_range(m_block, **pb.ranges())
    for n_block in range(n_block_min, n_block_max):  # tiles outside hold no visible key
        cols = _tile(n_block, pb.block_n, pb.opts.seqlen_k)
        S_ij, _ = _tile_logits(pb, b, h, rows, cols)
        m_new = np.maximum(m_i, S_ij.max(axis=1))
        # A row that has seen no visible key yet has m_new = -inf: use 0 in the exponent so
        # that exp(-inf - 0) = 0 instead of exp(-inf - (-inf)) = NaN.
        m_safe = np.where(m_new == -np.inf, 0.0, m_new)
        # The kernel uses exp2(x * log2(e) - m * log2(e)) with the factor folded into the
        # softmax scale: the same number, one multiply cheaper.
        P_ij = np.exp(S_ij - m_safe[:, None])
        correction = np.exp(m_i - m_safe)  # rescales sums taken with the old, smaller max
        l_i = correction * l_i + P_ij.sum(axis=1)  # lse ignores dropout: undropped P
        P_drop = P_ij * _dropout_scale(pb, b, h, rows, cols)
        V_j = pb.v[b, cols, h // pb.group]
        acc_o = correction[:, None] * acc_o + P_drop @ V_j
        m_i = m_new
    return _finalize(acc_o, m_i, l_i)


def _finalize(acc_o: np.ndarray, m_i: np.ndarray, l_i: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """O_i = acc_o / l_i and lse_i = m_i + log(l_i); rows that saw no key get 0 and -inf."""
    empty = l_i == 0
    l_safe = np.where(empty, 1.0, l_i)
    lse_i = np.where(empty, -np.inf, m_i + np.log(l_safe))
    return acc_o / l_safe[:, None], lse_i


# --------------------------------------------------------------------------- backward


@dataclass
class _Grads:
    """What the backward blocks read (dO, lse, delta) and the dQ they accumulate into."""

    dout: np.ndarray  # (B, Sq, Hq, D)
    lse: np.ndarray  # (B, Hq, Sq)
    delta: np.ndarray  # (B, Hq, Sq) rowsum(dO o O)
    dq: np.ndarray  # (B, Sq, Hq, D), accumulated across K/V tiles


def flash_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                   out: np.ndarray, lse: np.ndarray, *, block_m: int, block_n: int,
                   causal: bool = False, softmax_scale: float | None = None,
                   window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   alibi_slopes: np.ndarray | None = None, dropout_p: float = 0.0,
                   dropout_mask: np.ndarray | None = None, dq_pass: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashAttention-2 backward (Algorithm 2) in float64.

    dout, out (B, Sq, Hq, D) and lse (B, Hq, Sq) come from the forward pass; other
    arguments as in flash_forward; dq_pass makes dQ in a pass of its own (module docstring).
    Returns dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D).
    """
    pb = _problem(q, k, v, block_m, block_n, causal, softmax_scale, window_size, softcap,
                  alibi_slopes, dropout_p, dropout_mask)
    dout, out, lse = (np.asarray(t.astype(np.float64)) for t in (dout, out, lse))
    if dout.shape != pb.q.shape or out.shape != pb.q.shape:
        raise ValueError(f"dout {dout.shape} and out {out.shape} must have q's shape {pb.q.shape}")
    if lse.shape != (pb.q.shape[0], pb.q.shape[2], pb.q.shape[1]):
        raise ValueError(f"lse shape {lse.shape} must be (B, Hq, Sq)")
    # delta_i = rowsum(dO_i o O_i) is computed first (a separate small kernel in CUDA).
    delta = np.einsum("bshd,bshd->bhs", dout, out)
    g = _Grads(dout, lse, delta, np.zeros_like(pb.q))
    dk, dv = np.zeros_like(pb.k), np.zeros_like(pb.v)
    batch, seqlen_k, kv_heads, _ = pb.k.shape
    # Each (b, kv_head, n_block) is one thread block of the kernel's grid.
    for b in range(batch):
        for kv_head in range(kv_heads):
            for n_block in range(ceil_div(seqlen_k, block_n)):
                cols = _tile(n_block, block_n, seqlen_k)
                dk[b, cols, kv_head], dv[b, cols, kv_head] = _backward_kv_tile(
                    pb, g, b, kv_head, n_block, add_dq=not dq_pass)
    if dq_pass:
        # Each (b, q head, m_block) is one thread block of the dQ kernel's grid.
        for b in range(batch):
            for h in range(pb.q.shape[2]):
                for m_block in range(ceil_div(pb.opts.seqlen_q, block_m)):
                    rows = _tile(m_block, block_m, pb.opts.seqlen_q)
                    g.dq[b, rows, h] = _dq_q_tile(pb, g, b, h, m_block)
    return g.dq, dk, dv


def _backward_kv_tile(pb: _Problem, g: _Grads, b: int, kv_head: int, n_block: int, add_dq: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One K/V tile: loop over the q heads of its group and the Q tiles that can see it.

    Returns dK_j and dV_j (N, D), summed over the q heads of the group; adds into g.dq
    when add_dq.
    """
    cols = _tile(n_block, pb.block_n, pb.opts.seqlen_k)
    dK_j = np.zeros((cols.stop - cols.start, pb.k.shape[3]))
    dV_j = np.zeros_like(dK_j)
    m_block_min, m_block_max = m_block_range(n_block, **pb.ranges())
    for h in range(kv_head * pb.group, (kv_head + 1) * pb.group):
        for m_block in range(m_block_min, m_block_max):  # other Q tiles see no key here
            rows = _tile(m_block, pb.block_m, pb.opts.seqlen_q)
            _backward_tile_pair(pb, g, b, h, rows, cols, dK_j, dV_j, add_dq)
    return dK_j, dV_j


def _backward_tile_pair(pb: _Problem, g: _Grads, b: int, h: int, rows: slice, cols: slice,
                        dK_j: np.ndarray, dV_j: np.ndarray, add_dq: bool) -> None:
    """Algorithm 2 inner step for Q tile ``rows`` x K/V tile ``cols`` of q head h.

    Adds into dK_j and dV_j (N, D) and, when add_dq, into g.dq[b, rows, h] (M, D).
    """
    Q_i, dO_i = pb.q[b, rows, h], g.dout[b, rows, h]
    K_j = pb.k[b, cols, h // pb.group]
    P_dropped, dS_ij = _tile_gradients(pb, g, b, h, rows, cols)
    dV_j += P_dropped.T @ dO_i
    dK_j += dS_ij.T @ Q_i
    if add_dq:
        g.dq[b, rows, h] += dS_ij @ K_j  # an atomicAdd in the kernel: K/V tiles run in parallel


def _dq_q_tile(pb: _Problem, g: _Grads, b: int, h: int, m_block: int) -> np.ndarray:
    """The dQ pass for Q tile ``m_block`` of q head h: dQ_i (M, D) over its K/V tiles, in order."""
    rows = _tile(m_block, pb.block_m, pb.opts.seqlen_q)
    dQ_i = np.zeros((rows.stop - rows.start, pb.q.shape[3]))
    n_block_min, n_block_max = n_block_range(m_block, **pb.ranges())
    for n_block in range(n_block_min, n_block_max):  # other K/V tiles hold no key these rows see
        cols = _tile(n_block, pb.block_n, pb.opts.seqlen_k)
        _, dS_ij = _tile_gradients(pb, g, b, h, rows, cols)
        dQ_i += dS_ij @ pb.k[b, cols, h // pb.group]
    return dQ_i


def _tile_gradients(pb: _Problem, g: _Grads, b: int, h: int, rows: slice, cols: slice
                    ) -> tuple[np.ndarray, np.ndarray]:
    """P_ij after dropout (for dV) and dS_ij with respect to q.k (for dK and dQ) of Q tile
    ``rows`` x K/V tile ``cols`` of q head h, recomputed from the saved lse."""
    dO_i = g.dout[b, rows, h]
    V_j = pb.v[b, cols, h // pb.group]
    S_ij, s_ij = _tile_logits(pb, b, h, rows, cols)
    lse_i = g.lse[b, h, rows]
    dead = lse_i == -np.inf  # rows that see no key at all: nothing flows back from them
    P_ij = np.exp(S_ij - np.where(dead, 0.0, lse_i)[:, None])  # exactly the forward's P
    P_ij = np.where(dead[:, None], 0.0, P_ij)
    drop = _dropout_scale(pb, b, h, rows, cols)
    dP_ij = (dO_i @ V_j.T) * drop  # through dropout: d(loss)/d(P_ij) before dropping
    dS_ij = P_ij * (dP_ij - g.delta[b, h, rows][:, None])  # softmax backward
    dS_ij = dS_ij * softcap_grad(s_ij, pb.opts.softcap) * pb.opts.scale  # back to q.k
    return P_ij * drop, dS_ij
