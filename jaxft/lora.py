"""LoRA: low-rank adapters on every block projection, as a configuration.

`add_lora` turns a model into one whose `c_attn`, `c_proj`, `c_fc` kernels each get
`lora_a` [in, r] and `lora_b` [r, out] (B = 0, so outputs are unchanged at the start);
train them with `trainable="lora"`. `merge_lora` folds W + (alpha / r) A B back into plain
kernels, which every checkpoint format can hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import GPTConfig
from .model import Params, lora_a_init

TARGETS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def add_lora(config: GPTConfig, params: Params, rank: int, alpha: float, key: jax.Array) -> tuple[GPTConfig, Params]:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if config.lora_rank:
        raise ValueError("the model already has LoRA adapters")
    params = jax.tree_util.tree_map(lambda x: x, params)  # a new tree; arrays are shared, not copied
    keys = iter(jax.random.split(key, config.n_layers * len(TARGETS)))
    for i in range(config.n_layers):
        for group, name in TARGETS:
            layer = dict(params[f"h_{i}"][group][name])
            n_in, n_out = layer["kernel"].shape
            layer["lora_a"] = lora_a_init(next(keys), (n_in, rank))
            layer["lora_b"] = jnp.zeros((rank, n_out), jnp.float32)
            params[f"h_{i}"] = {**params[f"h_{i}"], group: {**params[f"h_{i}"][group], name: layer}}
    return config.replace(lora_rank=rank, lora_alpha=float(alpha)), params


def merge_lora(config: GPTConfig, params: Params) -> tuple[GPTConfig, Params]:
    """Fold the adapters into the kernels: a plain GPT-2 with the same outputs."""
    if not config.lora_rank:
        return config, params
    scale = config.lora_alpha / config.lora_rank
    params = dict(params)
    for i in range(config.n_layers):
        block = {**params[f"h_{i}"]}
        for group, name in TARGETS:
            layer = dict(block[group][name])
            a, b = layer.pop("lora_a"), layer.pop("lora_b")
            layer["kernel"] = jnp.asarray(layer["kernel"]) + scale * (jnp.asarray(a) @ jnp.asarray(b))
            block[group] = {**block[group], name: layer}
        params[f"h_{i}"] = block
    return config.replace(lora_rank=0), params
