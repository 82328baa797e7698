"""Which parameters train, and the optimizer over exactly those.

Parameters are split into a trainable and a frozen tree (frozen leaves are `None` in the
trainable tree and vice versa). Gradients are taken with respect to the trainable tree
only, so frozen weights cost no gradient or optimizer memory, get no weight decay, and
stay bitwise unchanged: the semantics of `torch.optim.AdamW` over parameters with
`requires_grad=False` elsewhere.

`masked` gives the same semantics over one full parameter tree, for code that keeps params
whole (gradients of every leaf, an optimizer that skips the frozen ones).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import GPTConfig
from .model import Params

TRAINABLE_CHOICES = ("head", "last-block", "last-N-blocks", "all", "lora")
_LAST_N = re.compile(r"^last-(\d+)-blocks?$")


def check_trainable(trainable: str) -> None:
    """Refuse an unknown selection before any model is loaded (the block count is checked later)."""
    if trainable not in ("all", "head", "lora", "last-block") and not _LAST_N.match(trainable):
        raise ValueError(
            f"unknown trainable selection {trainable!r}; choose head, last-block, last-N-blocks (e.g. last-2-blocks), all or lora"
        )


def trainable_blocks(config: GPTConfig, trainable: str) -> tuple[int, ...] | None:
    """Indices of the transformer blocks that train; None means every parameter trains."""
    if trainable == "all":
        return None
    if trainable in ("head", "lora"):
        return ()
    if trainable == "last-block":
        return (config.n_layers - 1,)
    match = _LAST_N.match(trainable)
    if match:
        n = int(match.group(1))
        if not 1 <= n <= config.n_layers:
            raise ValueError(f"trainable {trainable!r}: N must be 1 to {config.n_layers}, the model's blocks")
        return tuple(range(config.n_layers - n, config.n_layers))
    raise ValueError(
        f"unknown trainable selection {trainable!r}; choose head, last-block, last-N-blocks (e.g. last-2-blocks), all or lora"
    )


def trainable_mask(config: GPTConfig, params: Params, trainable: str = "last-block", final_norm: bool | None = None) -> Params:
    """A tree of bools like `params`: True where the parameter trains.

    The head always trains (the classification head, the untied LM head, or `wte` when
    the LM head is tied to it), except with "lora" on a language model: then only the
    adapters train. `final_norm` (default: on unless only the head or the adapters train)
    adds the final LayerNorm, as the reference does for its last-block recipe.
    """
    blocks = trainable_blocks(config, trainable)
    if trainable == "lora" and not config.lora_rank:
        raise ValueError("trainable 'lora' needs a model with LoRA adapters (set a LoRA rank)")
    if final_norm is None:
        final_norm = trainable not in ("head", "lora")
    if trainable == "lora" and config.num_classes is None:
        head_names: set[str] = set()
    else:
        head_names = {"cls_head"} if config.num_classes is not None else ({"wte"} if config.tie_embeddings else {"lm_head"})

    def top_level(name: str) -> bool:
        if blocks is None:
            return True
        if name in head_names:
            return True
        if name == "ln_f":
            return final_norm
        if name.startswith("h_"):
            return int(name[2:]) in blocks
        return False

    mask = {name: jax.tree_util.tree_map(lambda _: top_level(name), sub) for name, sub in params.items()}
    if config.lora_rank:  # adapters train with every selection; base kernels only where selected
        mask = jax.tree_util.tree_map_with_path(
            lambda path, m: True if path[-1].key in ("lora_a", "lora_b") else m, mask
        )
    return mask


def split(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): each keeps the other's leaves as None."""
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(mask):
        raise ValueError("mask: its tree differs from the parameters' (build it with trainable_mask(config, params, ...))")
    trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def merge(trainable: Params, frozen: Params) -> Params:
    """The whole parameter tree again: each leaf from whichever of the two trees holds it."""
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def adamw(
    learning_rate: float = 5e-5,
    weight_decay: float = 0.1,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = None,
    accumulation_steps: int = 1,
    steps_per_epoch: int | None = None,
    last_step: int | None = None,
) -> optax.GradientTransformation:
    """AdamW with torch.optim.AdamW's defaults and semantics (decoupled decay of every
    trainable leaf, eps outside the square root), optional clipping and gradient accumulation
    (`accumulate`: with `steps_per_epoch`, an epoch's last batches update too, as the reference's)."""
    if not callable(learning_rate) and not learning_rate >= 0:  # (a schedule is a callable)
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    accumulation_steps = int(accumulation_steps) if isinstance(accumulation_steps, np.integer) else accumulation_steps
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
    # lr and weight decay are optimizer state (inject_hyperparams), not constants of the compiled
    # step: a rerun with other values loads the same programs from the compilation cache. The same
    # float32 arithmetic as optax.adamw(lr, ...) (tests/test_optim_masked.py checks bit equality).
    opt = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root"), hyperparam_dtype=jnp.float32)(
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
    )
    if grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
    if accumulation_steps > 1:
        opt = accumulate(opt, accumulation_steps, steps_per_epoch, last_step)
    return opt


