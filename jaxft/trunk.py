"""Frozen-trunk caching: run a model's frozen prefix once per example, train only the suffix.

When the trainable parameters leave the embeddings and the first k blocks frozen (trainable
"head", "last-block", "last-N-blocks"; not "all", not LoRA, whose adapters train in every
block) and dropout is off, the hidden state after block k-1 is a fixed function of the
tokens. `trunk_features` computes it once per example; `suffix_apply` runs blocks k.., the
final LayerNorm and the head on it. Both are made of the model's own pieces (`model.embed`,
`run_blocks`, `final_norm`, `head`), so together they are `model.apply` split in two:

    suffix_apply(cfg, params, trunk_features(cfg, params, tokens, k), k) == model.apply(cfg, params, tokens)

(to float rounding: equal within 1e-6, see tests/test_trunk.py). The cache is the residual
stream after block k-1, so with every block frozen the final LayerNorm and the head still run
in the suffix, trainable or not. The attention is causal with no key mask, so position t of
the cache depends only on tokens <= t: a batch may cut the cached rows to its longest text
("batch"/"bucket" padding) exactly as it cuts token rows. For the same reason a pooling that
reads only a text's real tokens (`needed_widths`) needs the cache only up to the text's
length: those rows are computed packed (jaxft.packing), and texts that repeat are computed once.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import packing
from .config import GPTConfig
from .progress import Progress
from . import model, stacking
from .model import Params

TOKENS_PER_CHUNK = 8192  # rows per feature batch: about this many tokens (at least one row)
# Packed rows are all real tokens: small calls keep the activations in cache (gpt2-small on 2
# CPU cores: 4 rows of 120 1,200 tokens/s, 8 rows 1,100, 68 rows 770).
PACKED_TOKENS_PER_CALL = 512


def _subtree(params: Params, names: list[str]) -> Params:
    return {name: params[name] for name in names if name in params}


def prefix_params(config: GPTConfig, params: Params, n_blocks: int) -> Params:
    """The parameters the prefix reads: wte, wpe, h_0..h_{n_blocks-1}."""
    return _subtree(params, ["wte", "wpe"] + [f"h_{i}" for i in range(n_blocks)])


def suffix_params(config: GPTConfig, params: Params, start_block: int) -> Params:
    """The parameters the suffix reads: h_{start_block}.., ln_f, the head (and wte when tied)."""
    names = [f"h_{i}" for i in range(start_block, config.n_layers)] + ["ln_f", "cls_head", "lm_head"]
    if config.num_classes is None and config.tie_embeddings:
        names.append("wte")
    return _subtree(params, names)


def prefix_apply(
    config: GPTConfig,
    params: Params,
    tokens: jax.Array,
    n_blocks: int,
    *,
    dtype: Any = jnp.float32,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
    scan_layers: bool | str = False,
) -> jax.Array:
    """The residual stream after blocks 0..n_blocks-1: fp32 [B, T, D]. For packed rows (see
    jaxft.packing), their `positions` and `segments` [B, T]. `scan_layers`: see model.apply."""
    x = model.embed(config, params, tokens, positions)
    return model.run_blocks(config, params, x, 0, n_blocks, dtype=dtype, segments=segments, scan=stacking.resolve(scan_layers))


def suffix_apply(
    config: GPTConfig,
    params: Params,
    hidden: jax.Array,
    start_block: int,
    *,
    dtype: Any = jnp.float32,
    remat: bool = False,
    pool_index: jax.Array | None = None,
    pool_row: jax.Array | None = None,
    segments: jax.Array | None = None,
    scan_layers: bool | str = False,
) -> jax.Array:
    """fp32 logits [B, T, classes or vocab] from the residual stream `hidden` [B, T, D] after
    block start_block-1 (the embeddings for start_block 0): the rest of `model.apply`. With
    `pool_index` [B], only that position's logits, [B, classes or vocab], as model.apply's.
    Packed rows (jaxft.packing.pack_pooled_batch) add their `segments` [B, T] and `pool_row` [Q]:
    sequence q's logits from position pool_index[q] of row pool_row[q], [Q, classes or vocab]."""
    if not 0 <= start_block <= config.n_layers:
        raise ValueError(f"start_block {start_block} outside 0..{config.n_layers}")
    x = model.run_blocks(config, params, hidden, start_block, dtype=dtype, remat=remat, segments=segments, pool_index=pool_index,
                         pool_row=pool_row, scan=stacking.resolve(scan_layers))
    return model.head(config, params, model.final_norm(config, params, x), dtype)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 7))
