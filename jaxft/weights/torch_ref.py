"""The PyTorch reference `GPTModel` state dict (the reference's `.pth` files), in and out.

Reference layout: `nn.Linear` weights are [out, in] and q, k, v are three matrices
(`W_query`, `W_key`, `W_value`); jaxft fuses them into `c_attn/kernel` [d, 3d] (q | k | v).
Each attention module also stores its causal mask as a buffer (`trf_blocks.N.att.mask`),
which is ignored on import and written on export so `load_state_dict(strict=True)` works.
The reference keeps a separate `out_head` (no bias for the LM, with bias for classifiers).
"""

from __future__ import annotations

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

_BLOCK_LINEAR = {  # reference module -> jaxft flat key (without the h_i/ prefix)
    "att.out_proj": "attn/c_proj",
    "ff.layers.0": "mlp/c_fc",
    "ff.layers.2": "mlp/c_proj",
}
_BLOCK_NORM = {"norm1": "ln_1", "norm2": "ln_2"}


def is_reference_state_dict(keys: Any) -> bool:
    return "tok_emb.weight" in set(keys)


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """Accept {"model_state_dict": ...} checkpoints and `module.`/`_orig_mod.` prefixes."""
    if isinstance(obj, dict) and "model_state_dict" in obj and isinstance(obj["model_state_dict"], dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def config_from_state_dict(state_dict: dict[str, Any], config: GPTConfig | None, source: str) -> GPTConfig:
    """The config of a reference state dict: dims from its shapes, head count from `config`."""
    if "tok_emb.weight" not in state_dict or "pos_emb.weight" not in state_dict:
        raise WeightsError(f"{source}: not a reference GPTModel state dict (no tok_emb.weight / pos_emb.weight)")
    if config is None:
        raise WeightsError(
            f"{source}: a PyTorch reference state dict does not record the number of attention heads; "
            "pass config=... (a size name such as 'gpt2-small', an hparams.json, or a GPTConfig; "
            "on the command line, --config)"
        )
    vocab, emb = _numpy(state_dict["tok_emb.weight"]).shape
    ctx = _numpy(state_dict["pos_emb.weight"]).shape[0]
    layers = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("trf_blocks.")), default=-1)
    found = {"vocab_size": vocab, "emb_dim": emb, "context_length": ctx, "n_layers": layers}
    for field, value in found.items():
        if getattr(config, field) != value:
            raise WeightsError(f"{source}: the checkpoint has {field}={value}, but the config says {getattr(config, field)}")
    num_classes = None
    if "out_head.weight" in state_dict:
        rows = _numpy(state_dict["out_head.weight"]).shape[0]
        if "out_head.bias" in state_dict or rows != vocab:
            num_classes = rows
    return config.replace(
        tie_embeddings=False,
        num_classes=num_classes,
        qkv_bias="trf_blocks.0.att.W_query.bias" in state_dict,
    )


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the reference state dict for `config` (mask buffers aside), with its shape."""
    d, v = config.emb_dim, config.vocab_size
    head_rows = v if config.num_classes is None else config.num_classes
    shapes = {
        "tok_emb.weight": (v, d),
        "pos_emb.weight": (config.context_length, d),
        "final_norm.scale": (d,),
        "final_norm.shift": (d,),
        "out_head.weight": (head_rows, d),
    }
    if config.num_classes is not None:
        shapes["out_head.bias"] = (config.num_classes,)
    linear = {"att.out_proj": (d, d), "ff.layers.0": (4 * d, d), "ff.layers.2": (d, 4 * d)}  # [out, in]
    for i in range(config.n_layers):
        b = f"trf_blocks.{i}"
        for proj in ("W_query", "W_key", "W_value"):
            shapes[f"{b}.att.{proj}.weight"] = (d, d)
            if config.qkv_bias:
                shapes[f"{b}.att.{proj}.bias"] = (d,)
        for module, (rows, cols) in linear.items():
            shapes[f"{b}.{module}.weight"] = (rows, cols)
            shapes[f"{b}.{module}.bias"] = (rows,)
        for module in _BLOCK_NORM:
            shapes[f"{b}.{module}.scale"] = (d,)
            shapes[f"{b}.{module}.shift"] = (d,)
    return shapes


def state_dict_to_params(
    config: GPTConfig | None, state_dict: dict[str, Any], source: str = "state dict"
) -> tuple[GPTConfig, Params]:
    """Reference state dict (torch tensors or arrays) -> (config, jaxft params)."""
    state_dict = unwrap_state_dict(state_dict, source)
    config = config_from_state_dict(state_dict, config, source)
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(".att.mask")}
    shapes = _expected_shapes(config)
    check_keys(source, tensors, shapes)
    # Check shapes under the reference's names before fusing q/k/v, so the error names the tensor the user has.
    check_shapes(source, tensors, shapes)
    get = lambda key: to_float32(source, key, _numpy(tensors[key]))

    flat = {"wte/embedding": get("tok_emb.weight"), "wpe/embedding": get("pos_emb.weight")}
    for i in range(config.n_layers):
        b, h = f"trf_blocks.{i}", f"h_{i}"
        qkv = [get(f"{b}.att.{p}.weight").T for p in ("W_query", "W_key", "W_value")]
        flat[f"{h}/attn/c_attn/kernel"] = np.concatenate(qkv, axis=1)
        if config.qkv_bias:
            flat[f"{h}/attn/c_attn/bias"] = np.concatenate(
                [get(f"{b}.att.{p}.bias") for p in ("W_query", "W_key", "W_value")]
            )
        for module, name in _BLOCK_LINEAR.items():
            flat[f"{h}/{name}/kernel"] = np.ascontiguousarray(get(f"{b}.{module}.weight").T)
            flat[f"{h}/{name}/bias"] = get(f"{b}.{module}.bias")
        for module, name in _BLOCK_NORM.items():
            flat[f"{h}/{name}/scale"] = get(f"{b}.{module}.scale")
            flat[f"{h}/{name}/bias"] = get(f"{b}.{module}.shift")
    flat["ln_f/scale"] = get("final_norm.scale")
    flat["ln_f/bias"] = get("final_norm.shift")
    head = np.ascontiguousarray(get("out_head.weight").T)
    if config.num_classes is not None:
        flat["cls_head/kernel"] = head
        flat["cls_head/bias"] = get("out_head.bias")
    else:
        flat["lm_head/kernel"] = head
    check_params(source, config, flat)
    return config, unflatten(flat)


def params_to_state_dict(config: GPTConfig, params: Params, include_mask: bool = True) -> dict[str, np.ndarray]:
    """jaxft params -> the reference's state dict (NumPy arrays, fp32).

    A tied LM head is written out as a copy of the token embedding (the reference's
    `out_head` is a separate matrix). `include_mask` adds the causal-mask buffers that
    the reference's `load_state_dict(strict=True)` expects.
    """
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    check_params("params", config, flat)
    d = config.emb_dim
    sd = {"tok_emb.weight": flat["wte/embedding"], "pos_emb.weight": flat["wpe/embedding"]}
    ctx = config.context_length
    mask = np.triu(np.ones((ctx, ctx), dtype=np.float32), k=1) if include_mask else None
    for i in range(config.n_layers):
        b, h = f"trf_blocks.{i}", f"h_{i}"
        kernel = flat[f"{h}/attn/c_attn/kernel"]
        for j, p in enumerate(("W_query", "W_key", "W_value")):
            sd[f"{b}.att.{p}.weight"] = np.ascontiguousarray(kernel[:, j * d : (j + 1) * d].T)
            if config.qkv_bias:
                sd[f"{b}.att.{p}.bias"] = flat[f"{h}/attn/c_attn/bias"][j * d : (j + 1) * d].copy()
        if mask is not None:
            sd[f"{b}.att.mask"] = mask
        for module, name in _BLOCK_LINEAR.items():
            sd[f"{b}.{module}.weight"] = np.ascontiguousarray(flat[f"{h}/{name}/kernel"].T)
            sd[f"{b}.{module}.bias"] = flat[f"{h}/{name}/bias"]
        for module, name in _BLOCK_NORM.items():
            sd[f"{b}.{module}.scale"] = flat[f"{h}/{name}/scale"]
            sd[f"{b}.{module}.shift"] = flat[f"{h}/{name}/bias"]
    sd["final_norm.scale"] = flat["ln_f/scale"]
    sd["final_norm.shift"] = flat["ln_f/bias"]
    if config.num_classes is not None:
        sd["out_head.weight"] = np.ascontiguousarray(flat["cls_head/kernel"].T)
        sd["out_head.bias"] = flat["cls_head/bias"]
    elif config.tie_embeddings:
        sd["out_head.weight"] = flat["wte/embedding"].copy()
    else:
        sd["out_head.weight"] = np.ascontiguousarray(flat["lm_head/kernel"].T)
    return sd
