"""Instruction tuning against a torch loop written like the reference's train_model_simple:
same weights, same batches, per-step losses within 1e-4; bucketed batches lose nothing."""

from __future__ import annotations

import jax
import numpy as np
import torch

from jaxft import optim, train
from jaxft.config import GPTConfig
from jaxft.data import instruct
from jaxft.model import init_params
from jaxft.recipes.instruct import untie_head
from jaxft.weights import torch_ref
from jaxft.weights.common import flatten
from reference_gpt import random_reference_model

# A small vocabulary whose last id plays GPT-2's 50256 (end of text and padding) throughout:
# the full 50257-token head would only make the test slower, not stricter.
CONFIG = GPTConfig(vocab_size=128, context_length=64, emb_dim=32, n_layers=2, n_heads=4, tie_embeddings=False)
PAD = CONFIG.vocab_size - 1
STEPS, BATCH = 10, 4


def _examples(rs: np.random.RandomState, n: int, inner_pad: bool, longest: int | None) -> list[list[int]]:
    """Ragged token lists (lengths 3..30, or the first one `longest` long); with `inner_pad`
    some hold the pad id inside (the reference's collate then masks every later pad target, the
    row's own end-of-text included)."""
    items = []
    for i in range(n):
        ids = rs.randint(0, PAD, longest if i == 0 and longest else rs.randint(3, 31)).tolist()
        if inner_pad and rs.rand() < 0.3:
            ids[rs.randint(len(ids))] = PAD
        items.append(ids)
    return items


def _batches(seed: int = 0, steps: int = STEPS, mask_prompt: bool = False, inner_pad: bool = True, longest: int | None = None):
    """(tight, bucketed) pairs of (inputs, targets) built by the reference-semantics collate."""
    rs = np.random.RandomState(seed)
    pairs = []
    for _ in range(steps):
        items = _examples(rs, BATCH, inner_pad, longest)
        prompts = [int(rs.randint(1, len(x) + 1)) for x in items] if mask_prompt else None
        kw = dict(pad_token_id=PAD, allowed_max_length=CONFIG.context_length, mask_prompt_lengths=prompts)
        pairs.append((instruct.collate(items, **kw), instruct.collate_bucketed(items, **kw)))
    return pairs


def _lm_batch(pair) -> dict[str, np.ndarray]:
    inputs, targets = pair
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def test_ten_steps_match_the_seed_torch_loop():
    ref = random_reference_model(CONFIG, seed=5)
    config, params = torch_ref.state_dict_to_params(CONFIG, ref.state_dict())
    initial = flatten(params)
    mask = optim.trainable_mask(config, params, "all")
    opt = optim.adamw(5e-5, 0.1)
    state = train.init_state(params, mask, opt)
    train_step, _ = train.make_steps(config, opt, "lm")

    # The reference: AdamW over model.parameters(), calc_loss_batch's flattened cross-entropy
    # (its default ignore_index=-100 skips the masked targets), zero_grad/backward/step.
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=5e-5, weight_decay=0.1)
    ref.train()  # drop_rate 0: same as eval, as in the reference

    pairs = _batches()
    jax_losses, torch_losses = [], []
    for (tight, bucketed) in pairs:
        state, metrics = train_step(state, _lm_batch(bucketed))  # jaxft trains on the bucketed shapes
        torch_opt.zero_grad()
        inputs, targets = (torch.from_numpy(a).long() for a in tight)
        loss = torch.nn.functional.cross_entropy(ref(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        torch_opt.step()
        jax_losses.append(float(metrics["loss"]))
        torch_losses.append(loss.item())
    diffs = np.abs(np.array(jax_losses) - np.array(torch_losses))
    print(f"\nper-step |loss difference| over {STEPS} steps: max {diffs.max():.2e}, mean {diffs.mean():.2e}")
    assert diffs.max() <= 1e-4, diffs

    # One compile for the bucket width, not one per batch length.
    assert len({t[0].shape for t, _ in pairs}) > 1 and {b[0].shape for _, b in pairs} == {(BATCH, 32)}
    assert train.compile_count(train_step) == 1

    # After 10 steps the weights agree too.
    _, torch_params = torch_ref.state_dict_to_params(CONFIG, ref.state_dict())
    ours, theirs = flatten(jax.device_get(state.params)), flatten(torch_params)
    d = config.emb_dim
    for key in ours:
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        if key.endswith("attn/c_attn/bias"):
            # The key bias cannot change the loss (softmax cancels q.b_k), so its gradient is
            # rounding noise that Adam normalises to about lr per step in both frameworks.
            np.testing.assert_array_less(np.abs(a[d : 2 * d] - b[d : 2 * d]), 2 * STEPS * 5e-5)
            a, b = np.concatenate([a[:d], a[2 * d :]]), np.concatenate([b[:d], b[2 * d :]])
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-4, f"{key}: relative difference {rel:.2e}"
        assert not np.array_equal(ours[key], initial[key]), f"{key} did not train"


def test_bucketed_batches_give_the_tight_loss_and_tokens_seen():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    _, eval_step = train.make_steps(CONFIG, optim.adamw(), "lm")
    # Every batch's longest example has 40 tokens: two shapes, (4, 40) tight and (4, 64) bucketed.
    for seed, mask_prompt, inner_pad in [(1, False, True), (2, True, True), (3, False, False), (4, True, False)]:
        (tight, bucketed), = _batches(seed=seed, steps=1, mask_prompt=mask_prompt, inner_pad=inner_pad, longest=40)
        assert tight[0].shape == (BATCH, 40) and bucketed[0].shape == (BATCH, 64)
        np.testing.assert_array_equal(bucketed[1][:, 40:], instruct.IGNORE_INDEX)
        a = float(eval_step(params, _lm_batch(tight))["loss"])
        b = float(eval_step(params, _lm_batch(bucketed))["loss"])
        assert abs(a - b) <= 1e-5 * abs(a), (seed, a, b)
        if not inner_pad:  # (an example holding the pad id hides its own end from tight_shape)
            # Tokens seen as the reference counts them: input_batch.numel() of the tight batch.
            assert np.prod(instruct.tight_shape(bucketed[1])) == tight[0].size
    assert train.compile_count(eval_step) == 2


def test_untied_head_starts_as_a_copy_of_wte():
    """The reference's GPTModel copies wte into a separate out_head (they then train apart; the
    end-to-end run in test_instruct_train checks that)."""
    tied = CONFIG.replace(tie_embeddings=True)
    params = init_params(tied, jax.random.PRNGKey(1))
    config, untied = untie_head(tied, params)
    assert not config.tie_embeddings and tied.tie_embeddings
    np.testing.assert_array_equal(untied["lm_head"]["kernel"], np.asarray(params["wte"]["embedding"]).T)
    assert untie_head(config, untied) == (config, untied)  # already untied: unchanged
