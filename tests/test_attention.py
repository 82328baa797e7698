"""The attention setting (`--attention`, `model.fused_attention`): which implementation each
setting picks, and that the fused path (jax.nn.dot_product_attention) computes what the explicit
scores and softmax compute. cuDNN's kernel needs an NVIDIA GPU; here the fused path runs with
JAX's own implementation ("xla"), which checks the layout, the causal mask and the plumbing from
make_steps down to each block; scripts/bench_gpu.py times the cuDNN kernel on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import model, optim, steps
from jaxft.config import GPTConfig
from jaxft.settings import TrainerSettings

SMALL = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=4)


def test_the_setting_picks_an_implementation():
    assert model.fused_attention("xla", jnp.bfloat16) is None
    assert model.fused_attention("cudnn", jnp.float32) == "cudnn"
    # auto: cuDNN only on a GPU with 16-bit compute (this machine has none, so the explicit path)
    on_gpu = jax.default_backend() == "gpu"
    assert model.fused_attention("auto", jnp.bfloat16) == ("cudnn" if on_gpu else None)
    assert model.fused_attention("auto", jnp.float32) is None
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        model.fused_attention("flash", jnp.float32)


def test_cudnn_needs_bfloat16_and_no_dropout_and_a_gpu(monkeypatch):
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"attention cudnn is NVIDIA's kernel and needs a GPU \(this backend: cpu\)"):
            TrainerSettings(attention="cudnn", dtype="bfloat16").validate()
        TrainerSettings(attention="cudnn", dtype="bfloat16").validate(devices=False)  # a sweep's check
        monkeypatch.setattr("jaxft.settings.jax.default_backend", lambda: "gpu")  # as on a GPU
    TrainerSettings(attention="cudnn", dtype="bfloat16").validate()
    for bad in (TrainerSettings(attention="cudnn"), TrainerSettings(attention="cudnn", dtype="bfloat16", drop_rate=0.1)):
        with pytest.raises(ValueError, match="attention cudnn needs --dtype bfloat16 and no dropout"):
            bad.validate()


def test_auto_on_a_gpu_keeps_the_explicit_path_while_dropout_is_on(monkeypatch):
    """cuDNN's kernel has no attention dropout: "auto" must not pick it for a dropout step
    (--dtype bfloat16 --drop-rate 0.1 on a GPU), where an explicit "cudnn" is refused."""
    from jaxft import attention

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")  # as on a GPU
    assert model.fused_attention("auto", jnp.bfloat16) == "cudnn"
    assert model.fused_attention("auto", jnp.bfloat16, dropout=True) is None
    cfg = SMALL.replace(drop_rate=0.1)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    batch = {"inputs": jnp.ones((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32)}
    loss, _ = steps.lm_metrics(cfg, params, batch, dropout_key=jax.random.PRNGKey(1), dtype=jnp.bfloat16)
    assert np.isfinite(float(loss))  # ran the explicit path (cuDNN's kernel cannot run on this CPU)


def test_fused_attention_equals_the_explicit_one():
    cfg = SMALL
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.emb_dim))
    mask = (jnp.arange(11)[:, None] >= jnp.arange(11)[None, :])[None, None]
    explicit = model.CausalSelfAttention(cfg)
    params = explicit.init(jax.random.key(1), x, mask, None, None, True)

    def run(fused, p, x):
        return model.CausalSelfAttention(cfg, fused=fused).apply(p, x, mask, None, None, True)[0]

    np.testing.assert_allclose(run("xla", params, x), run(None, params, x), atol=1e-6, rtol=0)
    grad = lambda fused: jax.grad(lambda p, x: (run(fused, p, x) ** 2).sum(), argnums=(0, 1))(params, x)
    for g_fused, g_explicit in zip(jax.tree.leaves(grad("xla")), jax.tree.leaves(grad(None))):
        np.testing.assert_allclose(g_fused, g_explicit, atol=1e-5 * float(jnp.abs(g_explicit).max()), rtol=0)


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_train_steps_reach_the_fused_path_and_match(monkeypatch, task):
    """make_steps(attention=...) reaches every full block (the classifier's pooled last block
    stays explicit), and training takes the same steps."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    # "cudnn" needs a GPU: route the setting to JAX's own fused implementation instead.
    monkeypatch.setattr(model, "fused_attention", lambda attention, dtype, dropout=False: "xla" if attention == "cudnn" else None)
    cfg = SMALL.replace(num_classes=2) if task == "classification" else SMALL
    params = model.init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (4, 16)), jnp.int32)
    if task == "lm":
        batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    else:
        batch = {"tokens": tokens, "labels": jnp.asarray([0, 1, 1, 0]), "weights": jnp.ones(4)}
    opt = optim.adamw(1e-3, 0.1)
    losses = {}
    for attention in ("xla", "cudnn"):
        state = steps.init_state(params, optim.trainable_mask(cfg, params, "all"), opt)
        train_step, _ = steps.make_steps(cfg, opt, task, attention=attention)
        losses[attention] = []
        for _ in range(3):
            state, metrics = train_step(state, batch)
            losses[attention].append(float(metrics["loss"]))
    full_blocks = cfg.n_layers if task == "lm" else cfg.n_layers - 1
    assert calls == ["xla"] * full_blocks  # traced once; only the "cudnn" setting's steps
    np.testing.assert_allclose(losses["cudnn"], losses["xla"], atol=1e-6, rtol=0)
