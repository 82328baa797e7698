"""Weights in every format: round trips, format detection, and one clear error (naming the
file and the tensor) for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_gpt import random_reference_model
from safetensors.numpy import load_file, save_file

import jaxft
from jaxft import GPTConfig
from jaxft.weights import WeightsError, detect_format, hf, native, torch_ref
from jaxft.weights.common import expected_shapes, flatten, unflatten

TINY = GPTConfig(vocab_size=101, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
CLASSIFIER = TINY.replace(num_classes=2, tie_embeddings=False)  # what the reference classifier loads as


def random_params(config: GPTConfig, seed: int = 0) -> dict:
    """Random jaxft params in NumPy (no jit compile, unlike init_params): N(0, 0.05) matrices,
    N(0, 0.02) biases, LayerNorm scales near 1, so that no parameter is trivial."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("/scale"):
            flat[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            flat[name] = (0.05 if len(shape) > 1 else 0.02) * rng.standard_normal(shape)
    return unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def assert_same_params(a, b) -> None:
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY.replace(tie_embeddings=False), CLASSIFIER], ids=["tied", "untied", "classifier"])
def test_jaxft_round_trip(config, tmp_path):
    params = random_params(config)
    out = jaxft.export(config, params, tmp_path / "model", "jaxft", metadata={"classes": ["ham", "spam"]})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"]
    loaded_config, loaded = jaxft.load(out)
    assert loaded_config == config
    assert_same_params(loaded, params)
    assert native.load_metadata(out) == {"classes": ["ham", "spam"]}
    assert jaxft.load(out / "config.json")[0] == config  # the config file also names the model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_round_trip_with_config_json(tied, tmp_path):
    config = TINY.replace(tie_embeddings=tied)
    params = random_params(config)
    jaxft.export(config, params, tmp_path, "hf")
    keys = load_file(str(tmp_path / "model.safetensors"))
    assert "transformer.wte.weight" in keys and ("lm_head.weight" in keys) is (not tied)
    assert json.loads((tmp_path / "config.json").read_text())["n_head"] == 4

    loaded_config, loaded = jaxft.load(tmp_path)
    assert loaded_config.replace(name="custom") == config
    assert_same_params(loaded, params)
    assert_same_params(jaxft.load(tmp_path / "model.safetensors")[1], params)


def test_hf_without_prefix_and_without_config_json(tmp_path):
    """The hub's `gpt2` layout: no `transformer.` prefix; without config.json the heads come from `config`."""
    params = random_params(TINY)
    save_file(hf.params_to_state_dict(TINY, params, prefix=""), str(tmp_path / "model.safetensors"))
    assert detect_format(tmp_path) == "hf"
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(tmp_path)
    one_line_error(excinfo, str(tmp_path / "model.safetensors"), "pass config=")

    loaded_config, loaded = jaxft.load(tmp_path, config=TINY)
    assert loaded_config == TINY
    assert_same_params(loaded, params)
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config_json(TINY)))
    assert_same_params(jaxft.load(tmp_path)[1], params)


def test_hf_ignores_causal_mask_buffers(tmp_path):
    """Older transformers saved `h.N.attn.bias` / `masked_bias` buffers: not parameters."""
    params = random_params(TINY)
    tensors = hf.params_to_state_dict(TINY, params)
    for i in range(TINY.n_layers):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_same_params(jaxft.load(tmp_path, config=TINY)[1], params)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("config", [TINY.replace(tie_embeddings=False), CLASSIFIER], ids=["lm", "classifier"])
def test_torch_reference_round_trip(config, suffix, tmp_path):
    params = random_params(config)
    path = jaxft.export(config, params, tmp_path / f"model{suffix}", "torch-reference")
    assert detect_format(path) == "torch-reference"
    loaded_config, loaded = jaxft.load(path, config=TINY)  # the LM-or-classifier head is read from the file
    assert loaded_config == config
    assert_same_params(loaded, params)


def test_torch_reference_tied_params_export_as_a_copy(tmp_path):
    params = random_params(TINY)
    path = jaxft.export(TINY, params, tmp_path / "model.pth", "torch-reference")
    config, loaded = jaxft.load(path, config=TINY)
    assert config.tie_embeddings is False  # the reference always has its own out_head
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["wte"]["embedding"].T)


