"""Stacked blocks: an internal layout of the parameter tree for `jax.lax.scan` over layers.

The public layout names every block (`h_0`, `h_1`, ..., as OpenAI's checkpoint does). A run of
blocks h_a..h_b (a < b) may instead be held as one subtree `h_a-b` whose leaves are the blocks'
leaves stacked along a new leading axis (layer a at index 0): the model then runs the run as one
scanned block, compiled once whatever its length (`--scan-layers`). `stack` and `unstack` are
exact inverses (bitwise: stacking is copying); `unstack` of a tree without stacked runs returns it.

The training state is stacked once when it is built (`steps.init_state(..., scan_layers=True)`),
so a step never copies the blocks into a stacked buffer; `TrainState.params` unstacks, so what
leaves a run (model directory, exports, evaluation's parameters) has the public names.
Checkpoints (the state's arrays) keep the stacked layout: resuming needs the same --scan-layers
(a changed setting refuses the resume in one line, as any other setting does).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
SCAN_LAYERS = ("auto", "on", "off")
_RUN = re.compile(r"^h_(\d+)-(\d+)$")


def run_name(start: int, stop: int) -> str:
    """The key of stacked blocks h_start..h_{stop-1}."""
    return f"h_{start}-{stop - 1}"


def parse_run(name: Any) -> tuple[int, int] | None:
    """(start, stop) of a stacked run's key, None for any other key."""
    match = _RUN.match(name) if isinstance(name, str) else None
    return (int(match[1]), int(match[2]) + 1) if match else None


def stacked_runs(params: Params) -> list[tuple[int, int]]:
    """The stacked runs of a tree, in order."""
    return sorted(run for run in map(parse_run, params) if run is not None)


def resolve(scan_layers: bool | str | None, backend: str | None = None, generation: bool = False) -> bool:
    """Whether to scan: "on"/"off"/a bool as given; "auto" (and None) per backend and program.

    auto scans training and evaluation programs on a CPU only: on 2 CPU cores the scanned
    gpt2 train steps compiled several times faster at the same step time (BENCHMARKS.md,
    "Scanned blocks"). On GPUs a scanned step can cost step time (XLA fuses across unrolled
    layers, and the scan slices each layer's weights out of the stack), and no GPU measurement
    of ours says otherwise yet, so auto keeps them unrolled there. Generation (`generation`)
    stays unrolled under auto everywhere: the scanned decode loop reads and writes each layer's
    slice of the stacked key/value cache, copies the unrolled loop's in-place buffers avoid."""
    if isinstance(scan_layers, bool):
        return scan_layers
    if scan_layers in (None, "auto"):
        return not generation and (backend or jax.default_backend()) == "cpu"
    if scan_layers not in SCAN_LAYERS:
        raise ValueError(f"unknown scan_layers {scan_layers!r}; choose one of: {', '.join(SCAN_LAYERS)}")
    return scan_layers == "on"


def n_blocks(params: Params) -> int:
    """How many blocks a tree holds (per-layer and stacked)."""
    return sum(1 for key in layer_names(params) if key.startswith("h_") and key[2:].isdigit())


def block_runs(n_layers: int, mask: Params | None = None) -> list[tuple[int, int]]:
    """The runs a state stacks: maximal ranges of at least two consecutive blocks whose masks
    (trainable leaves) are equal, so each stacked leaf is wholly trainable or wholly frozen.
    The last block stays its own: a classifier's pooled last block runs apart (one query per
    row), and slicing it off a stacked run would copy the run in every step."""
    runs, start = [], 0
    for i in range(1, n_layers):
        same = mask is None or _equal(mask[f"h_{i}"], mask[f"h_{start}"])
        if not same or i == n_layers - 1:
            if i - start >= 2:
                runs.append((start, i))
            start = i
    return runs


def _equal(a: Any, b: Any) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(bool(x) == bool(y) for x, y in zip(la, lb))


def stack(params: Params, runs: list[tuple[int, int]]) -> Params:
    """`params` with the blocks of each run replaced by one stacked subtree (None leaves, the
    other half of a trainable/frozen split, stay None; bool leaves of a mask stay one bool)."""
    out = dict(params)
    for start, stop in runs:
        layers = [out.pop(f"h_{i}") for i in range(start, stop)]
        out[run_name(start, stop)] = jax.tree_util.tree_map(_stack_leaves, *layers, is_leaf=lambda x: x is None)
    return out


def _stack_leaves(*leaves: Any) -> Any:
    if leaves[0] is None or isinstance(leaves[0], (bool, np.bool_)):
        return leaves[0]
    return jnp.stack(leaves)


def unstack(params: Params) -> Params:
    """The public layout (h_0, h_1, ...) of a tree with stacked runs: `stack`'s exact inverse."""
    runs = stacked_runs(params)
    if not runs:
        return params
    out = {key: value for key, value in params.items() if parse_run(key) is None}
    for start, stop in runs:
        group = params[run_name(start, stop)]
        for i in range(start, stop):
            out[f"h_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x if x is None or isinstance(x, (bool, np.bool_)) else x[i - start], group)
    return dict(sorted(out.items()))  # the key order of a tree out of jax (jit sorts dict keys)


@jax.jit
def unstack_jit(params: Params) -> Params:
    """`unstack` as one compiled call (no per-leaf dispatch; a copy of the stacked runs)."""
    return unstack(params)


def layer_names(params: Params) -> dict[str, None]:
    """The top-level names of the public layout (for checks that read names only)."""
    names = {key: None for key in params if parse_run(key) is None}
    for start, stop in stacked_runs(params):
        names.update({f"h_{i}": None for i in range(start, stop)})
    return names


def is_stacked_path(path: tuple[Any, ...]) -> bool:
    """Whether a leaf's key path (jax.tree_util) lies inside a stacked run: its axis 0 is layers."""
    return any(parse_run(getattr(key, "key", None)) is not None for key in path)

