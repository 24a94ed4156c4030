"""flash_attn 2's ``flash_attn_func`` and ``flash_attn_varlen_func`` on cupyflash's kernels.

The two functions keep flash_attn 2's signatures (argument names, order and defaults, as in
its ``flash_attn/flash_attn_interface.py``), so code written for flash_attn changes only its
import. Each is a thin wrapper: it refuses what the GPU kernels do not implement yet, then
calls ``cupyflash.attention`` or ``cupyflash.attention_varlen``.

What still differs from flash_attn, on purpose:

- No autograd: the results are CuPy arrays (PyTorch takes them back with ``torch.from_dlpack``),
  and gradients come from ``cupyflash.attention_backward`` / ``attention_varlen_backward``.
  The README's "Migrating from flash_attn" shows a ``torch.autograd.Function`` that does it.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the third item, flash_attn's
  ``S_dmask``, is ``None`` because cupyflash never materialises the probabilities P.
- ``dropout_p > 0``, ``softcap > 0``, ``alibi_slopes`` and ``block_table`` raise
  ``NotImplementedError`` naming the argument, before any GPU work.
"""

from __future__ import annotations

import numbers
from typing import Any

# The module, not its functions: attention / attention_varlen are looked up at call time, so
# a replacement of them (the CPU tests' recorders) is what these wrappers call.
from . import api
from .problem import check_flag


def flash_attn_func(q: Any, k: Any, v: Any, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Any = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Any:
    """flash_attn 2's ``flash_attn_func``: ``cupyflash.attention`` with flash_attn's signature.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim). Masks,
    GQA and defaults as in ``cupyflash.attention`` (causal is bottom-right aligned, as in
    flash_attn). ``deterministic`` is accepted and checked (a bool) but changes nothing here:
    the forward pass is always deterministic, and with no autograd the choice belongs to the
    backward call, ``cupyflash.attention_backward(..., deterministic=True)``.

    Returns out (batch, seqlen_q, heads_q, head_dim); with return_attn_probs=True the tuple
    (out, softmax_lse, None): softmax_lse float32 (batch, heads_q, seqlen_q), and None where
    flash_attn returns S_dmask, since cupyflash never materialises the probabilities.
    """
    deterministic, return_attn_probs = _flags(deterministic, return_attn_probs)
    _refuse_unsupported("flash_attn_func", dropout_p=dropout_p, softcap=softcap, alibi_slopes=alibi_slopes)
    result = api.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                           softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                           return_lse=return_attn_probs)
    return _as_flash_attn_returns(result, return_attn_probs)


def flash_attn_varlen_func(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                           max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Any = None, deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Any = None) -> Any:
    """flash_attn 2's ``flash_attn_varlen_func``: ``cupyflash.attention_varlen`` with flash_attn's
    signature.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim), the sequences packed
    one after another; cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on the GPU, sequence b
    owning rows cu_seqlens[b]:cu_seqlens[b + 1]; max_seqlen_q, max_seqlen_k: Python ints, the
    longest sequence's lengths. Causal masks and windows apply per sequence, bottom-right
    aligned. ``deterministic`` as in ``flash_attn_func``: accepted, used by
    ``cupyflash.attention_varlen_backward`` only. ``block_table`` (a paged KV cache) is not
    supported.

    Returns out (total_q, heads_q, head_dim); with return_attn_probs=True the tuple
    (out, softmax_lse, None): softmax_lse float32 (heads_q, total_q), and None in S_dmask's place.
    """
    deterministic, return_attn_probs = _flags(deterministic, return_attn_probs)
    _refuse_unsupported("flash_attn_varlen_func", dropout_p=dropout_p, softcap=softcap,
                        alibi_slopes=alibi_slopes, block_table=block_table)
    result = api.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                  softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                  return_lse=return_attn_probs)
    return _as_flash_attn_returns(result, return_attn_probs)


def _flags(deterministic: Any, return_attn_probs: Any) -> tuple[bool, bool]:
    """Both flags as bools, by the library's rule (bool or NumPy bool only). Checked here so that
    an error names flash_attn's argument, not the cupyflash one it is passed on as, and so that
    deterministic, which nothing downstream reads, is not silently ignored when misspelt."""
    return check_flag("deterministic", deterministic), check_flag("return_attn_probs", return_attn_probs)


def _refuse_unsupported(function: str, *, dropout_p: Any, softcap: Any, alibi_slopes: Any,
                        block_table: Any = None) -> None:
    """NotImplementedError naming every option given that the GPU kernels do not implement yet.

    The api raises it too, but only after placing the arrays; here it comes before any GPU work.
    A number counts as used when it is > 0, as in flash_attn; one that is no real number (a
    string, None) is passed on, for the api's checks to reject with their own message."""
    used = [f"{name}={value}" for name, value in (("dropout_p", dropout_p), ("softcap", softcap))
            if isinstance(value, numbers.Real) and value > 0]
    used += [f"{name} (not None)" for name, value in (("alibi_slopes", alibi_slopes), ("block_table", block_table))
             if value is not None]
    if used:
        raise NotImplementedError(f"{function}: {', '.join(used)}: not yet supported by cupyflash's GPU kernels "
                                  "(cupyflash.reference computes dropout, softcap and ALiBi on the CPU)")


def _as_flash_attn_returns(result: Any, return_attn_probs: bool) -> Any:
    """cupyflash's out or (out, lse) as flash_attn returns it: out, or (out, softmax_lse, S_dmask)
    with None for S_dmask (cupyflash never materialises the probabilities)."""
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None
