"""GPT-2's layers as Flax linen modules: the dense projections (plain or LoRA), the LayerNorm,
causal self-attention (explicit, fused, pooled-query and cached variants) and the MLP, and
`Block`, one transformer block. jaxft.model composes them into the model (see its docstring
for the parameter names); jaxft.layers runs blocks on a residual stream.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import GPTConfig

_INIT_STD = 0.02


class _Dense(nn.Dense):
    """nn.Dense (same parameters) that multiplies [..., in] inputs as one [rows, in] matrix.

    Same values; for the backward pass the difference matters on CPU: the kernel gradient
    of a 3-D input contracts two axes, which XLA lowers through a transposed copy of the
    incoming gradient, and its fusion pass recomputes the residual stream's whole gradient
    chain inside every such copy (quadratic in depth). A 2-D input gets a plain matmul."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True, std: float = _INIT_STD, **module: Any) -> nn.Dense:
    return _Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
        **module,
    )


def lora_a_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
    """Kaiming-uniform with fan_in = in: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADense(nn.Module):
    """A Dense layer plus a low-rank update: y = x W + b + (alpha / r) (x A) B.

    A [in, r] starts uniform (kaiming, fan_in = in), B [r, out] at zero, so training starts
    from the base model exactly. Used for the block projections when `config.lora_rank > 0`.
    """

    features: int
    rank: int
    alpha: float
    use_bias: bool = True
    dtype: Any = jnp.float32
    std: float = _INIT_STD

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # one 2-D matmul per weight, as in _Dense
        kernel = self.param("kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features))
        y = x @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        lora_a = self.param("lora_a", lora_a_init, (x.shape[-1], self.rank))
        lora_b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        y = y + (x @ lora_a.astype(self.dtype)) @ lora_b.astype(self.dtype) * (self.alpha / self.rank)
        return y.reshape(*lead, self.features)


def _projection(config: GPTConfig, features: int, name: str, dtype: Any, use_bias: bool = True, std: float = _INIT_STD):
    """A block's projection: plain Dense, or LoRADense when the config asks for LoRA."""
    if config.lora_rank:
        return LoRADense(features, config.lora_rank, config.lora_alpha, use_bias, dtype, std, name=name)
    return _dense(features, name, dtype, use_bias, std)


def _layer_norm(config: GPTConfig, name: str, **module: Any) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2], as torch computes it (parity to 1e-6).
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=jnp.float32, name=name, **module)


class _PooledQKV(nn.Module):
    """c_attn (the parameters of its Dense: kernel [d, 3d] q|k|v, bias) when one query per row
    is needed: (q from x_query [B, 1, d], k|v from x [B, T, d]), a third less work than q|k|v
    for every row."""

    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, x_query: jax.Array) -> tuple[jax.Array, jax.Array]:
        d, n = x.shape[-1], self.features // 3
        kernel = self.param("kernel", nn.initializers.normal(_INIT_STD), (d, self.features)).astype(self.dtype)
        q = x_query.reshape(-1, d).astype(self.dtype) @ kernel[:, :n]
        kv = x.reshape(-1, d).astype(self.dtype) @ kernel[:, n:]
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
            q, kv = q + bias[:n], kv + bias[n:]
        return q.reshape(*x_query.shape[:-1], n), kv.reshape(*x.shape[:-1], 2 * n)


def _pick(x: jax.Array, index: jax.Array, row: jax.Array | None) -> jax.Array:
    """x [B, T, ...] at position index[q] of row q (or of row row[q]): [Q, 1, ...]."""
    if row is None:
        return jnp.take_along_axis(x, index.reshape(-1, *[1] * (x.ndim - 1)), axis=1)
    return x[row, index][:, None]


