"""Fast text generation: a preallocated key/value cache and a compiled decode loop.

One jit-compiled function does everything for a batch of prompts: a single prefill pass
over the (left-padded) prompts, then a `jax.lax.while_loop` that feeds one token per step
through the cache. No Python loop per token, no recompilation per token; repeated calls
recompile only when a shape bucket changes (prompt length and new-token budget are rounded
up to multiples of `BUCKET`, the batch to a power of two, then to multiples of 8).

Batched prompts of different lengths are left-padded; an attention mask hides the padding
and every row gets its own positions (real tokens start at position 0), so a row's output
does not depend on the other rows of the batch (up to float rounding of the batched matmuls).

Sampling: greedy when `temperature == 0`; otherwise the logits are divided by the
temperature, then top-k and top-p (nucleus) filtering apply, and a token is drawn with an
explicit PRNG key. Each row draws from `fold_in(fold_in(key, row_id), step)`, so a prompt's
sample depends on the key, its index in the input list and the prompt alone, not on batching.

Context length: the reference's loop feeds the last `context_length` tokens at every step
(a sliding window). Here the prompt is cut once, up front, to its last
`max_prompt_tokens(config, max_new_tokens)` = `context_length - max_new_tokens` tokens, so
prompt and new tokens always fit in the cache (callers that show text to a user should say
when a prompt is longer; `jaxft generate` does). The output equals the reference's whenever
`len(prompt) + max_new_tokens <= context_length`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from . import sharding
from .progress import Progress
from .config import GPTConfig
from . import model, stacking
from .model import Params

EOS_ID = 50256
PAD_ID = 50256
BUCKET = 32  # prompt length and new-token budget are rounded up to a multiple of this


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _batch_bucket(n: int) -> int:
    """Batch sizes 1, 2, 4, 8, then multiples of 8: few shapes, little waste."""
    return 1 << max(0, n - 1).bit_length() if n <= 8 else _round_up(n, 8)


def _head_matrix(config: GPTConfig, params: Params, dtype: Any, batch: int) -> tuple[jax.Array, str, Any]:
    """The LM head (`model.head_matrix`: which matrix, in which dtype), its einsum spec, its dtype.

    The layout is chosen for XLA's CPU matmuls (measured on gpt2-small, 2 cores): one row
    is a fast matrix-vector product against [d, vocab] (7 ms), but several rows against
    [d, vocab] go through a packing gemm that costs 45-65 ms; against [vocab, d] they
    take 23-30 ms. The transpose happens once per call, outside the decode loop."""
    weight, layout, head_dtype = model.head_matrix(config, params, dtype)
    weight = weight.T if layout == "vd" else weight  # [d, vocab]
    if batch == 1:
        return weight.astype(head_dtype), "bd,dv->bv", head_dtype
    return weight.T.astype(head_dtype), "bd,vd->bv", head_dtype


def _filter_logits(logits: jax.Array, top_k: int | None, top_p: jax.Array | None) -> jax.Array:
    """Set logits outside the top-k / nucleus to -inf. logits: [B, V] (already tempered)."""
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)  # the reference's rule: ties with the k-th stay
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _select(
    logits: jax.Array,
    keys: jax.Array,
    step: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    sample: bool,
    top_k: int | None,
    use_top_p: bool,
) -> jax.Array:
    """The next token per row. keys: one PRNG key per row."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits / temperature, top_k, top_p if use_top_p else None)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


LayerCaches = Any  # per layer (k, v), each [B, S, heads, head_dim]; scanned: one (k, v) pair [layers, B, S, heads, head_dim]


def _forward(
    config: GPTConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    caches: LayerCaches,
    index: jax.Array | int,
    dtype: Any,
) -> tuple[jax.Array, LayerCaches]:
    """The model's pieces (`model.embed`, `cached_blocks`, `final_norm`) on the cache. Returns
    (final-norm hidden states of the last position [B, d], new caches)."""
    seq = tokens.shape[1]
    x = model.embed(config, params, tokens, positions)
    stacked = stacking.stacked_runs(params)
    num_keys = (caches[0] if stacked else caches[0][0]).shape[-3]
    causal = (index + jnp.arange(seq))[:, None] >= jnp.arange(num_keys)[None, :]
    mask = causal[None, None] & key_valid[:, None, None, :]
    x, new_caches = model.cached_blocks(config, params, x, mask, caches, index, dtype)
    return model.final_norm(config, params, x[:, -1]), new_caches


