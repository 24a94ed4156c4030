"""cupyflash: exact FlashAttention (fused, tiled forward and backward) for CuPy.

    import cupyflash as cf
    out = cf.attention(q, k, v, causal=True)
    out, lse = cf.attention(q, k, v, return_lse=True)
    dq, dk, dv = cf.attention_backward(dout, q, k, v, out, lse)
    # packed sequences of different lengths (README: "Variable-length batches")
    out = cf.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)
    # results over disjoint key sets (split-KV, cascades) combined exactly by their lse
    out, lse = cf.merge_attention([out_a, out_b], [lse_a, lse_b])
    # decoding: new tokens against a KV cache, appended in place (README: "Decoding with a KV cache")
    out = cf.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths)
    # flash_attn 2's signatures, for code written for it (README: "Migrating from flash_attn")
    from cupyflash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Importing compiles nothing and needs no GPU; kernels compile (NVRTC) on first use and are
cached on disk.
"""

__version__ = "0.1.0"

# After __version__: build.py reads it.
from .api import (attention, attention_backward, attention_varlen, attention_varlen_backward,  # noqa: E402
                  merge_attention)
from .flash_attn_compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402
from .kvcache import attention_with_kvcache  # noqa: E402

__all__ = ["attention", "attention_backward", "attention_varlen", "attention_varlen_backward", "merge_attention",
           "attention_with_kvcache", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "__version__"]
