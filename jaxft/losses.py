"""Losses and pooling: classification on a pooled position, masked next-token prediction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100
POOLINGS = ("last", "last-non-pad", "first", "mean")


def pool(logits: jax.Array, lengths: jax.Array | None, pooling: str) -> jax.Array:
    """Pick the logits a classifier predicts from: [B, T, C] -> [B, C].

    last: the last position (the reference; padding included). last-non-pad: the last real
    token (the reference's "flexible" variant). first: position 0. mean: the mean over
    real tokens. `lengths` (real tokens per row) is needed by the last two.
    """
    if pooling == "last":
        return logits[:, -1, :]
    if pooling == "first":
        return logits[:, 0, :]
    if lengths is None:
        raise ValueError(f"pooling {pooling!r} needs the per-row lengths")
    lengths = jnp.clip(lengths, 1, logits.shape[1])
    if pooling == "last-non-pad":
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0, :]
    if pooling == "mean":
        real = (jnp.arange(logits.shape[1])[None, :] < lengths[:, None]).astype(logits.dtype)
        return (logits * real[..., None]).sum(axis=1) / real.sum(axis=1, keepdims=True)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")


def classification_loss(pooled_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the batch (torch.nn.functional.cross_entropy)."""
    return optax.softmax_cross_entropy_with_integer_labels(pooled_logits, labels).mean()


def correct_count(pooled_logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (jnp.argmax(pooled_logits, axis=-1) == labels).sum()


def masked_lm_loss_terms(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX):
    """(sum of token losses, number of counted tokens) over targets != ignore_index."""
    valid = targets != ignore_index
    safe_targets = jnp.where(valid, targets, 0)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
    return jnp.where(valid, token_loss, 0.0).sum(), valid.sum()


def masked_lm_loss(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean next-token cross-entropy over targets that are not `ignore_index` (torch semantics)."""
    total, count = masked_lm_loss_terms(logits, targets, ignore_index)
    return total / jnp.maximum(count, 1)
