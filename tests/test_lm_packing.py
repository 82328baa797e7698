"""Packed instruction batches (`finetune-instruct --pack`, `packing.pack_lm_batch`): each step's
examples in as few rows as fit, each with its own positions and attention, give the loss, the
gradients and the training of the unpacked batches, and count the reference's tokens seen."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from jaxft import optim, packing, steps
from jaxft.config import GPTConfig
from jaxft.data import instruct
from jaxft.losses import IGNORE_INDEX
from jaxft.model import init_params

SMALL = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4, tie_embeddings=False)
PAD = 96


def _examples(seed: int, n: int = 8) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, PAD, int(k)).tolist() for k in rng.integers(3, 30, n)]


def _collated(seed: int, mask_prompt: bool = False):
    items = _examples(seed)
    prompts = [len(x) // 2 for x in items] if mask_prompt else None
    inputs, targets = instruct.collate(items, PAD, IGNORE_INDEX, mask_prompt_lengths=prompts, dtype=np.int32)
    return items, inputs, targets


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_each_example_keeps_its_columns_positions_and_targets(mask_prompt):
    items, inputs, targets = _collated(0, mask_prompt)
    lengths = packing.lm_lengths(targets, IGNORE_INDEX)
    assert lengths.tolist() == [len(x) for x in items]  # the eos target is each example's last
    natural = packing.pack(lengths, 40).rows
    multiple = natural + 1  # a row count the packing does not fill by itself: one row of padding
    batch = packing.pack_lm_batch(inputs, targets, 40, row_multiple=multiple, pad_id=PAD, ignore_index=IGNORE_INDEX)
    rows = batch["inputs"].shape[0]
    assert rows == multiple and natural < len(items) and batch["inputs"].shape[1] == 40
    assert (batch["segments"][natural:] == 0).all()  # the added row is all padding (checked below)
    found = []
    for r in range(rows):
        for s in range(1, batch["segments"][r].max() + 1):
            cols = np.flatnonzero(batch["segments"][r] == s)
            assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
            assert np.array_equal(batch["positions"][r, cols], np.arange(len(cols)))
            found.append((batch["inputs"][r, cols].tolist(), batch["targets"][r, cols].tolist()))
    expected = [(inputs[i, :n].tolist(), targets[i, :n].tolist()) for i, n in enumerate(lengths)]
    assert sorted(found) == sorted(expected)
    empty = batch["segments"] == 0
    assert (batch["targets"][empty] == IGNORE_INDEX).all() and (batch["inputs"][empty] == PAD).all()
    # every target of the collated batch is in the packed one: the masked mean is over the same terms
    assert (batch["targets"] != IGNORE_INDEX).sum() == (targets != IGNORE_INDEX).sum()
    assert packing.reference_numel(batch["segments"]) == inputs.size == int(np.prod(instruct.tight_shape(targets)))


def test_the_row_width_packs_the_batches_into_the_fewest_slots():
    batches = [np.array([10, 10, 10, 7]), np.array([12, 3, 3])]
    width = packing.choose_row_width(batches, 4)
    assert width % 4 == 0 and 12 <= width <= 24
    slots = lambda w: sum(packing.pack(b, w).rows for b in batches) * w
    assert all(slots(width) <= slots(w) for w in range(12, 25, 4))
    assert slots(width) < slots(12)


def test_packed_loss_gradients_and_training_equal_the_unpacked_ones():
    params = init_params(SMALL, jax.random.key(0))
    plain, packed = [], []
    for seed in range(3):
        _, inputs, targets = _collated(seed + 1, mask_prompt=seed == 1)
        plain.append({"inputs": inputs, "targets": targets})
        packed.append(packing.pack_lm_batch(inputs, targets, 48, pad_id=PAD, ignore_index=IGNORE_INDEX))
    assert packed[0]["inputs"].size < plain[0]["inputs"].size

    loss = lambda p, b: steps.lm_metrics(SMALL, p, b)[0]
    (l_plain, g_plain), (l_packed, g_packed) = (jax.value_and_grad(loss)(params, b) for b in (plain[0], packed[0]))
    np.testing.assert_allclose(l_packed, l_plain, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(np.abs(b).max()) + 1e-9, rtol=0)

    opt = optim.adamw(1e-3, 0.1)
    losses = {}
    for name, batches in (("plain", plain), ("packed", packed)):
        state = steps.init_state(params, optim.trainable_mask(SMALL, params, "all"), opt)
        train_step, eval_step = steps.make_steps(SMALL, opt, "lm")
        losses[name] = []
        for batch in batches:
            state, metrics = train_step(state, batch)
            losses[name].append(float(metrics["loss"]))
        losses[name].append(float(eval_step(state.params, batches[0])["loss"]))
    np.testing.assert_allclose(losses["packed"], losses["plain"], atol=1e-6, rtol=0)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from jaxft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_finetune_instruct_pack_trains_as_the_unpacked_run(shared_data, tmp_path):
    """Both commands on the real data (a tiny random model, 6 steps): the same losses at every
    step and evaluation, the same tokens seen, fewer positions per batch. So does a third run
    whose loss pads the head's vocabulary (--head-vocab-multiple 64: 50,257 -> 50,304 columns)."""
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2}))
    common = ["finetune-instruct", "--data", str(shared_data / "instruction-data.json"), "--model", str(tmp_path / "hparams.json"),
              "--init", "random", "--epochs", "1", "--max-steps", "6", "--eval-freq", "3", "--eval-iter", "2", "--lr", "1e-3",
              "--no-responses", "--bucket-multiple", "8", "--limit", "200"]
    metrics = {}
    for name, extra in (("plain", []), ("packed", ["--pack"]), ("padded-head", ["--head-vocab-multiple", "64"])):
        code, _, err = _cli([*common, *extra, "--out", str(tmp_path / name)])
        assert code == 0, err
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    plain, packed, padded = metrics["plain"], metrics["packed"], metrics["padded-head"]
    for other in (packed, padded):
        for key in ("train_step_losses", "eval_train_losses", "eval_validation_losses"):
            np.testing.assert_allclose(other[key], plain[key], atol=2e-6, rtol=0)
        for key in ("validation_loss", "test_loss"):
            np.testing.assert_allclose(other[key], plain[key], atol=2e-6, rtol=0)
        assert other["tokens_seen"] == plain["tokens_seen"]
    assert padded["recipe"]["head_vocab_multiple"] == 64 and plain["recipe"]["head_vocab_multiple"] is None
    slots = lambda m: sum(r * w for r, w in m["train_batch_shapes"])
    assert packed["recipe"]["pack"] is True and slots(packed) < slots(plain)