def _prefix_jit(config: GPTConfig, params: Params, tokens: jax.Array, n_blocks: int, dtype: Any, positions=None, segments=None,
                scan: bool = False) -> jax.Array:
    return prefix_apply(config, params, tokens, n_blocks, dtype=dtype, positions=positions, segments=segments, scan_layers=scan)


def needed_widths(pooling: str, lengths: np.ndarray) -> np.ndarray | None:
    """How many leading positions of each row a classifier with this pooling ever reads from the
    cache, or None for all of them. Attention is causal, so the pooled position (and, for mean
    pooling, every real one) depends only on positions up to the row's last real token; only
    "last" pooling reads the padding after it."""
    return None if pooling == "last" else np.maximum(np.asarray(lengths, np.int64), 1)


def trunk_features(
    config: GPTConfig,
    params: Params,
    tokens: np.ndarray,
    n_blocks: int,
    *,
    batch_size: int | None = None,
    widths: np.ndarray | None = None,
    dtype: Any = jnp.float32,
    progress: bool | None = None,
    desc: str = "trunk features",
    scan_layers: bool | str = False,
) -> np.ndarray:
    """The frozen prefix's output for every row of `tokens` [N, T]: fp32 NumPy [N, T, D] (see
    `trunk_pass`, which also says how many positions it computed)."""
    return trunk_pass(
        config, params, tokens, n_blocks, batch_size=batch_size, widths=widths, dtype=dtype, progress=progress, desc=desc,
        scan_layers=scan_layers,
    )[0]


