"""GPT-2 over a plain parameter pytree: `init_params`, `apply`, and the pieces every program
that runs the model is made of (training steps, the trunk cache, generation).

Parameter names follow the OpenAI checkpoint, so converting weights is renaming:

    wte/embedding [vocab, d]          wpe/embedding [ctx, d]
    h_{i}/ln_1/{scale,bias}           h_{i}/attn/c_attn/{kernel [d, 3d] (q|k|v), bias}
    h_{i}/attn/c_proj/{kernel, bias}  h_{i}/ln_2/{scale,bias}
    h_{i}/mlp/c_fc/{kernel [d, 4d], bias}   h_{i}/mlp/c_proj/{kernel [4d, d], bias}
    ln_f/{scale,bias}
    lm_head/kernel [d, vocab]         (only when the LM head is not tied to wte)
    cls_head/{kernel [d, classes], bias}   (only for classification configs)

Dense kernels are [in, out], the layout of the OpenAI and Hugging Face (Conv1D) weights.

The pieces, each a pure function of (config, params, ...): `embed` (token + position
embeddings), `run_blocks` (blocks start..stop on a residual stream [B, T, D]; packed rows, a
pooled last block, remat, dropout, and runs of blocks as one `jax.lax.scan`), `final_norm`,
`head_matrix` (the one place that says which matrix is the LM head: wte when tied, else
lm_head) and `head`. `apply` is embed -> run_blocks -> final_norm -> head. The layers
themselves (attention, MLP, Block) are in jaxft.blocks; attention takes an optional key/value
cache, which jaxft.generate drives through `run_blocks`' per-layer variant `cached_blocks`.
A tree may hold runs of blocks stacked (jaxft.stacking, an internal layout of the training
state); the pieces accept both layouts.

`attention` chooses how causal self-attention is computed (see jaxft.attention: "xla", "cudnn"
or "auto"). Only plain causal self-attention is fused; caches, pooled queries and packed rows
stay explicit.
"""


from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import stacking
from .attention import fused_attention, segment_mask
from .blocks import _INIT_STD, MLP, Block, CausalSelfAttention, LoRADense, _dense, _layer_norm, _pick, lora_a_init  # noqa: F401 (re-exported)
from .config import GPTConfig

Params = dict[str, Any]


# The pieces build their modules unbound (parent=None): inside GPT2's own compact method a new
# module would otherwise become a child of GPT2 and claim a name.
_FREE = {"parent": None}


def _wte(cfg: GPTConfig, **module: Any) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=nn.initializers.normal(_INIT_STD), name="wte", **module)


def _wpe(cfg: GPTConfig, **module: Any) -> nn.Embed:
    return nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=nn.initializers.normal(0.01), name="wpe", **module)