def test_nested_training_checkpoint(tmp_path):
    """The reference saves {"model_state_dict": ..., "optimizer_state_dict": ...}; `module.` prefixes too."""
    model = random_reference_model(TINY, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    model(torch.zeros((1, 4), dtype=torch.long)).sum().backward()
    optimizer.step()
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    _, nested = jaxft.load(path, config=TINY)
    _, direct = torch_ref.state_dict_to_params(TINY, model.state_dict())
    assert_same_params(nested, direct)

    prefixed = tmp_path / "data_parallel.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, prefixed)
    assert_same_params(jaxft.load(prefixed, config=TINY)[1], direct)


def test_config_as_size_name_or_hparams_file(tmp_path):
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps(TINY.to_hparams()))
    params = random_params(TINY.replace(tie_embeddings=False))
    path = jaxft.export(TINY.replace(tie_embeddings=False), params, tmp_path / "m.pth", "torch-reference")
    config, _ = jaxft.load(path, config=hparams)
    assert config.n_heads == 4
    with pytest.raises(WeightsError, match="the checkpoint has vocab_size=101, but the config says 50257"):
        jaxft.load(path, config="124M")
    with pytest.raises(ValueError, match="neither a GPT-2 size name nor an hparams.json"):
        jaxft.load(path, config="gpt-7")


def test_export_errors(tmp_path):
    params = random_params(CLASSIFIER)
    with pytest.raises(WeightsError, match="classification model cannot be written as a Hugging Face"):
        jaxft.export(CLASSIFIER, params, tmp_path / "hf", "hf")
    with pytest.raises(ValueError, match="needs a .pth, .pt or .safetensors file name"):
        jaxft.export(CLASSIFIER, params, tmp_path / "model.bin.txt", "torch-reference")
    with pytest.raises(ValueError, match="unknown weights format 'onnx'"):
        jaxft.export(CLASSIFIER, params, tmp_path / "x", "onnx")
    incomplete = {**params, "cls_head": {"kernel": params["cls_head"]["kernel"]}}
    with pytest.raises(WeightsError, match="missing parameter\\(s\\): cls_head/bias"):
        jaxft.export(CLASSIFIER, incomplete, tmp_path / "j", "jaxft")



def _lora_model(config: GPTConfig) -> tuple[GPTConfig, dict]:
    """A model with LoRA adapters whose B is non-zero (add_lora starts B at 0: no effect)."""
    import jax

    from jaxft.lora import add_lora

    lcfg, lparams = add_lora(config, random_params(config), 2, 4.0, jax.random.key(1))
    rng = np.random.default_rng(3)
    for i in range(config.n_layers):
        for group, name in (("attn", "c_attn"), ("mlp", "c_proj")):
            layer = lparams[f"h_{i}"][group][name]
            layer["lora_b"] = 0.5 * rng.standard_normal(layer["lora_b"].shape).astype(np.float32)
    return lcfg, lparams