class CausalSelfAttention(nn.Module):
    config: GPTConfig
    dtype: Any = jnp.float32
    # Plain causal attention by jax.nn.dot_product_attention with this implementation (see
    # fused_attention); None: explicit scores, mask and softmax (caches, pooled queries, packing).
    fused: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array] | None,
        cache_index: jax.Array | None,
        deterministic: bool,
        query_index: jax.Array | None = None,
        query_row: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """With `query_index` [Q]: one query per sequence, at that position of row b (or of row
        query_row[q] of packed rows, whose `segments` [rows, T] then close the attention)."""
        cfg = self.config
        batch, seq, _ = x.shape
        if query_index is not None and not cfg.lora_rank:  # q for the query rows only
            x_query = _pick(x, query_index, query_row)
            q, kv = _PooledQKV(3 * cfg.emb_dim, cfg.qkv_bias, self.dtype, name="c_attn")(x, x_query)
            k, v = jnp.split(kv, 2, axis=-1)
        else:
            qkv = _projection(cfg, 3 * cfg.emb_dim, "c_attn", self.dtype, use_bias=cfg.qkv_bias)(x)
            q, k, v = jnp.split(qkv, 3, axis=-1)
            if query_index is not None:
                q = _pick(q, query_index, query_row)
        q = q.reshape(q.shape[0], q.shape[1], cfg.n_heads, cfg.head_dim)
        k, v = (t.reshape(batch, seq, cfg.n_heads, cfg.head_dim) for t in (k, v))
        if query_index is not None:  # one query per sequence, at query_index [Q]; keys: every earlier position
            mask = (jnp.arange(seq)[None, :] <= query_index[:, None])[:, None, None, :]  # causal, [Q, 1, 1, T]
            if query_row is not None:  # packed rows: each query's row, and of it only its own segment
                k, v, rows = k[query_row], v[query_row], segments[query_row]
                own = rows == jnp.take_along_axis(rows, query_index[:, None], axis=1)
                mask = mask & own[:, None, None, :]

        if self.fused and query_index is None and layer_cache is None:  # no [B, H, T, T] scores in memory
            if not deterministic and cfg.drop_rate > 0:
                raise ValueError(f"attention {self.fused!r} has no attention dropout: use --attention xla with --drop-rate")
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True, implementation=self.fused)
        else:
            if layer_cache is not None:
                k_cache, v_cache = layer_cache
                start = (0, cache_index, 0, 0)
                k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
                v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
                layer_cache = (k, v)

            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
            # A finite minimum instead of -inf keeps fully masked rows (pad queries) NaN-free;
            # for every other row exp(min - max) underflows to exactly 0, as -inf would.
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(scores, axis=-1)
            weights = nn.Dropout(cfg.drop_rate)(weights, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v.astype(self.dtype))
        out = out.reshape(q.shape[0], q.shape[1], cfg.emb_dim)
        proj_std = _INIT_STD / math.sqrt(2 * cfg.n_layers)
        return _projection(cfg, cfg.emb_dim, "c_proj", self.dtype, std=proj_std)(out), layer_cache


class MLP(nn.Module):
    config: GPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _projection(cfg, 4 * cfg.emb_dim, "c_fc", self.dtype)(x)
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh approximation
        proj_std = _INIT_STD / math.sqrt(2 * cfg.n_layers)
        return _projection(cfg, cfg.emb_dim, "c_proj", self.dtype, std=proj_std)(h)


class Block(nn.Module):
    config: GPTConfig
    dtype: Any = jnp.float32
    fused: str | None = None  # see CausalSelfAttention

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index, deterministic, query_index=None, query_row=None, segments=None):
        """x [B, T, D] -> ([B, T, D], cache). With `query_index` [B], only that position of each row
        comes out, [B, 1, D]: its attention still reads every key, but the output projection and
        the MLP run on B rows instead of B*T (all a classifier reading one position needs). Packed
        rows (jaxft.packing) add `query_row` [Q] and `segments`: [Q, 1, D], one per sequence."""
        cfg = self.config
        h, layer_cache = CausalSelfAttention(cfg, self.dtype, self.fused, name="attn")(
            _layer_norm(cfg, "ln_1")(x).astype(self.dtype), mask, layer_cache, cache_index, deterministic, query_index, query_row, segments
        )
        if query_index is not None:
            x = _pick(x, query_index, query_row)
        x = x + nn.Dropout(cfg.drop_rate)(h, deterministic=deterministic)
        h = MLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, "ln_2")(x).astype(self.dtype))
        x = x + nn.Dropout(cfg.drop_rate)(h, deterministic=deterministic)
        return x, layer_cache


