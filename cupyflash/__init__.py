"""cupyflash: exact FlashAttention (fused, tiled forward and backward) for CuPy.

    import cupyflash as cf
    out = cf.attention(q, k, v, causal=True)
    out, lse = cf.attention(q, k, v, return_lse=True)
    dq, dk, dv = cf.attention_backward(dout, q, k, v, out, lse)

Importing compiles nothing and needs no GPU; kernels compile (NVRTC) on first use and are
cached on disk.
"""

__version__ = "0.1.0"

from .api import attention, attention_backward  # noqa: E402  (after __version__: build.py reads it)

__all__ = ["attention", "attention_backward", "__version__"]
