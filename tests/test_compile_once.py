"""Compile once, compile little: hyperparameters are data of the compiled programs (a rerun with
other values loads every program from the persistent cache), the steps compile ahead of time on
worker threads, and metrics.json's `timing` says where the time went."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optim, programs, steps
from jaxft.config import GPTConfig
from jaxft.model import init_params
from jaxft.timing import KEYS
from test_classify import _tiny_hparams, _write_csvs

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=1, n_heads=2, num_classes=2)


def _batch() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    return {"tokens": rs.randint(0, 64, (2, 8)).astype(np.int32), "labels": np.array([0, 1], np.int32),
            "lengths": np.array([8, 5], np.int32), "weights": np.ones(2, np.float32)}


def _lowered_train_step(optimizer: optax.GradientTransformation) -> str:
    params = init_params(TINY, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(TINY, params, "all")
    train_step, _ = steps.make_steps(TINY, optimizer, "classification")
    return train_step.lower(steps.init_state(params, mask, optimizer), _batch()).as_text()


def test_other_hyperparameters_lower_to_the_same_program():
    assert _lowered_train_step(optim.adamw(5e-5, 0.1)) == _lowered_train_step(optim.adamw(1e-3, 0.0))
    # accumulation's epoch length and last step (--max-steps) are state too
    a = optim.adamw(5e-5, 0.1, accumulation_steps=2, steps_per_epoch=5, last_step=None)
    b = optim.adamw(2e-4, 0.3, accumulation_steps=2, steps_per_epoch=7, last_step=9)
    assert _lowered_train_step(a) == _lowered_train_step(b)


def test_adamw_is_bitwise_optax_adamw_with_constants():
    """The injected hyperparameters change no bit of the arithmetic (clipping included)."""
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 8)), "b": jnp.zeros(8) - 0.0}
    grads = [jax.tree_util.tree_map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.3, params) for i in range(6)]
    for clip in (None, 0.5):
        ours = optim.adamw(3e-3, 0.1, grad_clip_norm=clip)
        constant = optax.adamw(3e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
        constant = constant if clip is None else optax.chain(optax.clip_by_global_norm(clip), constant)
        results = []
        for opt in (ours, constant):
            step = jax.jit(lambda p, s, g, opt=opt: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
            p, s = params, opt.init(params)
            for g in grads:
                p, s = step(p, s, g)
            results.append(p)
        for x, y in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        assert not np.array_equal(results[0]["w"], params["w"])  # it did train


# --------------------------------------------------------------------------- ahead of time


class _Program:
    """A stand-in for a jitted function: `lower(...).compile()` runs `compile`."""

    def __init__(self, compile):
        self.compile_fn, self.calls = compile, []

    def lower(self, *args):
        return self

    def compile(self):
        return self.compile_fn()

    def __call__(self, *args):
        self.calls.append(args)
        return "jit"

    def _cache_size(self):
        return len(self.calls)


def test_a_step_waits_for_its_compilation_and_says_so():
    released, lines = threading.Event(), []

    def compile():
        released.wait(60)  # held until the caller has logged that it waits
        return lambda *args: "ahead of time"

    def log(line):
        lines.append(line)
        released.set()

    step = programs.Precompiled(_Program(compile), "train step", log)
    with programs.worker_pool() as pool:
        step.submit(pool, np.zeros(3, np.float32))
        assert step(np.zeros(3, np.float32)) == "ahead of time"
    assert lines[0] == "waiting for the train step's compilation ..." and lines[1].startswith("train step compiled")
    assert step(np.zeros(4, np.float32)) == "jit"  # another shape: the jitted function
    assert step._cache_size() == 2


def test_a_failed_compilation_raises_at_first_use():
    def compile():
        raise ValueError("no such program")

    step = programs.Precompiled(_Program(compile), "eval step", lambda line: None)
    with programs.worker_pool() as pool:
        step.submit(pool, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="no such program"):
        step(np.zeros(2, np.int32))


def test_signature_tells_shapes_dtypes_and_trees_apart():
    a = programs.signature(({"x": np.zeros((2, 3), np.float32)},))
    assert a == programs.signature(({"x": jax.ShapeDtypeStruct((2, 3), np.float32)},))
    assert a != programs.signature(({"x": np.zeros((2, 4), np.float32)},))
    assert a != programs.signature(({"x": np.zeros((2, 3), np.int32)},))
    assert a != programs.signature(({"y": np.zeros((2, 3), np.float32)},))


# --------------------------------------------------------------------------- whole runs


def _classifier(tmp_path, out, cache, *flags):
    csvs = _write_csvs(tmp_path)
    return [
        "finetune-classifier", "--train", str(csvs["train"]), "--validation", str(csvs["validation"]), "--test", str(csvs["test"]),
        "--model", str(_tiny_hparams(tmp_path)), "--init", "random", "--epochs", "1", "--batch-size", "4", "--eval-freq", "5",
        "--out", str(out), "--compile-cache", str(cache), *flags,
    ]


def _instruct(tmp_path, out, cache, *flags):
    entries = [{"instruction": f"Say {word} twice.", "input": "" if i % 2 else word, "output": f"{word} {word}"}
               for i, word in enumerate(["red", "blue", "green", "black", "white", "pink", "grey", "gold", "teal", "navy"] * 2)]
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(entries))
    return [
        "finetune-instruct", "--data", str(data), "--model", str(_tiny_hparams(tmp_path, ctx=128)), "--init", "random",
        "--epochs", "1", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4",
        "--out", str(out), "--compile-cache", str(cache), *flags,
    ]


def _jaxft(argv) -> dict:
    result = subprocess.run([sys.executable, "-m", "jaxft", *argv], capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("command", [_classifier, _instruct], ids=["finetune-classifier", "finetune-instruct"])
def test_a_rerun_with_other_hyperparameters_compiles_nothing(command, tmp_path):
    cache = tmp_path / "cache"
    first = _jaxft(command(tmp_path, tmp_path / "a", cache, "--max-steps", "4"))["timing"]
    assert first["compiles"] >= 2  # a cold cache
    other = ("--lr", "2e-4", "--seed", "7", "--weight-decay", "0.05", "--epochs", "2", "--max-steps", "6")
    second = _jaxft(command(tmp_path, tmp_path / "b", cache, *other))["timing"]
    assert second["compiles"] == 0, second
    assert second["compile_cache_hits"] >= 2  # the steps (at least) came from the cache


def test_timing_says_where_the_time_went(tmp_path):
    metrics = _jaxft(_classifier(tmp_path, tmp_path / "a", "off"))
    timing = metrics["timing"]
    assert list(timing) == list(KEYS)
    for key, value in timing.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, key
    assert isinstance(timing["compiles"], int) and timing["compiles"] >= 2 and timing["compile_cache_hits"] == 0
    assert timing["compile_s"] > 0 and timing["model_s"] > 0 and timing["data_s"] > 0
    assert timing["startup_s"] <= timing["first_step_s"] <= timing["total_s"]
    assert timing["total_s"] >= timing["train_s"] + timing["outputs_s"]
    assert timing["train_s"] >= metrics["train_seconds"] * 0.99
    # the steps compiled once each: ahead of time, for the shapes they meet
    assert metrics["train_step_compilations"] == 1 and metrics["eval_step_compilations"] == 1