def trunk_pass(
    config: GPTConfig,
    params: Params,
    tokens: np.ndarray,
    n_blocks: int,
    *,
    batch_size: int | None = None,
    widths: np.ndarray | None = None,
    dtype: Any = jnp.float32,
    progress: bool | None = None,
    desc: str = "trunk features",
    scan_layers: bool | str = False,
) -> tuple[np.ndarray, int]:
    """(the frozen prefix's output for every row of `tokens` [N, T]: fp32 NumPy [N, T, D] in host
    memory, the positions computed: those of every distinct row, or with `widths` the slots of
    its packed rows). Jitted, in batches of `batch_size` rows (default: about TOKENS_PER_CHUNK tokens);
    the last batch is padded so there is one compilation. With `widths` [N] (see
    `needed_widths`), row i is computed only up to position widths[i] and is zero after it:
    the rows are packed (jaxft.packing) into rows of T, about PACKED_TOKENS_PER_CALL per call.
    A tqdm bar when there are more than a few batches (`progress` forces it on or off).
    `scan_layers` (see model.apply): the prefix's blocks stacked once, run as one scan."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    n, seq = tokens.shape
    if widths is not None and np.shape(widths) != (n,):
        raise ValueError(f"widths must have one entry per row ({n}), got shape {np.shape(widths)}")
    # Texts that occur more than once (the SMS collection repeats 7% of its messages) are
    # computed once: same tokens, same features.
    tokens, rows_of = np.unique(tokens, axis=0, return_inverse=True)
    rows_of = rows_of.reshape(-1)
    if widths is not None:
        widths = _distinct_widths(widths, rows_of, len(tokens))
    scan = stacking.resolve(scan_layers)
    out, positions = _features(config, params, tokens, n_blocks, batch_size, widths, dtype, progress, desc, scan)
    return (out if np.array_equal(rows_of, np.arange(n)) else out[rows_of]), positions  # np.unique sorts the rows


def _distinct_widths(widths: np.ndarray, rows_of: np.ndarray, n_distinct: int) -> np.ndarray:
    """Per distinct row, the widest width any of its copies asks for."""
    distinct = np.zeros(n_distinct, np.int64)
    np.maximum.at(distinct, rows_of, np.asarray(widths, np.int64))
    return distinct


def _features(config, params, tokens, n_blocks, batch_size, widths, dtype, progress, desc, scan) -> tuple[np.ndarray, int]:
    n, seq = tokens.shape
    sub = prefix_params(config, params, n_blocks)
    if scan and n_blocks >= 2:  # stacked once here, not in every call
        sub = stacking.stack(sub, [(0, n_blocks)])
    sub = jax.device_put(sub)
    out = np.zeros((n, seq, config.emb_dim), np.float32)
    if widths is None:
        batch_size = batch_size or max(1, min(n, TOKENS_PER_CHUNK // max(seq, 1)))
        inputs, store = {"tokens": tokens}, functools.partial(_store_rows, out)
    else:
        packed = packing.pack(np.clip(widths, 1, seq), seq)
        batch_size = max(1, min(packed.rows, PACKED_TOKENS_PER_CALL // max(seq, 1)))
        inputs, store = packing.packed_rows(tokens, packed), functools.partial(packing.unpack, packing=packed, out=out)
    total = len(inputs["tokens"])  # rows computed (the last call's filler rows not counted)
    starts = range(0, total, batch_size)
    bar = Progress(len(starts), desc, "rows", print, enabled=bool(progress or (progress is None and len(starts) > 20)))
    pending: tuple[slice, jax.Array] | None = None  # overlap: copy batch b-1 while b runs
    for start in starts:
        rows = slice(start, min(start + batch_size, total))
        chunk = {k: _pad_rows(v[rows], batch_size) for k, v in inputs.items()}
        result = _prefix_jit(config, sub, chunk["tokens"], n_blocks, dtype, chunk.get("positions"), chunk.get("segments"))
        if pending is not None:
            store(np.asarray(pending[1]), rows=pending[0])
            bar.update(pending[0].stop - pending[0].start)
        pending = (rows, result)
    if pending is not None:
        store(np.asarray(pending[1]), rows=pending[0])
        bar.update(pending[0].stop - pending[0].start)
    bar.close()
    return out, total * seq


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [r, ...] with zero rows appended up to `rows` (one compiled shape)."""
    return x if len(x) == rows else np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def _store_rows(out: np.ndarray, result: np.ndarray, rows: slice) -> None:
    out[rows] = result[: rows.stop - rows.start]


# --------------------------------------------------------------------------- when to cache


def frozen_prefix_blocks(config: GPTConfig, mask: Params) -> int:
    """How many leading blocks are entirely frozen, given a trainable mask (see
    `optim.trainable_mask`); 0 when the embeddings train. LoRA adapters train in every block,
    so a LoRA model has no frozen prefix."""

    def frozen(name: str) -> bool:
        return name not in mask or not any(bool(m) for m in jax.tree_util.tree_leaves(mask[name]))

    if not (frozen("wte") and frozen("wpe")):
        return 0
    n = 0
    while n < config.n_layers and frozen(f"h_{n}"):
        n += 1
    return n


@dataclass(frozen=True)
class CachePlan:
    """Whether a run caches its frozen trunk, and why (or why not)."""

    used: bool
    reason: str
    start_block: int  # the suffix starts here (0 when not used)
    bytes: int  # the cache's host memory (estimated before computing it)

    def record(self, seconds: float = 0.0, positions: int = 0) -> dict[str, Any]:
        return {
            "used": self.used, "reason": self.reason, "seconds": seconds, "bytes": self.bytes, "start_block": self.start_block,
            "positions": positions,
        }


