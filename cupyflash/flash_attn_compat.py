"""flash_attn 2's ``flash_attn_func``, ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` on
cupyflash's kernels.

The three functions keep flash_attn 2's signatures (argument names, order and defaults, as in
its ``flash_attn/flash_attn_interface.py``), so code written for flash_attn changes only its
import. Each is a thin wrapper: it refuses what the GPU kernels do not implement yet, then
calls ``cupyflash.attention``, ``cupyflash.attention_varlen`` or
``cupyflash.attention_with_kvcache``.

What still differs from flash_attn, on purpose:

- No autograd: the results are CuPy arrays (PyTorch takes them back with ``torch.from_dlpack``),
  and gradients come from ``cupyflash.attention_backward`` / ``attention_varlen_backward``.
  The README's "Migrating from flash_attn" shows a ``torch.autograd.Function`` that does it.
  (``flash_attn_with_kvcache`` has no backward in flash_attn either.)
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the third item, flash_attn's
  ``S_dmask``, is ``None`` because cupyflash never materialises the probabilities P.
- ``dropout_p > 0``, ``softcap > 0``, ``alibi_slopes`` and ``block_table`` (in
  ``flash_attn_varlen_func``) raise ``NotImplementedError`` naming the argument, before any GPU
  work; so do ``rotary_cos`` / ``rotary_sin`` and ``cache_leftpad`` in ``flash_attn_with_kvcache``.
- A paged cache may have any page size (flash_attn 2 wants a multiple of 256).
"""

from __future__ import annotations

import numbers
from typing import Any

# The module, not its functions: attention / attention_varlen are looked up at call time, so
# a replacement of them (the CPU tests' recorders) is what these wrappers call. The same holds
# for kvcache.attention_with_kvcache, whose module flash_attn_with_kvcache imports when called.
from . import api
from .problem import check_flag

REFERENCE_HINT = "cupyflash.reference computes dropout, softcap and ALiBi on the CPU"
KVCACHE_HINT = ("for rotary embeddings, rotate q and the new k before the call (flash_attn's cache holds rotated "
                "keys too); cupyflash.reference computes softcap and ALiBi on the CPU")


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
    _refuse_unsupported("flash_attn_func", positive={"dropout_p": dropout_p, "softcap": softcap},
                        given={"alibi_slopes": alibi_slopes})
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
    _refuse_unsupported("flash_attn_varlen_func", positive={"dropout_p": dropout_p, "softcap": softcap},
                        given={"alibi_slopes": alibi_slopes, "block_table": block_table})
    result = api.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                  softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                  return_lse=return_attn_probs)
    return _as_flash_attn_returns(result, return_attn_probs)


