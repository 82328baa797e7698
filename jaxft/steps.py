"""jit-compiled train and eval steps for both losses, and evaluation over batches.

A batch is a dict of NumPy/JAX arrays with static shapes:
  classification: tokens [B, T], labels [B], lengths [B] (real tokens), weights [B] (0 = padding row);
    with `start_block` (a cached frozen trunk, see jaxft.trunk) hidden [B, T, D] in place of tokens
  language model: inputs [B, T], targets [B, T] (-100 = ignored)
Eval batches are padded to the full batch size (weight 0 / all targets -100), so a whole
run compiles each step once per shape.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import interrupts, losses, model, stacking, trunk
from .config import GPTConfig
from .model import Params
from .optim import merge, split

Batch = dict[str, Any]


class TrainState(NamedTuple):
    trainable: Params  # frozen leaves are None
    frozen: Params  # trainable leaves are None
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array  # dropout randomness, folded with the step

    @property
    def params(self) -> Params:
        """The whole parameter tree in the public layout (h_0, h_1, ...: stacked runs unstacked, a copy)."""
        merged = merge(self.trainable, self.frozen)
        return stacking.unstack_jit(merged) if stacking.stacked_runs(merged) else merged


def init_state(
    params: Params, mask: Params, optimizer: optax.GradientTransformation, seed: int = 0, *, scan_layers: bool | str = False
) -> TrainState:
    """The split-tree training state: `params` copied and split by `mask` (True = trains) into
    trainable and frozen trees, the optimizer's state over the trainable tree only, step 0, and
    the dropout PRNG key of `seed`. The steps of `make_steps` donate and return it.
    `scan_layers` (see jaxft.stacking.resolve): the trees hold runs of blocks with equal masks
    stacked (`stacking.block_runs`), so the steps scan them without a copy per step;
    `state.params` is still the public layout."""
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: steps donate the state
    if stacking.resolve(scan_layers):
        runs = stacking.block_runs(stacking.n_blocks(params), mask)
        params, mask = stacking.stack(params, runs), stacking.stack(mask, runs)
    trainable, frozen = split(params, mask)
    return TrainState(trainable, frozen, optimizer.init(trainable), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))


def _forward(config: GPTConfig, params: Params, tokens: jax.Array, dropout_key, dtype, remat, **kwargs) -> jax.Array:
    key = dropout_key if config.drop_rate > 0 else None
    return model.apply(config, params, tokens, dropout_key=key, dtype=dtype, remat=remat, **kwargs)  # (kwargs: scan_layers, ...)


def classification_metrics(
    config: GPTConfig,
    pooling: str,
    params: Params,
    batch: Batch,
    dropout_key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    start_block: int | None = None,
    attention: str = "auto",
    scan_layers: bool | str = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted mean loss, {loss, correct, count}) for a classification batch: `tokens` [B, T],
    `labels` [B], `lengths` [B] (the real tokens; pooling other than "last" reads them) and
    optionally `weights` [B] (0 for padding rows; default 1). With `start_block`, the batch
    carries the cached residual stream `hidden` [B, T, D] after block start_block-1 instead of
    `tokens`, and only the rest of the model runs (no dropout). Traced values are not range-checked:
    token ids outside the vocabulary or labels outside [0, num_classes) give NaN or a wrong loss."""
    if config.num_classes is None:
        raise ValueError("classification_metrics needs a classifier config (num_classes; see with_classifier_head)")
    batch = {key: jnp.asarray(value) for key, value in batch.items()}  # (lists too)
    inputs = batch["tokens"] if start_block is None else batch["hidden"]
    # One position per row (all but mean pooling): the last block computes only that query.
    # Packed cached rows (jaxft.packing.pack_pooled_batch) say where each text's position is.
    packed = {key: batch[key] for key in ("pool_row", "segments") if key in batch}
    index = batch["pool_index"] if packed else losses.pool_index(pooling, batch.get("lengths"), *inputs.shape[:2])
    if start_block is None:
        logits = _forward(config, params, inputs, dropout_key, dtype, remat, pool_index=index, attention=attention, scan_layers=scan_layers)
    else:
        logits = trunk.suffix_apply(config, params, inputs, start_block, dtype=dtype, remat=remat, pool_index=index, scan_layers=scan_layers,
                                    **packed)
    pooled = logits if index is not None else losses.pool(logits, batch.get("lengths"), pooling)
    weights = batch["weights"].astype(jnp.float32) if "weights" in batch else jnp.ones(pooled.shape[:1], jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(pooled, batch["labels"])
    loss = (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    correct = ((jnp.argmax(pooled, axis=-1) == batch["labels"]) * weights).sum()
    return loss, {"loss": loss, "correct": correct, "count": weights.sum()}


def lm_metrics(
    config: GPTConfig,
    params: Params,
    batch: Batch,
    dropout_key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    vocab_multiple: int | None = None,
    scan_layers: bool | str = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean next-token loss over non-ignored targets, {loss, tokens}). A batch of packed rows
    (jaxft.packing.pack_lm_batch) also carries `positions` and `segments`.

    The head and its cross-entropy run in chunks of rows from the final-norm hidden states
    (`losses.lm_head_loss`): the values of logits -> masked cross-entropy, without the fp32
    [B, T, vocab] logits or their gradient ever in memory whole. `vocab_multiple`: the head's
    matmuls on a vocabulary padded to a multiple of this (masked columns: the same loss). The
    chunked head is a custom_vjp: reverse-mode derivatives only (grad, vjp, hessian via
    jax.hessian's forward-over-reverse); jax.jvp / jacfwd of the loss itself are not supported.
    As for classification_metrics, ids and targets outside the vocabulary are not checked (NaN)."""
    if config.num_classes is not None:
        raise ValueError("lm_metrics needs a language-model config; this one has a classification head (num_classes)")
    batch = {key: jnp.asarray(value) for key, value in batch.items()}  # (lists too)
    packed = {key: batch[key] for key in ("positions", "segments") if key in batch}  # packed rows (jaxft.packing)
    hidden = _forward(config, params, batch["inputs"], dropout_key, dtype, remat, return_hidden=True, attention=attention,
                      scan_layers=scan_layers, **packed)
    head, layout, head_dtype = model.head_matrix(config, params, dtype)
    loss, count = losses.lm_head_loss(hidden, head, batch["targets"], head_layout=layout, dtype=head_dtype, vocab_multiple=vocab_multiple)
    return loss, {"loss": loss, "tokens": count}


def make_steps(
    config: GPTConfig,
    optimizer: optax.GradientTransformation,
    task: str,
    *,
    pooling: str = "last",
    dtype: Any = jnp.float32,
    remat: bool = False,
    start_block: int | None = None,
    attention: str = "auto",
    vocab_multiple: int | None = None,
    scan_layers: bool | str = False,
) -> tuple[Callable, Callable]:
    """jit-compiled (train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> metrics).

    train_step donates its input state: arrays of the old state (its trees, or a snapshot taken
    with `merge(state.trainable, state.frozen)` without a copy) are deleted by the call. Copy
    what you keep (`jax.tree_util.tree_map(jnp.copy, ...)`). The state must come from
    `init_state` with the same optimizer.

    task: "classification" or "lm". Gradients flow to the trainable tree only.
    start_block (classification only): batches carry a cached frozen trunk's output `hidden`
    instead of `tokens` (see jaxft.trunk); blocks before start_block must be frozen.
    attention: "auto", "xla" or "cudnn" (see jaxft.model.fused_attention).
    vocab_multiple (lm only): pad the LM head's vocabulary to a multiple of this in the loss (see
    `losses.lm_head_loss`; the same loss and gradients).
    scan_layers (see jaxft.stacking.resolve): runs of blocks as one `jax.lax.scan` (the same
    losses; a compile time that does not grow with depth). A state from `init_state(...,
    scan_layers=True)` holds them stacked; given per-layer trees (eval_step's public-layout
    params) the step stacks them in each call, a copy of those blocks.
    """
    if start_block is not None and task != "classification":
        raise ValueError("start_block (a cached frozen trunk) is for classification only")
    if start_block is not None and config.drop_rate > 0:
        raise ValueError(f"start_block: a cached trunk needs dropout off (drop rate {config.drop_rate})")
    if vocab_multiple is not None and (task != "lm" or vocab_multiple < 1):
        raise ValueError(f"vocab_multiple: a positive multiple for the lm task, got {vocab_multiple!r} for {task!r}")
    scan = stacking.resolve(scan_layers)
    if task == "classification":
        if pooling not in losses.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(losses.POOLINGS)}")
        metrics_fn = functools.partial(classification_metrics, config, pooling, start_block=start_block, attention=attention, scan_layers=scan)
    elif task == "lm":
        metrics_fn = functools.partial(lm_metrics, config, attention=attention, vocab_multiple=vocab_multiple, scan_layers=scan)
    else:
        raise ValueError(f"unknown task {task!r}: 'classification' or 'lm'")

    def loss_fn(trainable, frozen, batch, dropout_key):
        return metrics_fn(merge(trainable, frozen), batch, dropout_key, dtype, remat)

    def train_step(state: TrainState, batch: Batch):
        own = jax.eval_shape(optimizer.init, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.trainable))
        if jax.tree_util.tree_structure(own) != jax.tree_util.tree_structure(state.opt_state):
            raise ValueError("the state's optimizer state is not this optimizer's: give init_state and make_steps the same optimizer")
        dropout_key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable, state.frozen, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))}  # a non-finite one stops the run
        return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), metrics

    def eval_step(params: Params, batch: Batch):
        return metrics_fn(params, batch, None, dtype, False)[1]

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def host_values(tree: Any) -> Any:
    """Replicated results (metrics) as NumPy on this process, also when they span processes
    (then not fully addressable, but every process holds a full copy)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) and not x.is_fully_addressable else jax.device_get(x), tree
    )