def plan(
    config: GPTConfig,
    mask: Params,
    *,
    enabled: bool,
    rows: int,
    seq: int,
    max_bytes: float,
) -> CachePlan:
    """Cache when enabled, dropout is off, some leading blocks are frozen, and `rows` examples of
    `seq` positions fit in `max_bytes` (rows * seq * emb_dim * 4 bytes of fp32)."""
    nbytes = estimate_bytes(config, rows, seq)
    start = frozen_prefix_blocks(config, mask)
    if not enabled:
        return CachePlan(False, "turned off (--trunk-cache off)", 0, 0)
    if config.drop_rate > 0:
        return CachePlan(False, f"dropout {config.drop_rate} makes the frozen prefix's output random", 0, 0)
    if start == 0:
        why = "LoRA adapters train in every block" if config.lora_rank else "the first block (or the embeddings) trains"
        return CachePlan(False, f"no frozen prefix: {why}", 0, 0)
    if nbytes > max_bytes:
        return CachePlan(
            False, f"the cache would take {nbytes / 1e9:.2f} GB, over the {max_bytes / 1e9:g} GB bound (--trunk-cache-max-gb)", 0, 0
        )
    if start == config.n_layers:
        reason = "every block frozen, dropout off: training runs the final norm and the head only"
    else:
        runs = f"block {start}" if start == config.n_layers - 1 else f"blocks {start}..{config.n_layers - 1}"
        reason = f"blocks 0..{start - 1} frozen, dropout off: training runs {runs}, the final norm and the head"
    return CachePlan(True, reason, start, nbytes)


def cache_splits(
    config: GPTConfig,
    params: Params,
    mask: Params,
    tokens: dict[str, np.ndarray],
    *,
    enabled: bool,
    batch_size: int,
    max_bytes: float,
    widths: dict[str, np.ndarray | None] | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool | str = False,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any], int | None]:
    """Plan and build the cache for every split's tokens [N, T]: (features per split or None,
    the record metrics.json keeps, the suffix's start block or None). Without `widths`,
    features are computed in batches of the training batch size: the same shapes as the
    uncached steps, so (with padding to the longest text) the same float rounding, bit for bit
    on CPU. With `widths` (split -> per-row widths, see `needed_widths`), each row only up to
    what the classifier reads, packed: the record's "positions" counts the slots computed.
    `progress`: the pass's progress bar (see `trunk_pass`; False: none). `dtype`: the compute
    dtype of the steps (bfloat16: the prefix computes in bf16 as the uncached step would).
    `scan_layers`: see `trunk_pass`."""
    rows, seq = sum(len(x) for x in tokens.values()), max(x.shape[1] for x in tokens.values())
    chosen = plan(config, mask, enabled=enabled, rows=rows, seq=seq, max_bytes=max_bytes)
    if not chosen.used:
        if enabled:
            log(f"Trunk cache not used: {chosen.reason}")
        return None, chosen.record(), None
    # One pass over every split (texts repeated across splits computed once), split afterwards.
    names, sizes = list(tokens), [len(x) for x in tokens.values()]
    widths = widths or {}
    if any(widths.get(name) is None for name in names):
        all_widths = None
    else:
        all_widths = np.concatenate([widths[name] for name in names])
    all_tokens = np.concatenate([_padded(x, seq) for x in tokens.values()])
    start = time.perf_counter()
    features, positions = trunk_pass(
        config, params, all_tokens, chosen.start_block, batch_size=batch_size, widths=all_widths, dtype=dtype, progress=progress,
        scan_layers=scan_layers,
    )
    bounds = np.cumsum([0] + sizes)
    hidden = {name: features[a:b, : tokens[name].shape[1]] for name, a, b in zip(names, bounds[:-1], bounds[1:])}
    seconds = time.perf_counter() - start
    nbytes = features.nbytes
    log(
        f"Trunk cache: {chosen.reason}; {rows} examples x {seq} positions ({positions / (rows * seq):.0%} of them computed), "
        f"{gigabytes(nbytes)} host memory, {seconds:.1f} s"
    )
    return hidden, {**chosen.record(seconds, positions), "bytes": nbytes}, chosen.start_block


def _padded(tokens: np.ndarray, seq: int) -> np.ndarray:
    """tokens [N, T] widened to [N, seq] with token 0 (a wider split's width; causal attention:
    never read by the narrower split's positions)."""
    return tokens if tokens.shape[1] == seq else np.pad(tokens, ((0, 0), (0, seq - tokens.shape[1])))


def estimate_bytes(config: GPTConfig, rows: int, seq: int) -> int:
    """Host bytes of a cache of `rows` examples of `seq` positions (fp32)."""
    return int(rows) * int(seq) * config.emb_dim * 4


def gigabytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