@functools.partial(
    jax.jit, static_argnames=("config", "budget", "sample", "top_k", "use_top_p", "dtype", "scan")
)
def _generate_padded(
    config: GPTConfig,
    params: Params,
    tokens: jax.Array,  # int32 [B, P], left-padded
    pad_lens: jax.Array,  # int32 [B], number of left pads per row
    active: jax.Array,  # bool [B], False for rows that only fill the batch bucket
    row_keys: jax.Array,  # [B] PRNG keys
    max_new: jax.Array,  # int32 scalar, <= budget
    temperature: jax.Array,
    top_p: jax.Array,
    eos_id: jax.Array,  # int32 scalar, -1 for no eos stop
    pad_id: jax.Array,
    *,
    budget: int,
    sample: bool,
    top_k: int | None,
    use_top_p: bool,
    dtype: Any,
    scan: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Generate up to `max_new` tokens per row. Returns (tokens [B, budget], lengths [B])."""
    batch, prompt_slots = tokens.shape
    total_slots = prompt_slots + budget
    slots = jnp.arange(total_slots)
    key_valid = slots[None, :] >= pad_lens[:, None]  # [B, S]: hide the left padding
    last_position = config.context_length - 1
    head, head_spec, head_dtype = _head_matrix(config, params, dtype, batch)
    if scan and config.n_layers >= 2:  # every block in one scan (stacked once per call, outside the decode loop)
        params = stacking.stack(params, [(0, config.n_layers)])

    def forward(step_tokens, positions, caches, index):
        # Padding may use an id outside a small test vocabulary; masked slots can hold any
        # valid id, but an out-of-range lookup would put NaN into the (masked) values.
        step_tokens = jnp.where((step_tokens >= 0) & (step_tokens < config.vocab_size), step_tokens, 0)
        positions = jnp.minimum(positions, last_position)
        hidden, caches = _forward(config, params, step_tokens, positions, key_valid, caches, index, dtype)
        return jnp.einsum(head_spec, hidden.astype(head_dtype), head).astype(jnp.float32), caches

    select = functools.partial(_select, sample=sample, top_k=top_k, use_top_p=use_top_p)

    def record(step, logits, out, lengths, done):
        """Pick the token of `step`; rows that stop (eos) or stopped emit pad."""
        token = select(logits, row_keys, step, temperature, top_p)
        done = done | (token == eos_id)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        return token, out, lengths, done

    # Prefill: every prompt slot in one pass; positions count from each row's first real token.
    prompt_positions = jnp.maximum(slots[None, :prompt_slots] - pad_lens[:, None], 0)
    shape = (batch, total_slots, config.n_heads, config.head_dim)
    if stacking.stacked_runs(params):
        caches = (jnp.zeros((config.n_layers, *shape), dtype), jnp.zeros((config.n_layers, *shape), dtype))
    else:
        caches = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))
    logits, caches = forward(tokens, prompt_positions, caches, 0)
    out = jnp.full((batch, budget), pad_id, jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    token, out, lengths, done = record(0, logits, out, lengths, ~active)

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, token, caches, out, lengths, done = carry
        # The previous token goes to slot prompt_slots + step - 1.
        positions = (prompt_slots - pad_lens + step - 1)[:, None]
        logits, caches = forward(token[:, None], positions, caches, prompt_slots + step - 1)
        token, out, lengths, done = record(step, logits, out, lengths, done)
        return step + 1, token, caches, out, lengths, done

    carry = (jnp.int32(1), token, caches, out, lengths, done)
    _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths


def max_prompt_tokens(config: GPTConfig, max_new_tokens: int) -> int:
    """How many tokens of a prompt `generate` keeps (its last ones): the context length less
    the new-token budget. ValueError when `max_new_tokens` leaves no room for a prompt."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens >= config.context_length:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) must be smaller than the context length ({config.context_length})"
        )
    return config.context_length - int(max_new_tokens)


