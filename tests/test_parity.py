"""Parity with PyTorch, fp32 on CPU: jaxft's logits, gradients and greedy tokens match
transformers' GPT2LMHeadModel (an independent implementation) and the reference GPTModel
(tests/reference_gpt.py, the reference's architecture and names), through every weights path.

Measured differences are printed (run with `pytest -s` to see them).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from reference_gpt import GPTModel, config_dict, generate_text_simple, random_reference_model
from safetensors.torch import save_file as torch_save_safetensors
from test_weights import TINY, random_params

import jaxft
from jaxft import GPTConfig
from jaxft.model import apply
from jaxft.weights import torch_ref
from jaxft.weights.common import flatten

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only; never the network
transformers = pytest.importorskip("transformers")

MAX_ABS = 1e-4
MAX_REL = 1e-5
GRAD_REL = 1e-4

def compare(label: str, ours, ref) -> tuple[float, float]:
    """Assert the logit tolerances; print and return (max |diff|, ||diff|| / ||ref||)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{label}: shape {ours.shape} vs {ref.shape}"
    max_abs = float(np.abs(ours - ref).max())
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"\n[parity] {label}: max|diff| = {max_abs:.3e}, relative = {rel:.3e}")
    assert max_abs <= MAX_ABS, f"{label}: max |diff| {max_abs:.3e} > {MAX_ABS}"
    assert rel <= MAX_REL, f"{label}: relative error {rel:.3e} > {MAX_REL}"
    return max_abs, rel


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def random_ids(config: GPTConfig, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, seq))


# --- Hugging Face GPT2LMHeadModel -------------------------------------------------------


def random_hf_model(config: GPTConfig, tied: bool, seed: int = 0):
    """GPT2LMHeadModel with random weights; biases and LayerNorms perturbed so none is trivial."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
    )
    model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif name == "lm_head.weight" and not tied:
                p.normal_(0.0, 0.02)
    return model.eval()


HF_CASES = {
    # name: (config, tied, batch, seq)
    "tiny-tied": (TINY, True, 2, 64),
    "tiny-untied": (TINY, False, 2, 64),
    "gpt2-small-widths-2-layers": (
        GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_layers=2, n_heads=12),
        True,
        2,
        96,
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, tmp_path):
    config, tied, batch, seq = HF_CASES[case]
    model = random_hf_model(config, tied)
    model.save_pretrained(tmp_path)  # model.safetensors (keys with `transformer.`) + config.json
    assert (tmp_path / "model.safetensors").is_file()

    loaded_config, params = jaxft.load(tmp_path)
    assert loaded_config.tie_embeddings is tied
    assert ("lm_head" in params) is (not tied)
    for field in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
        assert getattr(loaded_config, field) == getattr(config, field)

    ids = random_ids(config, batch, seq)
    compare(f"transformers GPT2LMHeadModel, {case}, batch {batch} x {seq}", jaxft.logits(loaded_config, params, ids), torch_logits(model, ids))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_export_loads_into_transformers(tied, tmp_path):
    """jaxft params written as "hf" load with GPT2LMHeadModel.from_pretrained and agree."""
    config = TINY.replace(tie_embeddings=tied)
    params = random_params(config, seed=3)
    jaxft.export(config, params, tmp_path, "hf")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert model.config.tie_word_embeddings is tied
    ids = random_ids(config, 2, 64, seed=1)
    compare(f"jaxft -> hf export -> transformers ({'tied' if tied else 'untied'})", torch_logits(model, ids), jaxft.logits(config, params, ids))


# --- the reference GPTModel ---------------------------------------------------------------


def classifier_reference_model(config: GPTConfig, num_classes: int = 2, seed: int = 0) -> GPTModel:
    """The reference's classifier: the reference GPTModel with out_head = Linear(d, classes) (bias)."""
    model = random_reference_model(config, seed)
    torch.manual_seed(seed + 1)
    model.out_head = torch.nn.Linear(config.emb_dim, num_classes)
    with torch.no_grad():
        model.out_head.bias.normal_(0.0, 0.1)
    return model.eval()


def save_state_dict(model: torch.nn.Module, path):
    if path.suffix == ".safetensors":
        torch_save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_reference_state_dict_imports_to_same_logits(suffix, tmp_path):
    model = random_reference_model(TINY, seed=1)
    path = save_state_dict(model, tmp_path / f"model{suffix}")
    config, params = jaxft.load(path, config=TINY)
    assert config.tie_embeddings is False and config.num_classes is None
    ids = random_ids(TINY, 2, 64, seed=2)
    compare(f"reference GPTModel state dict ({suffix}) -> jaxft", jaxft.logits(config, params, ids), torch_logits(model, ids))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_loads_into_reference_strict(tied, suffix, tmp_path):
    """jaxft params -> "torch-reference" -> a fresh GPTModel, load_state_dict(strict=True)."""
    config = TINY.replace(tie_embeddings=tied)
    params = random_params(config, seed=7)
    path = jaxft.export(config, params, tmp_path / f"exported{suffix}", "torch-reference")
    state_dict = _read_state_dict(path)

    model = GPTModel(config_dict(config))
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    ids = random_ids(config, 2, 64, seed=3)
    compare(f"jaxft ({'tied' if tied else 'untied'}) -> torch-reference {suffix} -> GPTModel", torch_logits(model, ids), jaxft.logits(config, params, ids))


