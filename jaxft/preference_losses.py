"""Direct preference optimisation: response log-probabilities, the DPO losses, rewards, and the
jit-compiled train and eval steps over jaxft's `TrainState` (jaxft.steps).

A batch (jaxft.data.preference.preference_batches): chosen, rejected [B, T] token ids,
chosen_mask, rejected_mask [B, T] (True on the scored tokens), weights [B] (0 = filler row);
with precomputed reference log-probabilities also ref_chosen, ref_rejected [B].

Rewards are the reference's: chosen = pi(chosen) - ref(chosen), rejected likewise, NOT scaled
by beta (TRL's `rewards/*` are these times beta).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from . import model, stacking
from .config import GPTConfig
from .model import Params
from .optim import merge
from .steps import Batch, TrainState

LOSSES = ("sigmoid", "hinge", "ipo")
LOGPROBS = ("mean", "sum")


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array, reduction: str = "mean") -> jax.Array:
    """The reference's compute_logprobs: log-softmax of the logits at 0..T-2 taken at tokens
    1..T-1, times the mask shifted by one, then the mean (reference) or the sum (TRL, Tunix,
    the DPO paper) over the masked tokens; [B]. fp32 whatever the logits' dtype."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    weights = mask[:, 1:].astype(jnp.float32)
    total = (picked * weights).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / weights.sum(-1)
    raise ValueError(f"unknown log-probability reduction {reduction!r}: one of {', '.join(LOGPROBS)}")


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
               beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-pair losses, chosen rewards, rejected rewards), each [B].

    sigmoid: -logsigmoid(beta h) (the reference's), with label smoothing e (conservative DPO)
    -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h); hinge: relu(1 - beta h); ipo:
    (h - 1 / (2 beta))^2, where h = (pi_c - pi_r) - (ref_c - ref_r), as TRL writes them."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits) - label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    elif loss == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    elif loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}: one of {', '.join(LOSSES)}")
    chosen = jax.lax.stop_gradient(policy_chosen - ref_chosen)
    rejected = jax.lax.stop_gradient(policy_rejected - ref_rejected)
    return losses, chosen, rejected


def pair_logprobs(config: GPTConfig, params: Params, batch: Batch, *, reduction: str = "mean", dropout_key: jax.Array | None = None,
                  dtype: Any = jnp.float32, remat: bool = False, attention: str = "auto",
                  scan_layers: bool | str = False) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) log-probabilities [B] from one forward pass over both stacked."""
    tokens = jnp.concatenate([jnp.asarray(batch["chosen"]), jnp.asarray(batch["rejected"])])
    mask = jnp.concatenate([jnp.asarray(batch["chosen_mask"]), jnp.asarray(batch["rejected_mask"])])
    key = dropout_key if config.drop_rate > 0 else None
    logits = model.apply(config, params, tokens, dropout_key=key, dtype=dtype, remat=remat, attention=attention, scan_layers=scan_layers)
    logprobs = sequence_logprobs(logits, tokens, mask, reduction)
    n = tokens.shape[0] // 2
    return logprobs[:n], logprobs[n:]


def preference_metrics(config: GPTConfig, params: Params, batch: Batch, reference: tuple[GPTConfig, Params] | None = None, *,
                       beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0, reduction: str = "mean",
                       dropout_key: jax.Array | None = None, dtype: Any = jnp.float32, remat: bool = False,
                       attention: str = "auto", scan_layers: bool | str = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, metrics) of a batch: loss, chosen_reward, rejected_reward, reward_margin (means
    over the real rows), correct / count (pairs whose chosen reward exceeds the rejected one).
    `reference` (config, params): its log-probabilities computed here (no dropout, no gradient);
    None: taken from the batch's ref_chosen / ref_rejected. `scan_layers`: see jaxft.model.apply."""
    options = dict(reduction=reduction, dtype=dtype, attention=attention, scan_layers=scan_layers)
    policy_c, policy_r = pair_logprobs(config, params, batch, dropout_key=dropout_key, remat=remat, **options)
    if reference is None:
        ref_c, ref_r = jnp.asarray(batch["ref_chosen"]), jnp.asarray(batch["ref_rejected"])
    else:
        ref_c, ref_r = jax.lax.stop_gradient(pair_logprobs(reference[0], reference[1], batch, **options))
    losses, chosen, rejected = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta=beta, loss=loss, label_smoothing=label_smoothing)
    weights = jnp.asarray(batch["weights"]).astype(jnp.float32) if "weights" in batch else jnp.ones_like(losses)
    count = weights.sum()
    mean = lambda x: (x * weights).sum() / jnp.maximum(count, 1.0)
    value = mean(losses)
    return value, {
        "loss": value, "chosen_reward": mean(chosen), "rejected_reward": mean(rejected), "reward_margin": mean(chosen - rejected),
        "correct": ((chosen > rejected) * weights).sum(), "count": count,
    }


