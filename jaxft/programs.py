"""Compiled programs: how many a run compiled or loaded from the persistent compilation cache and
the time that took (from `jax.monitoring` events), and ahead-of-time compilation on worker threads.

`compile_stats()` counts since the process began, over every thread: a run takes the difference
of two snapshots (`CompileStats.since`). `Precompiled` wraps a jitted step: `submit` compiles it
for the given arguments' shapes on a worker thread (`jit(...).lower(...).compile()`) while the
caller goes on (the initial evaluation, a checkpoint); a call with those shapes waits for that
executable (saying so when it has to wait), any other shape goes to the jitted function.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

# Every compilation runs these three stages; a persistent-cache hit ends the last one early.
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # one per executable: compiled or loaded
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclass(frozen=True)
class CompileStats:
    """`executables`: compiled by XLA or loaded from the persistent cache (`cache_hits`);
    `seconds`: tracing, lowering and compiling (or loading), summed over threads."""

    executables: int = 0
    cache_hits: int = 0
    seconds: float = 0.0

    @property
    def compiles(self) -> int:
        """Executables XLA compiled (not loaded from the cache)."""
        return max(self.executables - self.cache_hits, 0)

    def since(self, earlier: CompileStats) -> CompileStats:
        return CompileStats(self.executables - earlier.executables, self.cache_hits - earlier.cache_hits, self.seconds - earlier.seconds)


_lock = threading.Lock()
_totals = {"executables": 0, "cache_hits": 0, "seconds": 0.0}


def _on_event(event: str, **kwargs: Any) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _totals["cache_hits"] += 1


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    if event in (_TRACE, _LOWER, _BACKEND):
        with _lock:
            _totals["seconds"] += duration
            _totals["executables"] += event == _BACKEND


jax.monitoring.register_event_listener(_on_event)  # once, at import: JAX keeps listeners for the process
jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_stats() -> CompileStats:
    """What this process compiled so far (every thread)."""
    with _lock:
        return CompileStats(**_totals)


def _leaf_signature(x: Any) -> tuple:
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.weak_type, x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        return (x.shape, x.dtype, x.weak_type, x.sharding)
    x = np.asarray(x)
    return (x.shape, x.dtype, False, None)


def signature(args: tuple) -> tuple:
    """What an executable is specific to: the arguments' tree, shapes, dtypes, weak types, shardings."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (tree, tuple(_leaf_signature(x) for x in leaves))


def abstract(tree: Any) -> Any:
    """`tree` as ShapeDtypeStructs (what lowering needs: no data, the same signature)."""

    def one(x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree_util.tree_map(one, tree)


class Precompiled:
    """A jitted function (`fn`) with executables compiled ahead of time for some signatures."""

    def __init__(self, fn: Callable, name: str, log: Callable[[str], None] = print) -> None:
        self.fn, self.name, self.log = fn, name, log
        self._futures: dict[tuple, Future] = {}
        self._ready: dict[tuple, Any] = {}

    def submit(self, pool: ThreadPoolExecutor, *args: Any) -> Future | None:
        """Compile for `args`' signature on `pool` (arrays or ShapeDtypeStructs; none is read). A
        function that cannot be lowered (not jitted, e.g. a wrapper) compiles as it runs: None."""
        if not hasattr(self.fn, "lower"):
            return None
        specs = abstract(args)
        key = signature(specs)
        if key not in self._futures:
            self._futures[key] = pool.submit(lambda: self.fn.lower(*specs).compile())
        return self._futures[key]

    def _executable(self, key: tuple) -> Any:
        if key in self._ready:
            return self._ready[key]
        future = self._futures.get(key)
        if future is None or future.cancelled():  # (cancelled: the pool was shut down before it began)
            return None
        if not future.done():
            start = time.perf_counter()
            self.log(f"waiting for the {self.name}'s compilation ...")
            executable = future.result()
            self.log(f"{self.name} compiled (waited {time.perf_counter() - start:.1f} s)")
        else:
            executable = future.result()  # an exception in the worker is raised here, at first use
        self._ready[key] = executable
        return executable

    def __call__(self, *args: Any) -> Any:
        executable = self._executable(signature(args)) if self._futures else None
        return self.fn(*args) if executable is None else executable(*args)

    def _cache_size(self) -> int:
        """Programs compiled for this step: ahead of time, and by the jitted function for other shapes."""
        ahead = sum(not future.cancelled() for future in self._futures.values())
        return ahead + self.fn._cache_size()


def worker_pool() -> ThreadPoolExecutor:
    """Threads for ahead-of-time compilation (XLA compiles one program per thread: two overlap
    the train and eval programs)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxft-compile")


def precompile_steps(pool: ThreadPoolExecutor, train_step: Callable, eval_step: Callable, state: Any, train_batches: Sequence[Any],
                     eval_batches: Sequence[Any], place: Callable = lambda batch: batch, log: Callable[[str], None] = print) -> tuple[Precompiled, Precompiled]:
    """jaxft.steps' train_step(state, batch) and eval_step(params, batch) as `Precompiled`, compiling
    on `pool` for the shapes of these training batches (train and eval: periodic evaluations read
    training batches) and evaluation batches (eval); any other shape compiles when first used.
    The first evaluation and the first training batch's programs are queued first: they are
    needed first. `place`: a host batch as the steps take it (on a mesh, sharded)."""
    train, evaluate = Precompiled(train_step, "train step", log), Precompiled(eval_step, "eval step", log)
    params = state.params
    for batch in [*eval_batches[:1], *train_batches[:1], *eval_batches[1:], *train_batches[1:]]:
        if any(batch is b for b in train_batches):
            train.submit(pool, state, place(batch))
        evaluate.submit(pool, params, place(batch))
    return train, evaluate
