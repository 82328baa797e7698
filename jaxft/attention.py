"""How causal self-attention is computed: the `attention` setting (`--attention`) and the masks
of packed rows. jaxft.model's attention uses these.

"xla" is explicit scores, mask and softmax (the reference's arithmetic). "cudnn" is cuDNN's fused
flash-attention kernel through `jax.nn.dot_product_attention`: it never writes the [B, H, T, T]
scores, and it exists for 16-bit compute on NVIDIA GPUs. "auto" picks cudnn there and xla elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

ATTENTIONS = ("auto", "xla", "cudnn")


def segment_mask(segments: jax.Array) -> jax.Array:
    """The attention mask of packed rows (jaxft.packing) [B, T] of segment ids: causal within a
    segment, closed across segments, [B, 1, T, T]."""
    seq = segments.shape[1]
    causal = jnp.arange(seq)[:, None] >= jnp.arange(seq)[None, :]
    return (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]


def fused_attention(attention: str, dtype: Any, dropout: bool = False) -> str | None:
    """The `jax.nn.dot_product_attention` implementation for an `attention` setting, or None for
    the explicit scores and softmax ("auto": cudnn on a GPU with 16-bit compute, where cuDNN's
    fused kernel exists; it has no fp32 path, and no attention dropout: with `dropout` active,
    auto is the explicit path)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of: {', '.join(ATTENTIONS)}")
    if attention == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and not dropout and jax.default_backend() == "gpu" else None
    return None if attention == "xla" else attention
