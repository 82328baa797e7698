"""Hugging Face GPT-2 weights (`model.safetensors` + `config.json`), in and out.

HF's GPT-2 uses Conv1D, whose weights are [in, out] like Flax's Dense kernels, and the
fused `c_attn`, so the mapping is a renaming. Keys may carry a `transformer.` prefix
(as `GPT2LMHeadModel.save_pretrained` writes) or not (the hub's `gpt2` repository). The
causal-mask buffers some versions saved (`h.N.attn.bias`, `h.N.attn.masked_bias`) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPTConfig
from ..model import Params
from .common import (
    WeightsError,
    check_keys,
    check_params,
    check_shapes,
    flatten,
    to_float32,
    unflatten,
)

_BLOCK = {  # HF module -> jaxft flat key (without the h_i/ prefix)
    "ln_1.weight": "ln_1/scale",
    "ln_1.bias": "ln_1/bias",
    "attn.c_attn.weight": "attn/c_attn/kernel",
    "attn.c_attn.bias": "attn/c_attn/bias",
    "attn.c_proj.weight": "attn/c_proj/kernel",
    "attn.c_proj.bias": "attn/c_proj/bias",
    "ln_2.weight": "ln_2/scale",
    "ln_2.bias": "ln_2/bias",
    "mlp.c_fc.weight": "mlp/c_fc/kernel",
    "mlp.c_fc.bias": "mlp/c_fc/bias",
    "mlp.c_proj.weight": "mlp/c_proj/kernel",
    "mlp.c_proj.bias": "mlp/c_proj/bias",
}


def is_hf_state_dict(keys: Any) -> bool:
    keys = set(keys)
    return "wte.weight" in keys or "transformer.wte.weight" in keys


def config_from_hf_json(path: str | Path) -> GPTConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in data]
    if missing:
        raise WeightsError(f"{path}: missing key(s) {', '.join(missing)} (not a GPT-2 config.json?)")
    return GPTConfig(
        vocab_size=int(data["vocab_size"]),
        context_length=int(data.get("n_positions", data.get("n_ctx", 1024))),
        emb_dim=int(data["n_embd"]),
        n_layers=int(data["n_layer"]),
        n_heads=int(data["n_head"]),
        layer_norm_eps=float(data.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
    )


def _strip_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in tensors.items():
        key = key[len("transformer.") :] if key.startswith("transformer.") else key
        if key.endswith((".attn.bias", ".attn.masked_bias")) and key.count(".") == 3:
            continue  # causal-mask buffers, not parameters
        out[key] = value
    return out


def _expected_shapes(config: GPTConfig, has_head: bool) -> dict[str, tuple[int, ...]]:
    """Every HF GPT-2 tensor (prefix stripped) for `config`, with its shape (Conv1D: [in, out])."""
    d, v = config.emb_dim, config.vocab_size
    shapes = {"wte.weight": (v, d), "wpe.weight": (config.context_length, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    if has_head:
        shapes["lm_head.weight"] = (v, d)
    block = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, 4 * d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d),
        "mlp.c_proj.bias": (d,),
    }
    for i in range(config.n_layers):
        for key, shape in block.items():
            if config.qkv_bias or key != "attn.c_attn.bias":
                shapes[f"h.{i}.{key}"] = shape
    return shapes


def state_dict_to_params(config: GPTConfig, tensors: dict[str, Any], source: str = "state dict") -> tuple[GPTConfig, Params]:
    """HF GPT-2 tensors -> (config, jaxft params). The head is tied unless `lm_head.weight` differs from wte."""
    tensors = _strip_prefix(tensors)
    get = lambda key: to_float32(source, key, tensors[key])
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors:
            raise WeightsError(f"{source}: not a Hugging Face GPT-2 checkpoint (no {key})")
    vocab, emb = np.shape(tensors["wte.weight"])
    layers = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("h.")), default=-1)
    found = {"vocab_size": vocab, "emb_dim": emb, "n_layers": layers, "context_length": np.shape(tensors["wpe.weight"])[0]}
    for field, value in found.items():
        if getattr(config, field) != value:
            raise WeightsError(f"{source}: the checkpoint has {field}={value}, but the config says {getattr(config, field)}")
    has_head = "lm_head.weight" in tensors
    tied = not has_head or np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["wte.weight"]))
    config = config.replace(tie_embeddings=tied, num_classes=None, qkv_bias="h.0.attn.c_attn.bias" in tensors)

    shapes = _expected_shapes(config, has_head)
    check_keys(source, tensors, shapes)
    check_shapes(source, tensors, shapes)  # under HF's names, so the error names the tensor the user has

    flat = {"wte/embedding": get("wte.weight"), "wpe/embedding": get("wpe.weight")}
    for i in range(config.n_layers):
        for hf_key, key in _BLOCK.items():
            if f"h.{i}.{hf_key}" in tensors:
                flat[f"h_{i}/{key}"] = get(f"h.{i}.{hf_key}")
    flat["ln_f/scale"] = get("ln_f.weight")
    flat["ln_f/bias"] = get("ln_f.bias")
    if not tied:
        flat["lm_head/kernel"] = np.ascontiguousarray(get("lm_head.weight").T)
    check_params(source, config, flat)
    return config, unflatten(flat)


def params_to_state_dict(config: GPTConfig, params: Params, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """jaxft LM params -> HF GPT2LMHeadModel tensors (fp32)."""
    if config.num_classes is not None:
        raise WeightsError(
            "a classification model cannot be written as a Hugging Face GPT-2 LM checkpoint "
            "(HF's GPT2ForSequenceClassification head has no bias); use the 'jaxft' or 'torch-reference' format"
        )
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    check_params("params", config, flat)
    out = {f"{prefix}wte.weight": flat["wte/embedding"], f"{prefix}wpe.weight": flat["wpe/embedding"]}
    for i in range(config.n_layers):
        for hf_key, key in _BLOCK.items():
            if f"h_{i}/{key}" in flat:
                out[f"{prefix}h.{i}.{hf_key}"] = flat[f"h_{i}/{key}"]
    out[f"{prefix}ln_f.weight"] = flat["ln_f/scale"]
    out[f"{prefix}ln_f.bias"] = flat["ln_f/bias"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(flat["lm_head/kernel"].T)
    return out


def hf_config_json(config: GPTConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        # GPT-2's <|endoftext|>, only where the vocabulary has it (tiny test models do not).
        **({"bos_token_id": 50256, "eos_token_id": 50256} if config.vocab_size > 50256 else {}),
    }
