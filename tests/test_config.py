"""GPTConfig: the four GPT-2 sizes and their spellings, hparams.json, custom sizes, validation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from jaxft.config import GPTConfig, canonical_name, from_hparams, get_config, is_size_name

SIZES = {
    "gpt2-small (124M)": (768, 12, 12),
    "gpt2-medium (355M)": (1024, 24, 16),
    "gpt2-large (774M)": (1280, 36, 20),
    "gpt2-xl (1558M)": (1600, 48, 25),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_the_four_sizes(name):
    config = get_config(name)
    assert (config.emb_dim, config.n_layers, config.n_heads) == SIZES[name]
    assert config.vocab_size == 50257 and config.context_length == 1024
    assert config.qkv_bias and config.tie_embeddings and config.num_classes is None
    assert config.drop_rate == 0.0 and config.layer_norm_eps == 1e-5
    assert config.name == name


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("gpt2-small (124M)", "gpt2-small (124M)"),
        ("124M", "gpt2-small (124M)"),
        ("gpt2-small", "gpt2-small (124M)"),
        ("small", "gpt2-small (124M)"),
        ("gpt2", "gpt2-small (124M)"),
        ("GPT2-Small", "gpt2-small (124M)"),
        ("  124m ", "gpt2-small (124M)"),
        ("gpt2-medium (355M)", "gpt2-medium (355M)"),
        ("355M", "gpt2-medium (355M)"),
        ("gpt2-medium", "gpt2-medium (355M)"),
        ("gpt2-large (774M)", "gpt2-large (774M)"),
        ("774M", "gpt2-large (774M)"),
        ("gpt2-large", "gpt2-large (774M)"),
        ("gpt2-xl (1558M)", "gpt2-xl (1558M)"),
        ("1558M", "gpt2-xl (1558M)"),
        ("gpt2-xl", "gpt2-xl (1558M)"),
    ],
)
def test_aliases(alias, canonical):
    assert is_size_name(alias)
    assert canonical_name(alias) == canonical
    assert get_config(alias) == get_config(canonical)


def test_unknown_size_lists_the_choices():
    assert not is_size_name("gpt3")
    with pytest.raises(ValueError, match="unknown GPT-2 size 'gpt3'.*gpt2-small \\(124M\\)"):
        get_config("gpt3")


def test_overrides():
    config = get_config("124M", drop_rate=0.1, num_classes=2)
    assert config.drop_rate == 0.1 and config.num_classes == 2 and config.emb_dim == 768
    assert get_config("124M").drop_rate == 0.0  # the named size itself is untouched


HPARAMS_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def test_from_hparams_dict_and_file(tmp_path):
    assert from_hparams(HPARAMS_124M) == get_config("124M")
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(HPARAMS_124M))
    assert from_hparams(path) == get_config("124M")
    assert from_hparams(str(path), drop_rate=0.1).drop_rate == 0.1

    tiny = {"n_vocab": 101, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
    config = from_hparams(tiny)
    assert config.name == "custom"
    assert (config.vocab_size, config.context_length, config.emb_dim, config.n_heads, config.n_layers) == (101, 64, 32, 4, 2)
    assert config.to_hparams() == tiny


def test_from_hparams_errors(tmp_path):
    with pytest.raises(ValueError, match="missing key\\(s\\) n_head"):
        from_hparams({k: v for k, v in HPARAMS_124M.items() if k != "n_head"})
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024}))
    with pytest.raises(ValueError, match=f"{path}: missing key\\(s\\) n_embd, n_head, n_layer"):
        from_hparams(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        from_hparams(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        from_hparams(tmp_path / "nowhere.json")


def test_custom_size():
    config = GPTConfig(vocab_size=101, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
    assert config.head_dim == 8
    assert config.name == "custom"
    assert config.replace(n_layers=3).n_layers == 3 and config.n_layers == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"emb_dim": 30, "n_heads": 4}, "emb_dim \\(30\\) must be divisible by n_heads \\(4\\)"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"context_length": 1.5}, "context_length must be a positive integer"),
        ({"drop_rate": 1.0}, "drop_rate must be in \\[0, 1\\)"),
        ({"drop_rate": -0.1}, "drop_rate must be in \\[0, 1\\)"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"), ({"num_classes": 2.5}, "num_classes must be an integer >= 2"),
    ],
)
def test_validation_errors(fields, message):
    base = dict(vocab_size=101, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**base, **fields})


def test_hashable_and_usable_as_a_static_jit_argument():
    a = GPTConfig(vocab_size=101, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
    b = GPTConfig(vocab_size=101, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, a.replace(n_layers=3)}) == 2
    with pytest.raises(AttributeError):
        a.n_layers = 3  # frozen

    traces = []

    def width(config: GPTConfig, x):
        traces.append(config)
        return x * config.emb_dim

    width_jit = jax.jit(width, static_argnums=0)
    assert float(width_jit(a, jnp.float32(2.0))) == 64.0
    assert float(width_jit(b, jnp.float32(3.0))) == 96.0  # equal config: no retrace
    assert len(traces) == 1
    assert float(width_jit(a.replace(emb_dim=64), jnp.float32(1.0))) == 64.0
    assert len(traces) == 2


def test_dict_round_trip():
    config = get_config("355M", drop_rate=0.1, num_classes=3, tie_embeddings=False)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types
    assert GPTConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields: bogus"):
        GPTConfig.from_dict({**data, "bogus": 1})
