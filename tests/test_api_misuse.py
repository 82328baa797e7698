"""The functional API refuses misuse in one line, where it would otherwise return NaN or
garbage silently (ids outside the vocabulary, more positions than the model has, a loss for the
other task) or fail deep inside Flax (a flat token list)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.config import GPTConfig
from jaxft.model import init_params

CONFIG = GPTConfig(vocab_size=512, context_length=32, emb_dim=32, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("ids", [[[1, 2, 512]], [[-1]], [[0.5, 1.0]]])
def test_logits_refuse_ids_outside_the_vocabulary(params, ids):
    with pytest.raises(ValueError, match=r"token ids must be integers in 0\.\.511"):
        jaxft.logits(CONFIG, params, ids)


def test_more_positions_than_the_model_has_is_an_error_not_nan(params):
    tokens = jnp.ones((2, 40), jnp.int32)
    for run in (lambda: jaxft.logits(CONFIG, params, tokens), lambda: jaxft.apply(CONFIG, params, tokens),
                lambda: jaxft.lm_metrics(CONFIG, params, {"inputs": tokens, "targets": tokens})):
        with pytest.raises(ValueError, match="sequence of 40 tokens exceeds the model's context length 32"):
            run()


def test_apply_takes_lists_and_names_a_wrong_rank(params):
    assert jaxft.apply(CONFIG, params, [[1, 2, 3]]).shape == (1, 3, 512)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\] token ids, got shape \(3,\)"):
        jaxft.apply(CONFIG, params, [1, 2, 3])


def test_each_loss_wants_its_own_kind_of_model(params):
    config, classifier = jaxft.with_classifier_head(CONFIG, params, 2, jax.random.PRNGKey(1))
    tokens = jnp.ones((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="lm_metrics needs a language-model config"):
        jaxft.lm_metrics(config, classifier, {"inputs": tokens, "targets": tokens})
    with pytest.raises(ValueError, match="classification_metrics needs a classifier config"):
        jaxft.classification_metrics(CONFIG, "last", params, {"tokens": tokens, "labels": jnp.zeros(2, jnp.int32)})
    # weights are optional: every row counts
    batch = {"tokens": tokens, "labels": jnp.asarray([0, 1])}
    loss, metrics = jaxft.classification_metrics(config, "last", classifier, batch)
    weighted, _ = jaxft.classification_metrics(config, "last", classifier, {**batch, "weights": jnp.ones(2)})
    assert float(metrics["count"]) == 2 and np.isclose(float(loss), float(weighted))


def test_parameters_of_another_model_are_named_not_a_flax_scope_error(params):
    batch = {"tokens": jnp.ones((2, 4), jnp.int32), "labels": jnp.zeros(2, jnp.int32)}
    classifier = CONFIG.replace(num_classes=2)
    with pytest.raises(ValueError, match=r"lack cls_head, which this config \(2 blocks, classification head\)"):
        jaxft.classification_metrics(classifier, "last", params, batch)
    with pytest.raises(ValueError, match=r"lack h_2, h_3, which this config \(4 blocks, tied head\)"):
        jaxft.logits(CONFIG.replace(n_layers=4), params, [[1, 2]])
    with pytest.raises(ValueError, match=r"lack lm_head, which this config \(2 blocks, untied LM head\)"):
        jaxft.apply(CONFIG.replace(tie_embeddings=False), params, [[1, 2]])
    # the final hidden state needs no head
    assert jaxft.apply(classifier, params, [[1, 2]], return_hidden=True).shape == (1, 2, 32)
    with pytest.raises(ValueError, match=r"have a classification head \(cls_head\) but this config has no num_classes"):
        jaxft.apply(CONFIG, jaxft.with_classifier_head(CONFIG, params, 2, jax.random.PRNGKey(1))[1], [[1, 2]])


def test_explicit_mesh_axes_are_named_not_a_gather_sharding_error(params):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    tokens = np.ones((2, 4), np.int32)
    explicit = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"sharded over Explicit mesh axes .*AxisType.Auto"):
        jaxft.apply(CONFIG, params, jax.device_put(tokens, NamedSharding(explicit, PartitionSpec("data"))))
    auto = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jaxft.apply(CONFIG, params, jax.device_put(tokens, NamedSharding(auto, PartitionSpec("data"))))
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jaxft.apply(CONFIG, params, tokens)))


def test_generate_names_a_flat_prompt_and_a_traced_call(params):
    from jaxft import generate as G

    with pytest.raises(ValueError, match=r"prompt 0 is one token id, not a list of them"):
        G.generate(CONFIG, params, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="generate is a host function .* outside jax.jit / jax.vmap"):
        jax.jit(lambda p: G.generate(CONFIG, p, [[1, 2]], max_new_tokens=2))(params)
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match="generate is a host function"):
        jax.vmap(lambda k: G.generate(CONFIG, params, [[1, 2]], max_new_tokens=2, temperature=1.0, key=k))(keys)
    # a jax scalar temperature samples as the same Python float does
    run = lambda t: G.generate(CONFIG, params, [[1, 2]], max_new_tokens=4, temperature=t, top_p=0.9, key=jax.random.key(1))
    assert run(jnp.float32(0.7)) == run(0.7)


def test_optimizer_mistakes_are_named(params):
    config, classifier = jaxft.with_classifier_head(CONFIG, params, 2, jax.random.PRNGKey(1))
    batch = {"tokens": np.ones((2, 4), np.int32), "labels": np.zeros(2, np.int32)}
    mask = jaxft.trainable_mask(config, classifier, "last-block")
    state = jaxft.init_state(classifier, mask, jaxft.adamw(1e-3, accumulation_steps=2))
    train_step, _ = jaxft.make_steps(config, jaxft.adamw(1e-3), "classification")
    with pytest.raises(ValueError, match="the state's optimizer state is not this optimizer's"):
        train_step(state, batch)
    # the same kind of optimizer with other hyperparameters is the same state
    state = jaxft.init_state(classifier, mask, jaxft.adamw(1e-3))
    assert np.isfinite(float(jaxft.make_steps(config, jaxft.adamw(2e-3, 0.0), "classification")[0](state, batch)[1]["loss"]))
    for bad, match in [(dict(learning_rate=-1e-3), "learning_rate must be >= 0"),
                       (dict(accumulation_steps=0), "accumulation_steps must be a positive integer")]:
        with pytest.raises(ValueError, match=match):
            jaxft.adamw(**bad)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 2\.0"):
        jaxft.with_classifier_head(CONFIG, params, 2.0, jax.random.PRNGKey(1))


def test_an_int_seed_initialises_and_a_foreign_mask_is_named(params):
    np.testing.assert_array_equal(np.asarray(init_params(CONFIG, 0)["wte"]["embedding"]), np.asarray(params["wte"]["embedding"]))
    mask = jaxft.trainable_mask(CONFIG, params, "last-block")
    with pytest.raises(ValueError, match=r"mask: its tree differs from the parameters'"):
        jaxft.init_state(params, {**mask, "extra": True}, jaxft.adamw(1e-3))
