"""Cached, compiled generation: parity with the reference's uncached torch loops, batching,
per-row eos stop, sampling, truncation, and no recompilation within a shape bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft import generate as gen
from jaxft.config import GPTConfig
from jaxft.model import init_params, logits
from jaxft.weights.torch_ref import state_dict_to_params
from reference_gpt import generate as ref_generate
from reference_gpt import generate_text_simple, random_reference_model

CONFIG = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4, tie_embeddings=False)
TIED = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def reference():
    """(torch reference model, jaxft params with the same weights)."""
    model = random_reference_model(CONFIG, seed=0)
    config, params = state_dict_to_params(CONFIG, model.state_dict())
    assert config == CONFIG
    return model, params


@pytest.fixture(scope="module")
def tied_params():
    return init_params(TIED, jax.random.key(1))


def _prompts(lengths, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _uncached_greedy(config, params, prompt, n):
    """Greedy decoding with one full uncached forward pass of the jaxft model per token.

    Sequences are right-padded to the context length (one compiled shape); causal
    attention makes the logits at the last real position independent of the padding."""
    ids = list(prompt)
    for _ in range(n):
        padded = ids + [0] * (config.context_length - len(ids))
        ids.append(int(jnp.argmax(logits(config, params, padded)[0, len(ids) - 1])))
    return ids[len(prompt) :]


def test_greedy_equals_torch_reference_uncached_loop(reference):
    model, params = reference
    prompts = np.asarray(_prompts([12, 12], seed=1))
    for n in (20, 64 - 12):  # the second fills the context exactly
        expected = generate_text_simple(model, torch.tensor(prompts), n, CONFIG.context_length).numpy()
        got = gen.greedy(CONFIG, params, prompts, n)
        np.testing.assert_array_equal(got, expected)
    single = gen.greedy(CONFIG, params, prompts[0], 5)
    assert single.shape == (17,) and single[:12].tolist() == prompts[0].tolist()


def test_tied_head_equals_uncached_jaxft_loop(tied_params):
    prompts = _prompts([3, 30], seed=2)
    got = gen.generate(TIED, tied_params, prompts, max_new_tokens=15, eos_id=None)
    assert got == [_uncached_greedy(TIED, tied_params, p, 15) for p in prompts]


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(reference):
    _, params = reference
    prompts = _prompts([1, 7, 31, 33, 12], seed=3)  # spans two prompt buckets
    batched = gen.generate(CONFIG, params, prompts, max_new_tokens=24, eos_id=None)
    single = [gen.generate(CONFIG, params, [p], max_new_tokens=24, eos_id=None)[0] for p in prompts]
    assert batched == single
    assert all(len(row) == 24 for row in batched)


def test_eos_stops_each_row_and_excludes_eos(reference):
    _, params = reference
    prompts = _prompts([5, 9, 14, 20], seed=4)
    free = gen.generate(CONFIG, params, prompts, max_new_tokens=16, eos_id=None)
    # An eos id that row 0 emits first at step 3 (and others maybe never or elsewhere).
    k = next(k for k in range(3, 16) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    stopped = gen.generate(CONFIG, params, prompts, max_new_tokens=16, eos_id=eos)
    expected = [row[: row.index(eos)] if eos in row else row for row in free]
    assert stopped == expected
    assert len(stopped[0]) == k
    assert any(len(row) == 16 for row in stopped) or len({len(r) for r in stopped}) > 1


def test_eos_matches_reference_generate_at_batch_1(reference):
    model, params = reference
    prompt = _prompts([10], seed=5)[0]
    free = gen.generate(CONFIG, params, [prompt], max_new_tokens=20, eos_id=None)[0]
    eos = free[6]
    expected = ref_generate(model, torch.tensor([prompt]), 20, CONFIG.context_length, eos_id=eos)[0, 10:].tolist()
    assert gen.generate(CONFIG, params, [prompt], max_new_tokens=20, eos_id=eos)[0] == expected
    assert len(expected) == free.index(eos)


def test_all_rows_stopping_at_once_gives_empty_outputs(reference):
    _, params = reference
    prompts = _prompts([4, 6], seed=6)
    first = [row[0] for row in gen.generate(CONFIG, params, prompts, max_new_tokens=1, eos_id=None)]
    out = gen.generate(CONFIG, params, [prompts[0]], max_new_tokens=30, eos_id=first[0])
    assert out == [[]]


def test_sampling_top_k_1_and_tiny_top_p_equal_greedy(reference):
    _, params = reference
    prompts = _prompts([8, 3], seed=7)
    greedy = gen.generate(CONFIG, params, prompts, max_new_tokens=12, eos_id=None)
    key = jax.random.key(0)
    top1 = gen.generate(CONFIG, params, prompts, max_new_tokens=12, eos_id=None, temperature=1.5, top_k=1, key=key)
    nucleus = gen.generate(CONFIG, params, prompts, max_new_tokens=12, eos_id=None, temperature=1.5, top_p=1e-6, key=key)
    assert top1 == greedy and nucleus == greedy


def test_sampling_is_reproducible_and_key_dependent(reference):
    _, params = reference
    prompts = _prompts([8, 3], seed=7)
    run = lambda seed: gen.generate(
        CONFIG, params, prompts, max_new_tokens=12, eos_id=None, temperature=2.0, top_p=0.999, key=jax.random.key(seed)
    )
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_top_k_restricts_and_batching_does_not_change_samples(reference):
    _, params = reference
    prompt = _prompts([8], seed=8)[0]
    top3 = set(np.argsort(np.asarray(logits(CONFIG, params, prompt)[0, -1]))[-3:].tolist())
    prompts = [prompt] * 6 + _prompts([3, 20], seed=9)
    kwargs = dict(max_new_tokens=10, eos_id=None, temperature=5.0, top_k=3, top_p=0.99, key=jax.random.key(3))
    whole = gen.generate(CONFIG, params, prompts, **kwargs)
    firsts = [row[0] for row in whole[:6]]
    assert set(firsts) <= top3 and len(set(firsts)) > 1
    # Each row draws from its own key (by index), so batching does not change the sample.
    assert gen.generate_batched(CONFIG, params, prompts, batch_size=4, progress=False, **kwargs) == whole


def test_generate_batched_returns_input_order(reference):
    _, params = reference
    prompts = _prompts([30, 2, 17, 9, 25], seed=10)
    batched = gen.generate_batched(CONFIG, params, prompts, batch_size=2, progress=False, max_new_tokens=8)
    assert batched == [gen.generate(CONFIG, params, [p], max_new_tokens=8)[0] for p in prompts]


def test_long_prompt_keeps_its_last_tokens(reference):
    _, params = reference
    prompt = _prompts([80], seed=11)[0]  # longer than the context (64)
    out = gen.generate(CONFIG, params, [prompt], max_new_tokens=10, eos_id=None)
    assert gen.max_prompt_tokens(CONFIG, 10) == 54
    assert out == gen.generate(CONFIG, params, [prompt[-54:]], max_new_tokens=10, eos_id=None)
    with pytest.raises(ValueError, match="smaller than the context length"):
        gen.max_prompt_tokens(CONFIG, 64)


def test_within_a_bucket_nothing_recompiles(reference):
    _, params = reference
    config = CONFIG.replace(name="compile-count")  # a fresh static config: nothing cached yet
    count = gen.compilations()
    gen.generate(config, params, _prompts([5], seed=12), max_new_tokens=10)
    assert gen.compilations() == count + 1
    gen.generate(config, params, _prompts([9], seed=13), max_new_tokens=10)
    gen.generate(config, params, _prompts([30], seed=14), max_new_tokens=7)
    assert gen.compilations() == count + 1
    gen.generate(config, params, _prompts([40], seed=15), max_new_tokens=7)  # next prompt bucket
    assert gen.compilations() == count + 2


def test_bad_arguments_give_clear_errors(reference):
    _, params = reference
    prompt = [[1, 2, 3]]
    with pytest.raises(ValueError, match="PRNG key"):
        gen.generate(CONFIG, params, prompt, max_new_tokens=5, temperature=0.8)
    with pytest.raises(ValueError, match="context length"):
        gen.generate(CONFIG, params, prompt, max_new_tokens=64)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(CONFIG, params, [[1], []], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate(CONFIG, params, [[1, 97]], max_new_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(CONFIG, params, prompt, max_new_tokens=5, temperature=1.0, top_p=0.0, key=jax.random.key(0))
    for temperature in (float("nan"), float("inf")):  # NaN compared as neither > 0 nor < 0: greedy, silently
        with pytest.raises(ValueError, match=f"temperature must be >= 0 and finite, got {temperature}"):
            gen.generate(CONFIG, params, prompt, max_new_tokens=5, temperature=temperature, key=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.generate(CONFIG, params, prompt, max_new_tokens=5, temperature=1.0, top_p=float("nan"), key=jax.random.key(0))
    assert gen.generate(CONFIG, params, [], max_new_tokens=5) == []


def test_generate_text_continues_the_prompt(tokenizer):
    config = GPTConfig(context_length=64, emb_dim=16, n_layers=1, n_heads=2)
    params = init_params(config, jax.random.key(2))
    text = "Do you have time"
    out = gen.generate_text(config, params, tokenizer, text, max_new_tokens=6, eos_id=None)
    new = gen.generate(config, params, [tokenizer.encode(text)], max_new_tokens=6, eos_id=None)[0]
    assert out == tokenizer.decode(tokenizer.encode(text) + new) and out.startswith(text)
    assert len(new) == 6


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.55, 2), (0.75, 2), (0.85, 3), (0.9, 3), (0.97, 4), (1.0, 4)])
def test_nucleus_keeps_the_smallest_prefix_that_reaches_top_p(top_p, kept):
    """Probabilities 0.5 / 0.3 / 0.15 / 0.05 (shuffled): the nucleus is the most likely tokens
    until their mass reaches top_p (the most likely one always)."""
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    order = np.argsort(-probs)
    filtered = np.asarray(gen._filter_logits(jnp.log(jnp.asarray(probs))[None], None, jnp.float32(top_p)))[0]
    assert set(np.flatnonzero(np.isfinite(filtered))) == set(order[:kept].tolist())


def test_nucleus_is_taken_after_the_temperature():
    """A high temperature flattens the distribution, so the same top_p keeps more tokens: sampling
    filters the tempered logits. Probabilities 0.6 / 0.25 / 0.1 / 0.05 at temperature 5 are about
    0.32 / 0.27 / 0.22 / 0.19, whose nucleus for top_p 0.7 has 3 tokens (at temperature 1: 2)."""
    rows = 256
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.6, 0.25, 0.1, 0.05])), (rows, 4))
    keys = jax.random.split(jax.random.key(0), rows)
    sampled = lambda t: set(np.asarray(gen._select(logits, keys, jnp.int32(0), jnp.float32(t), jnp.float32(0.7),
                                                   sample=True, top_k=None, use_top_p=True)).tolist())
    assert sampled(5.0) == {0, 1, 2} and sampled(1.0) == {0, 1} and sampled(0.3) == {0}
