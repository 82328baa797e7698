"""Losses and pooling: classification on a pooled position, masked next-token prediction."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100
POOLINGS = ("last", "last-non-pad", "first", "mean")


def pool_index(pooling: str, lengths: jax.Array | None, batch: int, seq: int) -> jax.Array | None:
    """The position [B] that `pool` picks from each row of a [B, seq, ...] output, or None when
    the pooling reads more than one position ("mean"). Passed to the model as `pool_index`, it
    computes only these rows in the last block: `pool(logits, lengths, p)` equals
    `model.apply(..., pool_index=pool_index(p, lengths, B, T))` (to float rounding)."""
    if pooling == "last":
        return jnp.full((batch,), seq - 1, jnp.int32)
    if pooling == "first":
        return jnp.zeros((batch,), jnp.int32)
    if pooling == "last-non-pad":
        if lengths is None:
            raise ValueError(f"pooling {pooling!r} needs the per-row lengths")
        return jnp.clip(lengths, 1, seq).astype(jnp.int32) - 1
    if pooling == "mean":
        return None
    raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")


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


def masked_lm_loss_terms(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) over targets != ignore_index."""
    valid = targets != ignore_index
    safe_targets = jnp.where(valid, targets, 0)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
    return jnp.where(valid, token_loss, 0.0).sum(), valid.sum()


# --------------------------------------------------------------------------- LM head + cross-entropy in row chunks

HEAD_LAYOUTS = ("dv", "vd")  # lm_head/kernel [d, vocab]; wte/embedding [vocab, d] (the tied head)
CHUNK_ELEMENTS = 1 << 25  # logits per chunk at most (128 MiB in fp32): 667 rows of GPT-2's vocabulary
# On a GPU or TPU, fewer and larger chunks keep the card busy: on an H200 the gpt2-medium bf16 step
# at 16 x 1024 took 116.0 ms with 667-row chunks, 110.7 ms with 5,341 and 108.7 ms with one chunk
# (scripts/bench_step_parts.py; BENCHMARKS.md). 2^30 logits (4 GiB in fp32) is one chunk there.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 30


def chunk_elements() -> int:
    """The default logits per chunk of `lm_head_loss` on the default backend."""
    return CHUNK_ELEMENTS if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def _head_logits(h: jax.Array, head: jax.Array, layout: str, dtype, vocab: int | None = None) -> jax.Array:
    """fp32 logits [rows, vocab] of final-norm hidden states h [rows, d], as the model's head computes them.
    A head padded beyond `vocab` columns gives -inf there: they add nothing to the softmax."""
    spec = "nd,dv->nv" if layout == "dv" else "nd,vd->nv"
    logits = jnp.einsum(spec, h.astype(dtype), head.astype(dtype)).astype(jnp.float32)
    if vocab is not None and logits.shape[-1] > vocab:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    return logits


def _chunk_loss(h, head, targets, valid, layout, dtype, vocab=None):
    """(sum of one chunk's token losses, exp(logits - row max), its row sums): the last two for the gradient."""
    logits = _head_logits(h, head, layout, dtype, vocab)
    # jax.nn.logsumexp, spelled out so that the gradient below can reuse its pieces.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    shifted = jnp.exp(logits - row_max)
    sumexp = shifted.sum(axis=-1)
    lse = jnp.log(sumexp) + row_max[:, 0]
    label_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.where(valid, lse - label_logits, 0.0).sum(), shifted, sumexp


def _chunk_grads(h, head, targets, shifted, sumexp, row_grad, layout, dtype):
    """(d/dh, d/dhead) of sum(row_grad * token loss) over one chunk.

    The arithmetic of reverse-mode autodiff through logits -> logsumexp - label logit:
    dlogits = exp(logits - max) * (g / sumexp), minus g at the label."""
    dlogits = shifted * (row_grad / sumexp)[:, None]
    is_label = jnp.arange(dlogits.shape[-1])[None, :] == targets[:, None]
    dlogits = jnp.where(is_label, dlogits - row_grad[:, None], dlogits).astype(dtype)
    dh_spec, dhead_spec = ("nv,dv->nd", "nd,nv->dv") if layout == "dv" else ("nv,vd->nd", "nd,nv->vd")
    dh = jnp.einsum(dh_spec, dlogits, head.astype(dtype), preferred_element_type=jnp.float32)
    dhead = jnp.einsum(dhead_spec, h.astype(dtype), dlogits, preferred_element_type=jnp.float32)
    return dh, dhead


