"""jit-compiled train and eval steps for both losses, and the seed's training loop.

A batch is a dict of NumPy/JAX arrays with static shapes:
  classification: tokens [B, T], labels [B], lengths [B] (real tokens), weights [B] (0 = padding row)
  language model: inputs [B, T], targets [B, T] (-100 = ignored)
Eval batches are padded to the full batch size (weight 0 / all targets -100), so a whole
run compiles each step once per shape.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import losses, model
from .config import GPTConfig
from .optim import merge, split

Params = dict[str, Any]
Batch = dict[str, Any]


class TrainState(NamedTuple):
    trainable: Params  # frozen leaves are None
    frozen: Params  # trainable leaves are None
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array  # dropout randomness, folded with the step

    @property
    def params(self) -> Params:
        return merge(self.trainable, self.frozen)


def init_state(params: Params, mask: Params, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: steps donate the state
    trainable, frozen = split(params, mask)
    return TrainState(trainable, frozen, optimizer.init(trainable), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))


def _forward(config: GPTConfig, params: Params, tokens: jax.Array, dropout_key, dtype, remat, **kwargs) -> jax.Array:
    key = dropout_key if config.drop_rate > 0 else None
    return model.apply(config, params, tokens, dropout_key=key, dtype=dtype, remat=remat, **kwargs)


def classification_metrics(config: GPTConfig, pooling: str, params: Params, batch: Batch, dropout_key=None, dtype=jnp.float32, remat=False):
    """(weighted mean loss, {loss, correct, count}) for a classification batch."""
    logits = _forward(config, params, batch["tokens"], dropout_key, dtype, remat)
    pooled = losses.pool(logits, batch.get("lengths"), pooling)
    weights = batch["weights"].astype(jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(pooled, batch["labels"])
    loss = (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    correct = ((jnp.argmax(pooled, axis=-1) == batch["labels"]) * weights).sum()
    return loss, {"loss": loss, "correct": correct, "count": weights.sum()}


def lm_metrics(config: GPTConfig, params: Params, batch: Batch, dropout_key=None, dtype=jnp.float32, remat=False):
    """(mean next-token loss over non-ignored targets, {loss, tokens}).

    The head and its cross-entropy run in chunks of rows from the final-norm hidden states
    (`losses.lm_head_loss`): the values of logits -> `masked_lm_loss`, without the fp32
    [B, T, vocab] logits or their gradient ever in memory whole."""
    hidden = _forward(config, params, batch["inputs"], dropout_key, dtype, remat, return_hidden=True)
    if config.tie_embeddings:  # the model's wte.attend: fp32 whatever the compute dtype
        head, layout, head_dtype = params["wte"]["embedding"], "vd", jnp.promote_types(dtype, jnp.float32)
    else:
        head, layout, head_dtype = params["lm_head"]["kernel"], "dv", dtype
    loss, count = losses.lm_head_loss(hidden, head, batch["targets"], head_layout=layout, dtype=head_dtype)
    return loss, {"loss": loss, "tokens": count}


def make_steps(
    config: GPTConfig,
    optimizer: optax.GradientTransformation,
    task: str,
    *,
    pooling: str = "last",
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> tuple[Callable, Callable]:
    """jit-compiled (train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> metrics).

    task: "classification" or "lm". Gradients flow to the trainable tree only.
    """
    if task == "classification":
        if pooling not in losses.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(losses.POOLINGS)}")
        metrics_fn = functools.partial(classification_metrics, config, pooling)
    elif task == "lm":
        metrics_fn = functools.partial(lm_metrics, config)
    else:
        raise ValueError(f"unknown task {task!r}: 'classification' or 'lm'")

    def loss_fn(trainable, frozen, batch, dropout_key):
        return metrics_fn(merge(trainable, frozen), batch, dropout_key, dtype, remat)

    def train_step(state: TrainState, batch: Batch):
        dropout_key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable, state.frozen, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), metrics

    def eval_step(params: Params, batch: Batch):
        return metrics_fn(params, batch, None, dtype, False)[1]

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step: Callable, params: Params, batches: Iterable[Batch], num_batches: int | None = None) -> dict[str, float]:
    """The seed's calc_loss_loader / calc_accuracy_loader: mean of per-batch losses over the
    first `num_batches` batches, and accuracy over their examples. NaN loss for no batches."""
    loss_sum, n_batches, correct, count = 0.0, 0, 0.0, 0.0
    for batch in batches:
        if num_batches is not None and n_batches >= num_batches:
            break
        m = jax.device_get(eval_step(params, batch))
        loss_sum += float(m["loss"])
        n_batches += 1
        if "correct" in m:
            correct += float(m["correct"])
            count += float(m["count"])
    result = {"loss": loss_sum / n_batches if n_batches else math.nan}
    if count:
        result["accuracy"] = correct / count
    return result


def compile_count(step: Callable) -> int:
    """How many shapes a jitted step has been compiled for (for recompilation tests)."""
    return step._cache_size()


class History(dict):
    """Training curves: train_losses, val_losses, steps, seen (examples or tokens) at each eval."""


def train_loop(
    state: TrainState,
    train_step: Callable,
    eval_step: Callable,
    train_batches: Callable[[int], Iterator[Batch]],
    val_batches: Callable[[], Iterator[Batch]],
    *,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    seen_per_batch: Callable[[Batch], int],
    on_epoch_end: Callable[[TrainState, int, History], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainState, History]:
    """The seed's train_classifier_simple / train_model_simple loop.

    Evaluates every `eval_freq` steps on `eval_iter` train and validation batches (the
    first line at step 0, after one update, as in the seed), prints the seed's log line,
    and calls `on_epoch_end` after each epoch. `train_batches(epoch)` yields that epoch's batches.
    """
    history = History(train_losses=[], val_losses=[], steps=[], seen=[], epoch_seen=[])
    seen, global_step = 0, -1
    start = time.perf_counter()
    for epoch in range(num_epochs):
        for batch in train_batches(epoch):
            state, _ = train_step(state, batch)
            seen += seen_per_batch(batch)
            global_step += 1
            if global_step % eval_freq == 0:
                params = state.params
                train_loss = evaluate(eval_step, params, train_batches(epoch), eval_iter)["loss"]
                val_loss = evaluate(eval_step, params, val_batches(), eval_iter)["loss"]
                history["train_losses"].append(train_loss)
                history["val_losses"].append(val_loss)
                history["steps"].append(global_step)
                history["seen"].append(seen)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        history["epoch_seen"].append(seen)
        if on_epoch_end is not None:
            on_epoch_end(state, epoch, history)
    history["seconds"] = time.perf_counter() - start
    history["total_seen"] = seen
    history["total_steps"] = global_step + 1
    return state, history


def pad_rows(batch: dict[str, np.ndarray], batch_size: int, fill: dict[str, Any]) -> dict[str, np.ndarray]:
    """Pad every array of a short (final) batch to `batch_size` rows with `fill[key]`."""
    n = len(next(iter(batch.values())))
    if n == batch_size:
        return batch
    if n > batch_size:
        raise ValueError(f"batch of {n} rows is larger than the batch size {batch_size}")
    out = {}
    for key, value in batch.items():
        pad = np.full((batch_size - n, *value.shape[1:]), fill[key], dtype=value.dtype)
        out[key] = np.concatenate([value, pad])
    return out