def test_lora_model_to_openai_keeps_the_adapters(tmp_path, monkeypatch, capsys):
    """`jaxft convert --to openai-tf` (and save_openai_checkpoint itself) fold the adapters in."""
    import jaxft.cli
    import jaxft.cli.app
    from jaxft.lora import merge_lora
    from jaxft.model import param_count
    from jaxft.weights.openai import save_openai_checkpoint

    lcfg, lparams = _lora_model(TINY)
    mcfg, merged = merge_lora(lcfg, lparams)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 16))
    want = np.asarray(jaxft.logits(mcfg, merged, ids))
    assert np.abs(want - np.asarray(jaxft.logits(TINY, lparams, ids))).max() > 1e-2  # the adapters matter

    jaxft.export(lcfg, lparams, tmp_path / "lora", "jaxft")
    monkeypatch.setattr(jaxft.cli.app, "COMMAND_MODULES", ("jaxft.cli.weights",))
    assert jaxft.cli.main(["convert", str(tmp_path / "lora"), str(tmp_path / "tf"), "--to", "openai-tf"]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapters (rank 2) are merged" in out and f"{param_count(merged):,} parameters" in out
    config, params = jaxft.load(tmp_path / "tf")
    assert config.lora_rank == 0
    np.testing.assert_allclose(np.asarray(jaxft.logits(config, params, ids)), want, rtol=0, atol=1e-5)

    save_openai_checkpoint(lcfg, lparams, tmp_path / "direct")
    np.testing.assert_allclose(np.asarray(jaxft.logits(*jaxft.load(tmp_path / "direct"), ids)), want, rtol=0, atol=1e-5)

# --- format detection -------------------------------------------------------------------------


def test_detect_format(tmp_path):
    params = random_params(TINY)
    jaxft.export(TINY, params, tmp_path / "native", "jaxft")
    jaxft.export(TINY, params, tmp_path / "hf", "hf")
    jaxft.export(TINY, params, tmp_path / "ref.pth", "torch-reference")
    jaxft.export(TINY, params, tmp_path / "ref.safetensors", "torch-reference")
    (tmp_path / "refdir").mkdir()
    (tmp_path / "ref.safetensors").rename(tmp_path / "refdir" / "model.safetensors")
    tf = tmp_path / "124M"
    tf.mkdir()
    (tf / "hparams.json").write_text(json.dumps(TINY.to_hparams()))
    (tf / "model.ckpt.index").write_bytes(b"")

    expected = {
        "native": "jaxft",
        "native/config.json": "jaxft",
        "native/params.safetensors": "jaxft",
        "hf": "hf",
        "hf/model.safetensors": "hf",
        "ref.pth": "torch-reference",
        "refdir": "torch-reference",
        "refdir/model.safetensors": "torch-reference",
        "124M": "openai-tf",
        "124M/hparams.json": "openai-tf",
        "124M/model.ckpt.index": "openai-tf",
        "124M/model.ckpt": "openai-tf",  # a TF checkpoint prefix, as TF names it
    }
    for name, fmt in expected.items():
        assert detect_format(tmp_path / name) == fmt, name
        assert detect_format(str(tmp_path / name)) == fmt, name

    (tmp_path / "hf" / "config.json").unlink()
    assert detect_format(tmp_path / "hf") == "hf"


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        detect_format(tmp_path / "nowhere")
    one_line_error(excinfo, str(tmp_path / "nowhere"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError) as excinfo:
        detect_format(tmp_path / "empty")
    one_line_error(excinfo, str(tmp_path / "empty"), "no GPT-2 checkpoint found")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError) as excinfo:
        detect_format(tmp_path / "notes.txt")
    one_line_error(excinfo, "notes.txt", "unknown checkpoint file type")

    save_file({"encoder.weight": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(tmp_path / "other.safetensors")
    one_line_error(excinfo, "other.safetensors", "unrecognised GPT-2 tensor names", "encoder.weight")


# --- error cases, per format -------------------------------------------------------------------


def _write(fmt: str, root: Path) -> tuple[Path, Path]:
    """A tiny checkpoint in `fmt` -> (path to load, the safetensors file holding its tensors)."""
    config = TINY.replace(tie_embeddings=False) if fmt == "torch-reference" else TINY
    params = random_params(config)
    if fmt == "torch-reference":
        path = jaxft.export(config, params, root / "model.safetensors", fmt)
        return path, path
    path = jaxft.export(config, params, root / "model", fmt)
    return path, path / ("params.safetensors" if fmt == "jaxft" else "model.safetensors")


def _edit(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


# (a tensor to drop or reshape, as the file names it; as the error names it)
TENSORS = {
    "jaxft": ("h_1/mlp/c_fc/bias", "h_1/mlp/c_fc/bias"),
    "hf": ("transformer.h.1.mlp.c_fc.bias", "h.1.mlp.c_fc.bias"),
    "torch-reference": ("trf_blocks.1.att.W_key.weight", "trf_blocks.1.att.W_key.weight"),
}
FMTS = list(TENSORS)


@pytest.mark.parametrize("fmt", FMTS)
def test_missing_tensor(fmt, tmp_path):
    path, file = _write(fmt, tmp_path)
    key, shown = TENSORS[fmt]
    _edit(file, lambda t: t.pop(key))
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(file), "missing", shown)


@pytest.mark.parametrize("fmt", FMTS)
def test_extra_tensor(fmt, tmp_path):
    path, file = _write(fmt, tmp_path)
    extra = {"jaxft": "h_9/ln_1/scale", "hf": "transformer.h.0.attn.rotary", "torch-reference": "trf_blocks.0.att.rotary"}[fmt]
    _edit(file, lambda t: t.update({extra: np.zeros(4, np.float32)}))
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(file), "unexpected", extra.removeprefix("transformer."))


@pytest.mark.parametrize("fmt", FMTS)
def test_wrong_shape(fmt, tmp_path):
    path, file = _write(fmt, tmp_path)
    key, shown = TENSORS[fmt]

    def grow(tensors):
        value = tensors[key]
        tensors[key] = np.zeros(value.shape[:-1] + (value.shape[-1] + 1,), np.float32)

    _edit(file, grow)
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(file), f"tensor {shown} has shape", "expected")


@pytest.mark.parametrize("fmt", FMTS)
def test_truncated_safetensors(fmt, tmp_path):
    path, file = _write(fmt, tmp_path)
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    # Cut the file in the middle of the tensor whose bytes end last but one: it is the one to name.
    by_end = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (start, end), victim = by_end[-2][0], by_end[-2][1]
    file.write_bytes(data[: 8 + header_len + (start + end) // 2])
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(file), f"truncated: tensor {victim} ", "2 of ")


def test_truncated_and_missing_pth(tmp_path):
    path = jaxft.export(TINY, random_params(TINY), tmp_path / "model.pth", "torch-reference")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(path), "cannot read PyTorch file")

    with pytest.raises(FileNotFoundError) as excinfo:
        jaxft.load(tmp_path / "missing.pth", config=TINY)
    one_line_error(excinfo, str(tmp_path / "missing.pth"))


def test_missing_params_file_in_jaxft_dir(tmp_path):
    path, file = _write("jaxft", tmp_path)
    file.unlink()
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path)
    one_line_error(excinfo, str(file), "file not found")