def _check_prompts(config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    if config.num_classes is not None:
        raise ValueError("generation needs a language-model config (this one has a classification head)")
    max_prompt_tokens(config, max_new_tokens)
    checked = []
    for i, prompt in enumerate(prompts):
        if np.ndim(prompt) == 0:
            raise ValueError(f"prompt {i} is one token id, not a list of them: pass prompts as [[ids of prompt 0], ...]")
        ids = [int(t) for t in np.asarray(prompt, dtype=np.int64).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        checked.append(ids)
    return checked


def generate(
    config: GPTConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = EOS_ID,
    key: jax.Array | None = None,
    pad_id: int = PAD_ID,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    scan_layers: bool | str = False,
    _row_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (eos excluded), all prompts in one batch.

    prompts: token-id lists of any lengths. Greedy when `temperature == 0`; otherwise
    temperature / top-k / top-p sampling with the PRNG `key` (required). Each row stops at
    `eos_id` (None: never) or after `max_new_tokens`. Prompts longer than
    `max_prompt_tokens(config, max_new_tokens)` keep only their last tokens (see the module
    docstring). With a device `mesh`, the prompts are split by rows over its devices (the
    batch is padded to a multiple of their number) and the parameters sharded by
    jaxft.sharding's rules: the compiled loop runs on every device. `scan_layers` (see
    jaxft.stacking.resolve; auto: off, see there): the blocks as one scan, compiled once.
    """
    prompts = list(prompts)  # (any iterable)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((params, prompts[:1], key, temperature))):
        raise ValueError("generate is a host function (prompts in, Python lists out): call it outside jax.jit / jax.vmap")
    prompts = _check_prompts(config, prompts, max_new_tokens)
    if not prompts:
        return []
    temperature, top_p = float(temperature), None if top_p is None else float(top_p)  # a jax scalar too
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN is neither > 0 nor < 0: it acted greedy
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    sample = temperature > 0
    if sample and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: pass key=jax.random.key(seed)")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    keep = max_prompt_tokens(config, max_new_tokens)
    prompts = [p[-keep:] for p in prompts]
    longest = max(len(p) for p in prompts)
    prompt_slots = _round_up(longest, BUCKET)
    budget = _round_up(max_new_tokens, BUCKET)
    batch = _batch_bucket(len(prompts))
    if mesh is not None:
        batch = _round_up(batch, mesh.shape["data"] * mesh.shape["fsdp"])

    tokens = np.full((batch, prompt_slots), pad_id, np.int32)
    pad_lens = np.full((batch,), prompt_slots - 1, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, prompt_slots - len(ids) :] = ids
        pad_lens[row] = prompt_slots - len(ids)
    active = np.arange(batch) < len(prompts)

    row_ids = np.arange(batch) if _row_ids is None else np.concatenate(
        [np.asarray(_row_ids, np.int64), np.arange(len(prompts), batch)]
    )
    base_key = jax.random.key(0) if key is None else key
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.asarray(row_ids, jnp.uint32))

    rows = (lambda x: jax.device_put(x, sharding.batch_sharding(mesh))) if mesh is not None else jnp.asarray
    if mesh is not None:
        params = sharding.shard_tree(params, mesh)  # a no-op copy when already placed so
    out, lengths = _generate_padded(
        config,
        params,
        rows(tokens),
        rows(pad_lens),
        rows(active),
        rows(row_keys),
        jnp.int32(max_new_tokens),
        jnp.float32(temperature if sample else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        budget=budget,
        sample=sample,
        top_k=top_k if sample else None,
        use_top_p=sample and top_p is not None,
        dtype=dtype,
        scan=stacking.resolve(scan_layers, generation=True),
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[row, : lengths[row]].tolist() for row in range(len(prompts))]


def generate_batched(
    config: GPTConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: bool = True,
    **kwargs: Any,
) -> list[list[int]]:
    """`generate` over many prompts, `batch_size` at a time, results in the input order.

    Prompts are sorted by length so each batch holds similar lengths (little padding);
    sampling gives the same tokens as one `generate` call over the whole list.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    starts = range(0, len(order), batch_size)
    bar = Progress(len(starts), "generating", "prompts", print, enabled=progress)
    for start in starts:
        rows = order[start : start + batch_size]
        outputs = generate(config, params, [prompts[i] for i in rows], _row_ids=rows, **kwargs)
        for i, new_ids in zip(rows, outputs):
            results[i] = new_ids
        bar.update(len(rows))
    bar.close()
    return results


def greedy(config: GPTConfig, params: Params, token_ids: Any, max_new_tokens: int) -> np.ndarray:
    """The reference's `generate_text_simple`: prompt ids [seq] or [batch, seq] followed by
    `max_new_tokens` greedy tokens (no eos stop), as an int array of the same rank."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim not in (1, 2):
        raise ValueError(f"token_ids must be [seq] or [batch, seq], got shape {ids.shape}")
    rows = ids.reshape(-1, ids.shape[-1])
    new = generate(config, params, rows.tolist(), max_new_tokens=max_new_tokens, eos_id=None)
    full = np.concatenate([rows, np.asarray(new, dtype=np.int64).reshape(len(rows), -1)], axis=1)
    return full if ids.ndim == 2 else full[0]


def generate_text(
    config: GPTConfig,
    params: Params,
    tokenizer: Any,
    text: str,
    *,
    max_new_tokens: int = 256,
    **kwargs: Any,
) -> str:
    """The prompt `text` followed by its generated continuation (the reference's
    `token_ids_to_text(generate(...))`); pass the result to `extract_response`."""
    prompt = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    new = generate(config, params, [prompt], max_new_tokens=max_new_tokens, **kwargs)[0]
    return tokenizer.decode(prompt + new)


def compilations() -> int:
    """How many shape/option variants of the generation function are compiled so far."""
    return _generate_padded._cache_size()