def _read_state_dict(path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def test_classifier_both_ways(tmp_path):
    """The classification variant: reference -> jaxft -> reference, logits [B, T, 2] throughout."""
    model = classifier_reference_model(TINY)
    path = save_state_dict(model, tmp_path / "review_classifier.pth")
    config, params = jaxft.load(path, config=TINY)
    assert config.num_classes == 2
    assert params["cls_head"]["kernel"].shape == (TINY.emb_dim, 2)
    assert params["cls_head"]["bias"].shape == (2,)

    ids = random_ids(TINY, 2, 64, seed=4)
    ours = jaxft.logits(config, params, ids)
    assert ours.shape == (2, 64, 2)
    compare("reference classifier (.pth) -> jaxft", ours, torch_logits(model, ids))

    out = jaxft.export(config, params, tmp_path / "exported_classifier.pth", "torch-reference")
    fresh = GPTModel(config_dict(config))
    fresh.out_head = torch.nn.Linear(config.emb_dim, 2)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    compare("jaxft classifier -> torch-reference -> GPTModel", torch_logits(fresh.eval(), ids), ours)


def test_hf_to_reference_through_jaxft(tmp_path):
    """A tied HF checkpoint, exported for the reference (out_head = a copy of wte), agrees with HF."""
    hf_model = random_hf_model(TINY, tied=True, seed=5)
    hf_model.save_pretrained(tmp_path / "hf")
    config, params = jaxft.load(tmp_path / "hf")
    path = jaxft.export(config, params, tmp_path / "ref.pth", "torch-reference")
    model = GPTModel(config_dict(config))
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ids = random_ids(TINY, 2, 64, seed=5)
    compare("transformers -> jaxft -> torch-reference", torch_logits(model.eval(), ids), torch_logits(hf_model, ids))


# --- gradients ------------------------------------------------------------------------------


def test_cross_entropy_gradients_match_torch():
    model = random_reference_model(TINY, seed=6).train()  # drop_rate 0: train mode is deterministic
    ids = random_ids(TINY, 3, 33, seed=6)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    model.zero_grad()
    logits = model(torch.as_tensor(inputs))
    loss_torch = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(targets).flatten())
    loss_torch.backward()
    # Gradients have the weights' layout, so the weights' converter maps them too.
    torch_grads = {name: p.grad for name, p in model.named_parameters()}
    _, grads_ref = torch_ref.state_dict_to_params(TINY, torch_grads, "torch grads")

    config, params = torch_ref.state_dict_to_params(TINY, model.state_dict(), "reference model")

    def loss_fn(p):
        out = apply(config, p, jnp.asarray(inputs))
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(targets)).mean()

    loss_jax, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss_jax) - loss_torch.item()) <= 1e-5 * abs(loss_torch.item())

    ours, ref = flatten(jax.tree_util.tree_map(np.asarray, grads)), flatten(grads_ref)
    assert set(ours) == set(ref)
    worst_name, worst = "", 0.0
    for name in sorted(ref):
        denominator = max(float(np.linalg.norm(ref[name])), 1e-12)
        rel = float(np.linalg.norm(np.asarray(ours[name], np.float64) - ref[name]) / denominator)
        assert rel <= GRAD_REL, f"gradient of {name}: relative error {rel:.3e} > {GRAD_REL}"
        if rel > worst:
            worst_name, worst = name, rel
    assert float(np.linalg.norm(ref["wte/embedding"])) > 0  # the loss reaches every parameter
    print(f"\n[parity] gradients of {len(ref)} tensors: worst relative error {worst:.3e} ({worst_name})")


# --- greedy generation ----------------------------------------------------------------------


def _greedy_uncached(config: GPTConfig, params, ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """The reference's loop over jaxft.logits: one full forward pass per token. The causal mask
    makes trailing filler irrelevant, so every step runs at one shape (one compilation)."""
    batch, length = ids.shape
    buffer = np.zeros((batch, length + max_new_tokens), dtype=np.int64)
    buffer[:, :length] = ids
    for step in range(length, length + max_new_tokens):
        buffer[:, step] = np.asarray(jaxft.logits(config, params, buffer))[:, step - 1].argmax(-1)
    return buffer


def _greedy_kv_cache(config: GPTConfig, params, ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    generate = pytest.importorskip("jaxft.generate")
    return np.asarray(generate.greedy(config, params, ids, max_new_tokens))


@pytest.mark.parametrize("generator", [_greedy_uncached, _greedy_kv_cache], ids=["uncached", "kv-cache"])
def test_greedy_generation_matches_reference(generator):
    model = random_reference_model(TINY, seed=8)
    config, params = torch_ref.state_dict_to_params(TINY, model.state_dict(), "reference model")
    prompt = random_ids(TINY, 2, 8, seed=8)
    expected = generate_text_simple(model, torch.as_tensor(prompt), 20, TINY.context_length).numpy()
    assert expected.shape == (2, 28)
    ours = generator(config, params, prompt, 20)
    np.testing.assert_array_equal(ours, expected)
    assert len(set(expected[0, 8:].tolist())) > 1  # not a degenerate repeat of one token


# --- dropout ------------------------------------------------------------------------------


def test_dropout_only_with_a_key():
    config = TINY.replace(drop_rate=0.2)
    params = random_params(config, seed=9)
    tokens = jnp.asarray(random_ids(config, 2, 64, seed=9))
    run = jax.jit(lambda p, t, key: apply(config, p, t, dropout_key=key))

    deterministic = run(params, tokens, None)
    np.testing.assert_array_equal(run(params, tokens, None), deterministic)
    # jaxft.logits never drops out, even for a config with drop_rate > 0.
    np.testing.assert_allclose(jaxft.logits(config, params, tokens), deterministic, rtol=1e-5, atol=1e-6)

    key = jax.random.key(42)
    dropped = run(params, tokens, key)
    assert not np.allclose(dropped, deterministic, atol=1e-3)
    np.testing.assert_array_equal(run(params, tokens, key), dropped)
    other = run(params, tokens, jax.random.key(43))
    assert not np.allclose(other, dropped, atol=1e-3)
