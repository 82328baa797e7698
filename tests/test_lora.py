"""LoRA as a configuration: exact start, merge equals the adapted model, only adapters (+ head) train."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxft
from jaxft import optim, train
from jaxft.config import GPTConfig
from jaxft.lora import add_lora, merge_lora
from jaxft.model import init_params
from jaxft.recipes.classify import with_classifier_head
from jaxft.weights.common import flatten

CFG = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
TOKENS = np.arange(24).reshape(2, 12) % 64


def test_adapters_start_as_the_base_model_and_merge_exactly():
    params = init_params(CFG, jax.random.PRNGKey(0))
    lcfg, lparams = add_lora(CFG, params, rank=4, alpha=8.0, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(jaxft.logits(lcfg, lparams, TOKENS), jaxft.logits(CFG, params, TOKENS))
    # Non-zero B: the merged plain model equals the adapted one.
    lparams["h_1"]["mlp"]["c_fc"]["lora_b"] = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (4, 64))
    mcfg, mparams = merge_lora(lcfg, lparams)
    assert mcfg.lora_rank == 0 and "lora_a" not in mparams["h_1"]["mlp"]["c_fc"]
    adapted = jaxft.logits(lcfg, lparams, TOKENS)
    assert not np.allclose(adapted, jaxft.logits(CFG, params, TOKENS))
    np.testing.assert_allclose(jaxft.logits(mcfg, mparams, TOKENS), adapted, atol=1e-5)


def test_export_merges_and_jaxft_format_keeps_adapters(tmp_path):
    lcfg, lparams = add_lora(CFG, init_params(CFG, jax.random.PRNGKey(0)), 2, 4.0, jax.random.PRNGKey(1))
    lparams["h_0"]["attn"]["c_attn"]["lora_b"] = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (2, 48))
    expected = jaxft.logits(lcfg, lparams, TOKENS)
    cfg2, p2 = jaxft.load(jaxft.export(lcfg, lparams, tmp_path / "native", "jaxft"))
    assert cfg2.lora_rank == 2
    np.testing.assert_allclose(jaxft.logits(cfg2, p2, TOKENS), expected, atol=1e-6)
    cfg3, p3 = jaxft.load(jaxft.export(lcfg, lparams, tmp_path / "hf", "hf"))
    assert cfg3.lora_rank == 0
    np.testing.assert_allclose(jaxft.logits(cfg3, p3, TOKENS), expected, atol=1e-5)


def test_only_adapters_and_head_train():
    config, params = with_classifier_head(CFG, init_params(CFG, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    config, params = add_lora(config, params, 4, 16.0, jax.random.PRNGKey(2))
    mask = optim.trainable_mask(config, params, "lora")
    opt = optim.adamw(1e-2, 0.0)
    state = train.init_state(params, mask, opt)
    step, _ = train.make_steps(config, opt, "classification")
    batch = {"tokens": TOKENS.astype(np.int32), "labels": np.array([0, 1], np.int32), "lengths": np.array([12, 12], np.int32), "weights": np.ones(2, np.float32)}
    for _ in range(2):
        state, _ = step(state, batch)
    before, after = flatten(params), flatten(jax.device_get(state.params))
    for key in before:
        trains = key.endswith(("lora_a", "lora_b")) or key.startswith("cls_head")
        assert flatten(mask)[key] == trains, key
        assert np.array_equal(np.asarray(before[key]), after[key]) != trains, key


def test_lora_needs_adapters():
    params = init_params(CFG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="LoRA rank"):
        optim.trainable_mask(CFG, params, "lora")