def _chunks(h, targets, chunk_rows, ignore_index):
    """Rows split into n equal chunks of at most chunk_rows rows (the last padded with ignored
    rows): h [n, size, d], targets and valid [n, size], and the number of valid rows."""
    rows = h.shape[0]
    n = -(-rows // max(1, chunk_rows))
    size = -(-rows // n)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    pad = n * size - rows
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        safe, valid = jnp.pad(safe, (0, pad)), jnp.pad(valid, (0, pad))
    return h.reshape(n, size, h.shape[1]), safe.reshape(n, size), valid.reshape(n, size), valid.sum()


def _mean_loss(h, head, targets, layout, dtype, chunk_rows, ignore_index, vocab=None):
    hc, tc, vc, count = _chunks(h, targets, chunk_rows, ignore_index)
    totals = jax.lax.map(lambda a: _chunk_loss(a[0], head, a[1], a[2], layout, dtype, vocab)[0], (hc, tc, vc))
    return totals.sum() / jnp.maximum(count, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _head_ce_mean(h, head, targets, layout, dtype, chunk_rows, ignore_index, vocab):
    return _mean_loss(h, head, targets, layout, dtype, chunk_rows, ignore_index, vocab)


def _head_ce_mean_fwd(h, head, targets, layout, dtype, chunk_rows, ignore_index, vocab):
    """Loss and gradients in one pass over the chunks: the gradient of the mean needs only
    each chunk's own logits, so they are never recomputed and never all in memory."""
    hc, tc, vc, count = _chunks(h, targets, chunk_rows, ignore_index)
    grad_scale = 1.0 / jnp.maximum(count, 1)  # d(mean)/d(sum), as autodiff of sum / count computes it

    def chunk(x, t, v):
        total, shifted, sumexp = _chunk_loss(x, head, t, v, layout, dtype, vocab)
        dh, dhead = _chunk_grads(x, head, t, shifted, sumexp, jnp.where(v, grad_scale, 0.0), layout, dtype)
        return total, dh, dhead

    def body(dhead, xtv):
        total, dh, dhead_chunk = chunk(*xtv)
        return dhead + dhead_chunk, (total, dh)

    # The first chunk starts the head-gradient sum (no zero-filled [d, vocab] buffer to add to).
    total, dh, dhead = chunk(hc[0], tc[0], vc[0])
    totals = total[None]
    if hc.shape[0] > 1:
        dhead, (rest, dh_rest) = jax.lax.scan(body, dhead, (hc[1:], tc[1:], vc[1:]))
        totals = jnp.concatenate([totals, rest])  # summed as the no-gradient path sums them
        dh = jnp.concatenate([dh, dh_rest.reshape(-1, dh.shape[1])])
    loss = totals.sum() / jnp.maximum(count, 1)
    return loss, (dh[: h.shape[0]], dhead.astype(head.dtype))


def _head_ce_mean_bwd(layout, dtype, chunk_rows, ignore_index, vocab, res, g):
    dh, dhead = res
    return g * dh, g * dhead, None


_head_ce_mean.defvjp(_head_ce_mean_fwd, _head_ce_mean_bwd)


def lm_head_loss(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    head_layout: str,
    dtype=jnp.float32,
    chunk_rows: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    vocab_multiple: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mean next-token loss over targets != ignore_index, their count), from final-norm hidden states.

    The values of `masked_lm_loss_terms(logits, targets)` (as a mean) with logits = hidden @ head, computed
    in equal chunks of at most `chunk_rows` rows (default: `chunk_elements()` // vocab): neither
    the fp32 [rows, vocab] logits nor their gradient is ever in memory whole. Under
    `jax.grad` the forward pass also computes the gradients, from each chunk's logits while
    they are at hand, so the head costs its three matmuls and nothing is recomputed; the
    gradient arithmetic is autodiff's, so the values equal the plain path's. 0 when every
    target is ignored.

    hidden: [..., d] (fp32, the model's `return_hidden=True` output); head: [d, vocab]
    (head_layout "dv": an untied lm_head/kernel) or [vocab, d] ("vd": the tied
    wte/embedding); targets: int [...]; dtype: the head matmul's compute dtype.
    vocab_multiple: pad the head's vocabulary with zero columns to a multiple of this for the
    matmuls (GPT-2's 50,257 is odd; cuBLAS prefers multiples of 64), their logits masked to -inf:
    the same loss and gradients (to rounding). `finetune-instruct --head-vocab-multiple` sets it;
    not a default (scripts/bench_step_parts.py's step-padded part times it on a GPU).
    """
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    h = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    t = targets.reshape(-1)
    vocab = head.shape[1] if head_layout == "dv" else head.shape[0]
    extra = -vocab % vocab_multiple if vocab_multiple else 0
    if extra:  # the pad's gradient is sliced away by jnp.pad's transpose
        head = jnp.pad(head, ((0, 0), (0, extra)) if head_layout == "dv" else ((0, extra), (0, 0)))
    if chunk_rows is None:
        chunk_rows = max(1, chunk_elements() // (vocab + extra))
    loss = _head_ce_mean(h, head, t, head_layout, jnp.dtype(dtype), int(chunk_rows), int(ignore_index), vocab if extra else None)
    return loss, (t != ignore_index).sum()