def evaluate(eval_step: Callable, params: Params, batches: Iterable[Batch], num_batches: int | None = None,
             means: Iterable[str] = ()) -> dict[str, float]:
    """The reference's calc_loss_loader / calc_accuracy_loader: mean of per-batch losses over the
    first `num_batches` batches, and accuracy over their examples. NaN loss for no batches.
    After each batch a signal caught by the command stops it (`interrupts.check`, a safe point).

    `means`: other metrics of the eval step averaged over the batches as the loss is."""
    means = tuple(means)
    loss_sum, n_batches, correct, count = 0.0, 0, 0.0, 0.0
    sums = dict.fromkeys(means, 0.0)
    for batch in batches:
        if num_batches is not None and n_batches >= num_batches:
            break
        m = host_values(eval_step(params, batch))
        interrupts.check()
        loss_sum += float(m["loss"])
        for key in means:
            sums[key] += float(m[key])
        n_batches += 1
        if "correct" in m:
            correct += float(m["correct"])
            count += float(m["count"])
    result = {"loss": loss_sum / n_batches if n_batches else math.nan}
    result.update({key: total / n_batches if n_batches else math.nan for key, total in sums.items()})
    if count:
        result["accuracy"] = correct / count
    return result


def compile_count(step: Callable) -> int:
    """How many shapes a jitted step has been compiled for (for recompilation tests)."""
    return step._cache_size()