def _dropout(cfg: GPTConfig, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return x if key is None else nn.Dropout(cfg.drop_rate, parent=None).apply({}, x, deterministic=False, rngs={"dropout": key})


def embed(config: GPTConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
          dropout_key: jax.Array | None = None) -> jax.Array:
    """The residual stream's start, wte[tokens] + wpe[positions]: fp32 [B, T, D]. Positions
    0..T-1 by default (refused beyond the context length); packed rows bring their own.
    Dropout with `dropout_key` (the model's key: see `run_blocks` for how it is split)."""
    batch, seq = tokens.shape
    if positions is None:
        if seq > config.context_length:  # the position table has no row for them: NaN, not an error, under jit
            raise ValueError(f"sequence of {seq} tokens exceeds the model's context length {config.context_length}")
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    x = _wte(config, **_FREE).apply({"params": params["wte"]}, tokens) + _wpe(config, **_FREE).apply({"params": params["wpe"]}, positions)
    return _dropout(config, x, None if dropout_key is None else jax.random.fold_in(dropout_key, 0))


def causal_mask(seq: int) -> jax.Array:
    """Plain causal attention, [1, 1, T, T]."""
    return (jnp.arange(seq)[:, None] >= jnp.arange(seq)[None, :])[None, None]


def _block_call(config, dtype, fused, mask, dropout_key, remat, scanned, pooled=(None, None, None)):
    """block(p, x, i) -> x: block i (parameters p) on x; its dropout key is fold_in(key, i + 1)
    in both the unrolled and the scanned program, so the two draw the same masks."""
    deterministic = dropout_key is None

    def call(p, x, i):
        rngs = None if deterministic else {"dropout": jax.random.fold_in(dropout_key, i + 1)}
        return Block(config, dtype, fused, parent=None).apply({"params": p}, x, mask, None, None, deterministic, *pooled, rngs=rngs)[0]

    return jax.checkpoint(call, prevent_cse=not scanned) if remat else call


def _groups(params: Params, start: int, stop: int, scan: bool) -> list[tuple[int, int, Any]]:
    """Blocks start..stop-1 as (a, b, stacked params or None): stacked runs of the tree (sliced
    to the range), with `scan` also each stretch of >= 2 per-layer blocks (stacked here: a copy
    per call); else single blocks."""
    runs = {a: b for a, b in stacking.stacked_runs(params)}
    groups, i = [], start
    while i < stop:
        if f"h_{i}" in params:
            j = i + 1
            while scan and j < stop and f"h_{j}" in params:
                j += 1
            if j - i >= 2:
                groups.append((i, j, stacking.stack({f"h_{k}": params[f"h_{k}"] for k in range(i, j)}, [(i, j)])[stacking.run_name(i, j)]))
            else:
                groups.append((i, j, None))
            i = j
            continue
        a = max((a for a in runs if a <= i < runs[a]), default=None)
        if a is None:
            raise ValueError(f"the parameters have no block h_{i}")
        b = min(runs[a], stop)
        group = params[stacking.run_name(a, runs[a])]
        if (i, b) != (a, runs[a]):  # part of a run: a slice (a copy)
            group = jax.tree_util.tree_map(lambda x: x[i - a : b - a], group)
        groups.append((i, b, group))
        i = b
    return groups


def run_blocks(
    config: GPTConfig,
    params: Params,
    x: jax.Array,
    start: int = 0,
    stop: int | None = None,
    *,
    dtype: Any = jnp.float32,
    remat: bool = False,
    dropout_key: jax.Array | None = None,
    mask: jax.Array | None = None,
    segments: jax.Array | None = None,
    fused: str | None = None,
    pool_index: jax.Array | None = None,
    pool_row: jax.Array | None = None,
    scan: bool = False,
) -> jax.Array:
    """Blocks h_{start}..h_{stop-1} (stop: n_layers) on the residual stream x [B, T, D].

    mask: [B or 1, 1, T, T] (default causal); packed rows (jaxft.packing) give their `segments`
    [B, T] instead. `fused` (see `fused_attention`) applies to plain causal attention only.
    With `pool_index` [B] (and stop n_layers), the result is only that position of each row,
    [B, D]: the last block computes one query per row (keys and values from every position),
    so its output projection and MLP run on B rows instead of B*T; with no block to run, the
    position is just picked. Packed rows add `pool_row` [Q]: sequence q is read at position
    pool_index[q] of row pool_row[q], and the result is [Q, D].
    Runs of blocks stacked in `params` (jaxft.stacking) run as one `jax.lax.scan`; with `scan`,
    so do stretches of per-layer blocks (stacked inside the call). Dropout with `dropout_key`."""
    if segments is not None:
        mask = segment_mask(segments)
    if mask is None:
        mask = causal_mask(x.shape[1])
    else:
        fused = None
    n = config.n_layers
    stop = n if stop is None else stop
    if pool_index is not None and stop != n:
        raise ValueError("pool_index: only the model's last block can pool")
    pooled_last = pool_index is not None and start < n
    for a, b, group in _groups(params, start, n - 1 if pooled_last else stop, scan):
        if group is None:
            x = _block_call(config, dtype, fused, mask, dropout_key, remat, False)(params[f"h_{a}"], x, a)
        else:
            call = _block_call(config, dtype, fused, mask, dropout_key, remat, True)
            x, _ = jax.lax.scan(lambda h, pi: (call(pi[0], h, pi[1]), None), x, (group, jnp.arange(a, b)))
    if pooled_last:
        (_, _, group), = _groups(params, n - 1, n, False)
        last = params[f"h_{n - 1}"] if group is None else jax.tree_util.tree_map(lambda v: v[0], group)
        call = _block_call(config, dtype, fused, mask, dropout_key, remat, False, (pool_index, pool_row, segments))
        x = call(last, x, n - 1)
    elif pool_index is not None:
        x = _pick(x, pool_index, pool_row)
    return x if pool_index is None else x[:, 0]


def cached_blocks(config: GPTConfig, params: Params, x: jax.Array, mask: jax.Array, caches: Any, index: Any,
                  dtype: Any) -> tuple[jax.Array, Any]:
    """Every block on x with a key/value cache (jaxft.generate): (x, new caches). The cache is one
    (k, v) buffer per layer [B, S, heads, head_dim], updated in place (a [layers, ...] array
    sliced and re-stacked on every call copies the whole cache per token: 3x slower per step at
    1024 slots on CPU); with every block but none stacked as one run (`stacking.stack(params,
    [(0, n_layers)])`), one scan with a (k, v) pair [layers, B, S, ...] carried through it."""
    block = Block(config, dtype, parent=None)
    if not stacking.stacked_runs(params):
        new = []
        for i in range(config.n_layers):
            x, layer_cache = block.apply({"params": params[f"h_{i}"]}, x, mask, caches[i], index, True)
            new.append(layer_cache)
        return x, tuple(new)

    def body(carry, inputs):
        h, k_all, v_all = carry
        p, i = inputs
        h, (k, v) = block.apply({"params": p}, h, mask, (k_all[i], v_all[i]), index, True)
        return (h, k_all.at[i].set(k), v_all.at[i].set(v)), None

    (x, k_all, v_all), _ = jax.lax.scan(body, (x, *caches), (params[stacking.run_name(0, config.n_layers)], jnp.arange(config.n_layers)))
    return x, (k_all, v_all)


def final_norm(config: GPTConfig, params: Params, x: jax.Array) -> jax.Array:
    """The final LayerNorm (fp32)."""
    return _layer_norm(config, "ln_f", **_FREE).apply({"params": params["ln_f"]}, x)


def head_matrix(config: GPTConfig, params: Params, dtype: Any = jnp.float32) -> tuple[jax.Array, str, Any]:
    """The LM head, decided here only: (matrix, layout, compute dtype). Tied: wte/embedding
    [vocab, d], "vd", computed in fp32 whatever `dtype` (as nn.Embed.attend promotes it);
    untied: lm_head/kernel [d, vocab], "dv", in `dtype`."""
    if config.tie_embeddings:
        return params["wte"]["embedding"], "vd", jnp.promote_types(dtype, jnp.float32)
    return params["lm_head"]["kernel"], "dv", dtype


def head(config: GPTConfig, params: Params, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """fp32 logits [..., classes or vocab] of final-norm hidden states x [..., D]."""
    if config.num_classes is not None:
        out = _dense(config.num_classes, "cls_head", dtype, **_FREE).apply({"params": params["cls_head"]}, x.astype(dtype))
    else:
        weight, layout, _ = head_matrix(config, params, dtype)
        if layout == "vd":
            out = _wte(config, **_FREE).apply({"params": {"embedding": weight}}, x.astype(dtype), method="attend")
        else:
            out = _dense(config.vocab_size, "lm_head", dtype, use_bias=False, **_FREE).apply({"params": {"kernel": weight}}, x.astype(dtype))
    return out.astype(jnp.float32)


def forward(
    config: GPTConfig,
    params: Params,
    tokens: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    scan: bool = False,
    return_hidden: bool = False,
    pool_index: jax.Array | None = None,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
) -> jax.Array:
    """embed -> run_blocks -> final_norm (-> head): `apply` without its input checks."""
    fused = fused_attention(attention, dtype, dropout=dropout_key is not None and config.drop_rate > 0)
    x = embed(config, params, tokens, positions, dropout_key)
    x = run_blocks(config, params, x, dtype=dtype, remat=remat, dropout_key=dropout_key, segments=segments, fused=fused,
                   pool_index=pool_index, scan=scan)
    x = final_norm(config, params, x)
    return x if return_hidden else head(config, params, x, dtype)


class GPT2(nn.Module):
    """GPT-2's parameters, declared as Flax submodules under OpenAI's names (what `init_params`
    initialises); applied, the same as `forward`: fp32 logits [B, T, vocab or classes] (see
    `apply` for the keywords)."""

    config: GPTConfig
    dtype: Any = jnp.float32  # compute dtype; parameters stay fp32
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    attention: str = "auto"  # see fused_attention (on a CPU, and for fp32 compute, always "xla")

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, **kwargs: Any) -> jax.Array:
        cfg = self.config
        if self.is_initializing():  # declare every parameter (init's values follow from these names)
            x = _wte(cfg)(tokens) + _wpe(cfg)(jnp.zeros_like(tokens))
            mask = causal_mask(tokens.shape[1])
            for i in range(cfg.n_layers):
                x, _ = Block(cfg, name=f"h_{i}")(x, mask, None, None, True)
            x = _layer_norm(cfg, "ln_f")(x)
            if cfg.num_classes is not None:
                _dense(cfg.num_classes, "cls_head", jnp.float32)(x)
            elif not cfg.tie_embeddings:
                _dense(cfg.vocab_size, "lm_head", jnp.float32, use_bias=False)(x)
        key = None if deterministic else self.make_rng("dropout")
        return forward(cfg, self.variables["params"], tokens, dropout_key=key, dtype=self.dtype, remat=self.remat,
                       attention=self.attention, **kwargs)


def init_params(config: GPTConfig, key: jax.Array) -> Params:
    """Random GPT-2 parameters (GPT-2's init: N(0, 0.02), residual projections scaled); `key` a PRNG key or an int seed."""
    key = jax.random.PRNGKey(key) if isinstance(key, (int, np.integer)) else key
    return _init(config, key, jnp.zeros((1, 1), dtype=jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _init(config: GPTConfig, key: jax.Array, tokens: jax.Array) -> Params:
    return GPT2(config).init(key, tokens)["params"]


@functools.lru_cache(maxsize=16)
def param_shapes(config: GPTConfig) -> Params:
    """The parameter tree of `GPT2(config)` as shapes and dtypes, computed without allocating it."""
    return jax.eval_shape(lambda key: GPT2(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.PRNGKey(0))


def apply(
    config: GPTConfig,
    params: Params,
    tokens: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    scan_layers: bool | str = False,
    **kwargs: Any,
) -> Any:
    """Run the model: fp32 logits [B, T, vocab or classes] (the final hidden state with
    `return_hidden=True`). Dropout is active only when `dropout_key` is given; `dtype` is the
    compute dtype (parameters stay fp32); `attention` see `fused_attention`. Keywords:
    `return_hidden`, `pool_index` [B] (only that position of each row: see `run_blocks`),
    packed rows' `positions` and `segments` [B, T]. `scan_layers` (True/False/"on"/"off"/"auto",
    see jaxft.stacking.resolve): run the blocks as one `jax.lax.scan` (same values; compiles one
    block instead of n_layers). `params` may hold stacked runs (jaxft.stacking)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq] token ids, got shape {tokens.shape}")
    if hasattr(jax, "typeof") and any(axis is not None for axis in getattr(jax.typeof(tokens).sharding, "spec", ())):
        raise ValueError("tokens are sharded over Explicit mesh axes (jax.make_mesh's default); jaxft's model is written for "
                         "Auto axes: jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n), or jaxft.sharding.make_mesh")
    unknown = sorted(set(kwargs) - {"return_hidden", "pool_index", "positions", "segments"})
    if unknown:
        raise TypeError(f"apply() got unexpected keyword argument {unknown[0]!r}")
    config.check_params(stacking.layer_names(params), head=not kwargs.get("return_hidden"))  # (Flax: "ScopeParamNotFoundError")
    return forward(config, params, tokens, dropout_key=dropout_key, dtype=dtype, remat=remat, attention=attention,
                   scan=stacking.resolve(scan_layers), **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(config: GPTConfig, params: Params, tokens: jax.Array, scan: bool) -> jax.Array:
    return apply(config, params, tokens, scan_layers=scan)


def logits(config: GPTConfig, params: Params, token_ids: Any, scan_layers: bool | str = False) -> jax.Array:
    """fp32 logits [batch, seq, vocab or num_classes], no dropout. token_ids: [seq] or [batch, seq]
    (each new shape compiles once: pad to a few lengths when calling it for many). `scan_layers`:
    see `apply`."""
    ids = np.asarray(token_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [seq] or [batch, seq], got shape {ids.shape}")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"token ids must be integers in 0..{config.vocab_size - 1} (the model's vocabulary)")
    return _logits(config, params, jnp.asarray(ids, dtype=jnp.int32), stacking.resolve(scan_layers))  # (the model refuses more positions than it has)


def param_count(params: Params) -> int:
    """How many numbers a parameter tree holds (None leaves, e.g. frozen ones, count nothing)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