def test_reference_state_dict_needs_config(tmp_path):
    path, _ = _write("torch-reference", tmp_path)
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path)
    one_line_error(excinfo, str(path), "does not record the number of attention heads", "pass config=")


@pytest.mark.parametrize("fmt", FMTS)
def test_config_mismatch(fmt, tmp_path):
    path, file = _write(fmt, tmp_path)
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY.replace(n_layers=3))
    message = one_line_error(excinfo, "n_layers=2", "config says 3")
    assert str(tmp_path) in message


def test_non_float_tensor(tmp_path):
    path, file = _write("torch-reference", tmp_path)
    _edit(file, lambda t: t.update({"final_norm.scale": np.ones(32, np.int64)}))
    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(file), "final_norm.scale", "dtype int64")


# --- no arbitrary unpickling -------------------------------------------------------------------


def _touch(path: str) -> None:
    Path(path).touch()


class _Payload:
    """Unpickling this object (a full, unsafe unpickle) would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pth_with_a_custom_class_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    state_dict = random_reference_model(TINY).state_dict()
    path = tmp_path / "model.pth"
    torch.save({**state_dict, "payload": _Payload(marker)}, path)
    assert not marker.exists()

    with pytest.raises(WeightsError) as excinfo:
        jaxft.load(path, config=TINY)
    one_line_error(excinfo, str(path), "refused", "_touch", "weights_only=True")
    assert not marker.exists()
    with pytest.raises(WeightsError):
        detect_format(path)
    assert not marker.exists()

    # The file really is dangerous: a full unpickle runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- non-finite weights -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt, name", [("jaxft", "model"), ("hf", "hf"), ("torch-reference", "model.pth"),
                                       ("torch-reference", "model.safetensors"), ("openai-tf", "tf")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(fmt, name, bad, tmp_path):
    """A diverged run's weights load in no format: they would classify as class 0, generate
    token 0 and train to a NaN loss at step 1, each blamed on something else."""
    params = random_params(TINY)
    params["h_1"]["attn"]["c_proj"]["kernel"][2, 7] = bad
    params["h_1"]["attn"]["c_proj"]["kernel"][3, 1] = bad
    path = jaxft.export(TINY, params, tmp_path / name, fmt)
    with pytest.raises(WeightsError) as info:
        jaxft.load(path, TINY)
    message = str(info.value)
    assert "h_1/attn/c_proj/kernel holds 2 non-finite value(s) (NaN or inf) of 1024" in message and "\n" not in message
    assert message.startswith(str(tmp_path / name))


def test_the_finite_check_is_one_reduction_over_the_tree(tmp_path, monkeypatch):
    """Cheap on a large model: on the device, one fused reduction (one scalar back) and a tensor
    looked for only when it fails; host arrays as `load` reads them are checked where they lie
    (no copy to the device, no compile)."""
    import jax

    from jaxft.weights import common

    calls = []
    real = common._all_finite
    monkeypatch.setattr(common, "_all_finite", lambda leaves: calls.append(len(leaves)) or real(leaves))
    jaxft.export(TINY, random_params(TINY), tmp_path / "model", "jaxft")
    config, params = jaxft.load(tmp_path / "model")
    assert calls == []
    on_device = jax.device_put(params)
    monkeypatch.setattr(common.np, "count_nonzero", lambda *a: pytest.fail("a leaf was inspected on finite weights"))
    common.check_finite("model", on_device)
    assert calls == [len(expected_shapes(TINY))]
    monkeypatch.undo()
    on_device["ln_f"]["bias"] = on_device["ln_f"]["bias"].at[0].set(float("nan"))
    with pytest.raises(WeightsError, match="model: tensor ln_f/bias holds 1 non-finite value"):
        common.check_finite("model", on_device)