class AccumulateState(NamedTuple):
    steps: jax.Array  # batches seen (int32)
    grads: optax.Updates  # the group's gradients so far, each divided by k
    inner: optax.OptState
    # Data, not constants of the compiled step (a rerun with other --max-steps compiles nothing new):
    steps_per_epoch: jax.Array  # int32; 0: no epochs
    last_step: jax.Array  # int32; -1: none


def accumulate(
    inner: optax.GradientTransformation, k: int, steps_per_epoch: int | None = None, last_step: int | None = None
) -> optax.GradientTransformation:
    """Gradient accumulation as the reference's follow-up experiments write it: each batch's loss
    divided by k and its gradients summed; `inner` updates after every k-th batch of an epoch,
    after the epoch's last batch (`steps_per_epoch`: a short group then counts /k too) and after
    batch `last_step` (a run stopped by max-steps), and the other steps change nothing.
    optax.MultiSteps instead carries a short group over into the next epoch and averages over
    the batches it holds."""
    if k < 1:
        raise ValueError(f"accumulation steps must be >= 1, got {k}")

    def init(params: optax.Params) -> AccumulateState:
        return AccumulateState(
            jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params), inner.init(params),
            jnp.asarray(steps_per_epoch or 0, jnp.int32), jnp.asarray(-1 if last_step is None else last_step, jnp.int32),
        )

    def update(grads: optax.Updates, state: AccumulateState, params: optax.Params | None = None):
        summed = jax.tree_util.tree_map(lambda a, g: a + g / k, state.grads, grads)
        steps = state.steps + 1
        per_epoch = state.steps_per_epoch
        in_epoch = jnp.where(per_epoch > 0, steps % jnp.maximum(per_epoch, 1), steps)  # 0: the epoch's last batch
        apply = (in_epoch % k == 0) | (steps == state.last_step)

        def step(_):
            updates, inner_state = inner.update(summed, state.inner, params)
            return updates, state._replace(steps=steps, grads=jax.tree_util.tree_map(jnp.zeros_like, summed), inner=inner_state)

        def hold(_):
            return jax.tree_util.tree_map(jnp.zeros_like, summed), state._replace(steps=steps, grads=summed)

        return jax.lax.cond(apply, step, hold, None)

    return optax.GradientTransformation(init, update)


_TRAIN, _FREEZE = "train", "freeze"


def _negative_zero_updates() -> optax.GradientTransformation:
    """Updates of -0.0: `p + (-0.0)` is `p` bit for bit, even for p = -0.0 (p + 0.0 is +0.0)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def masked(optimizer: optax.GradientTransformation, mask: Params) -> optax.GradientTransformation:
    """`optimizer` over the leaves where `mask` is True; every other leaf frozen.

    `mask` is a tree of bools with the structure of the parameters (see `trainable_mask`).
    Built with `optax.multi_transform`: the trainable leaves go to `optimizer`, which sees
    only them (its state, e.g. Adam's moments, holds nothing for frozen leaves, and its
    weight decay never reaches them); the frozen leaves get updates of -0.0, so after
    `optax.apply_updates` they are bitwise unchanged. This is the split-tree path
    (`split`/`merge` + `train.init_state`) over one whole tree: `init(params)` and
    `update(grads, state, params)` take full trees, and gradients of frozen leaves are
    ignored (under `jax.jit` XLA drops their computation: a compiled step costs what the
    split one does). Wrap the inner optimizer, accumulation included
    (`masked(adamw(accumulation_steps=4), mask)`): `accumulate` then sums the
    trainable gradients only, where `accumulate(masked(...))` would also keep an
    accumulator for every frozen leaf.
    """
    leaves = jax.tree_util.tree_leaves(mask)
    if not all(isinstance(m, (bool, np.bool_)) for m in leaves):
        raise ValueError("mask: every leaf must be a Python or NumPy bool (True = the parameter trains)")
    labels = jax.tree_util.tree_map(lambda m: _TRAIN if m else _FREEZE, mask)
    return optax.multi_transform({_TRAIN: optimizer, _FREEZE: _negative_zero_updates()}, labels)