class WithReference:
    """A jitted step with the reference parameters bound as its last argument (a traced
    argument, not constants folded into the program); `_cache_size` as jaxft.steps.compile_count reads."""

    def __init__(self, step: Callable, reference: Params) -> None:
        self.step, self.reference = step, reference

    def __call__(self, first: Any, batch: Batch) -> Any:
        return self.step(first, batch, self.reference)

    def _cache_size(self) -> int:
        return self.step._cache_size()


def make_preference_steps(config: GPTConfig, optimizer: optax.GradientTransformation, *, reference: tuple[GPTConfig, Params] | None = None,
                          beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0, reduction: str = "mean",
                          dtype: Any = jnp.float32, remat: bool = False, attention: str = "auto",
                          scan_layers: bool | str = False) -> tuple[Callable, Callable]:
    """(train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> metrics), as
    jaxft.steps.make_steps' (train_step donates its state; gradients to the trainable tree
    only; metrics carry grad_norm). `reference` (config, params): live reference
    log-probabilities; None: the batches carry precomputed ones."""
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}: one of {', '.join(LOSSES)}")
    if reduction not in LOGPROBS:
        raise ValueError(f"unknown log-probability reduction {reduction!r}: one of {', '.join(LOGPROBS)}")
    ref_config = reference[0] if reference is not None else None
    options = dict(beta=beta, loss=loss, label_smoothing=label_smoothing, reduction=reduction, dtype=dtype, attention=attention,
                   scan_layers=stacking.resolve(scan_layers))

    def loss_fn(trainable, frozen, batch, ref_params, dropout_key):
        ref = None if ref_params is None else (ref_config, ref_params)
        return preference_metrics(config, merge(trainable, frozen), batch, ref, dropout_key=dropout_key, remat=remat, **options)

    def train_with(state: TrainState, batch: Batch, ref_params: Params | None):
        dropout_key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable, state.frozen, batch, ref_params, dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))}
        return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), metrics

    def eval_with(params: Params, batch: Batch, ref_params: Params | None):
        ref = None if ref_params is None else (ref_config, ref_params)
        return preference_metrics(config, params, batch, ref, **options)[1]

    if reference is not None:
        return (WithReference(jax.jit(train_with, donate_argnums=0), reference[1]), WithReference(jax.jit(eval_with), reference[1]))

    def train_step(state: TrainState, batch: Batch):  # (state, batch) as jaxft.sharding.shard_steps re-jits them
        return train_with(state, batch, None)

    def eval_step(params: Params, batch: Batch):
        return eval_with(params, batch, None)

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def make_logprobs_fn(config: GPTConfig, *, reduction: str = "mean", dtype: Any = jnp.float32, attention: str = "auto") -> Callable:
    """jit (params, batch) -> (chosen, rejected) log-probabilities [B]: the reference model's
    precompute pass (no dropout)."""
    return jax.jit(lambda params, batch: pair_logprobs(config, params, batch, reduction=reduction, dtype=dtype, attention=attention))