def flash_attn_with_kvcache(q: Any, k_cache: Any, v_cache: Any, k: Any = None, v: Any = None, rotary_cos: Any = None,
                            rotary_sin: Any = None, cache_seqlens: Any = None, cache_batch_idx: Any = None,
                            cache_leftpad: Any = None, block_table: Any = None, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Any = None, num_splits: int = 0,
                            return_softmax_lse: bool = False) -> Any:
    """flash_attn 2's ``flash_attn_with_kvcache``: ``cupyflash.attention_with_kvcache`` with
    flash_attn's signature, including its default causal=False (cupyflash's is True).

    q: (batch, seqlen_q, heads_q, head_dim); k_cache, v_cache: (batch_cache, seqlen_cache,
    heads_kv, head_dim), or paged, (num_pages, page_size, heads_kv, head_dim) with block_table
    int32 (batch, max_pages) naming each sequence's pages. k, v: (batch, seqlen_new, heads_kv,
    head_dim); when given they are written into the caches in place, at cache_seqlens, before
    attending. cache_seqlens: int32 (batch,) on the GPU or a Python int, the keys each sequence
    already holds; None (flash_attn's default) means the whole cache, seqlen_cache keys or
    max_pages * page_size when paged, and allows no k, v. cache_batch_idx: int32 (batch,), the
    cache slot of each sequence (default: slot b). Masks, GQA and num_splits (0: chosen, 1: no
    split) as in ``cupyflash.attention_with_kvcache``; causal is bottom-right aligned, so the
    last query row sees the whole cache. rotary_interleaved is checked (a bool) and otherwise
    unused, since rotary_cos is refused.

    Returns out (batch, seqlen_q, heads_q, head_dim); with return_softmax_lse=True the pair
    (out, softmax_lse), softmax_lse float32 (batch, heads_q, seqlen_q).
    """
    check_flag("rotary_interleaved", rotary_interleaved)
    return_softmax_lse = check_flag("return_softmax_lse", return_softmax_lse)
    if not isinstance(softcap, numbers.Real):  # nothing downstream reads it: checked here or never
        raise TypeError(f"softcap must be a real number (0.0: off); got {type(softcap).__name__} {softcap!r}")
    _refuse_unsupported("flash_attn_with_kvcache", positive={"softcap": softcap},
                        given={"rotary_cos": rotary_cos, "rotary_sin": rotary_sin, "cache_leftpad": cache_leftpad,
                               "alibi_slopes": alibi_slopes}, hint=KVCACHE_HINT)
    if cache_seqlens is None:
        if k is not None or v is not None:
            raise ValueError("flash_attn_with_kvcache: k and v given with cache_seqlens=None; appending needs "
                             "cache_seqlens, the keys each sequence's cache holds (where the new ones go)")
        cache_seqlens = _whole_cache_length(k_cache, block_table)
    # At call time: kvcache.py is written alongside this wrapper, and this module must import
    # without it meanwhile. It can move to the top once kvcache.py is in.
    from . import kvcache
    return kvcache.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                          block_table=block_table, cache_batch_idx=cache_batch_idx, causal=causal,
                                          softmax_scale=softmax_scale, window_size=window_size,
                                          num_splits=num_splits, return_lse=return_softmax_lse)


def _flags(deterministic: Any, return_attn_probs: Any) -> tuple[bool, bool]:
    """Both flags as bools, by the library's rule (bool or NumPy bool only). Checked here so that
    an error names flash_attn's argument, not the cupyflash one it is passed on as, and so that
    deterministic, which nothing downstream reads, is not silently ignored when misspelt."""
    return check_flag("deterministic", deterministic), check_flag("return_attn_probs", return_attn_probs)


def _refuse_unsupported(function: str, *, positive: dict[str, Any], given: dict[str, Any],
                        hint: str = REFERENCE_HINT) -> None:
    """NotImplementedError naming every option given that the GPU kernels do not implement yet.

    The api raises it too, but only after placing the arrays; here it comes before any GPU work.
    A number in `positive` counts as used when it is > 0, as in flash_attn; one that is no real
    number (a string, None) is passed on, for the api's checks to reject with their own message.
    An object in `given` counts as used when it is not None."""
    used = [f"{name}={value}" for name, value in positive.items() if isinstance(value, numbers.Real) and value > 0]
    used += [f"{name} (not None)" for name, value in given.items() if value is not None]
    if used:
        raise NotImplementedError(f"{function}: {', '.join(used)}: not yet supported by cupyflash's GPU kernels "
                                  f"({hint})")


def _whole_cache_length(k_cache: Any, block_table: Any) -> int:
    """flash_attn's cache_seqlens=None as an int: every key of each sequence's cache, k_cache's
    seqlen_cache, or when paged the max_pages pages of page_size keys its block_table row names.
    Read from the shapes alone (no device sync); the api checks them in full."""
    keys = _axis_length("k_cache", k_cache, ndim=4, axis=1)
    return keys if block_table is None else _axis_length("block_table", block_table, ndim=2, axis=1) * keys


def _axis_length(name: str, array: Any, *, ndim: int, axis: int) -> int:
    shape = getattr(array, "shape", None)
    if shape is None:
        raise TypeError(f"flash_attn_with_kvcache: {name} must be an array; got {type(array).__name__}")
    if len(shape) != ndim:
        raise ValueError(f"flash_attn_with_kvcache: {name}.shape is {tuple(shape)}; {name} must be {ndim}-D "
                         "(with cache_seqlens=None its shape gives each sequence's cache length)")
    return int(shape[axis])


def _as_flash_attn_returns(result: Any, return_attn_probs: bool) -> Any:
    """cupyflash's out or (out, lse) as flash_attn returns it: out, or (out, softmax_lse, S_dmask)
    with None for S_dmask (cupyflash never materialises the probabilities)."""
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None
