"""GPT-2 model configurations: the four OpenAI sizes, OpenAI `hparams.json`, custom sizes.

A config is a frozen (hashable) dataclass, so it can be a static argument under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """Shape and behaviour of a GPT-2 model.

    `tie_embeddings`: the LM head is `wte` transposed (OpenAI, Hugging Face); otherwise a
    separate `lm_head` matrix without bias (the PyTorch reference's `out_head`).
    `num_classes`: when set, the LM head is replaced by a classification head
    `Dense(emb_dim -> num_classes)` with bias, named `cls_head`.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    num_classes: int | None = None
    layer_norm_eps: float = 1e-5
    lora_rank: int = 0  # > 0: low-rank adapters on every block projection (see model.LoRADense)
    lora_alpha: float = 16.0  # LoRA updates are scaled by lora_alpha / lora_rank
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{field} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"GPTConfig.lora_rank must be a non-negative integer, got {self.lora_rank!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"GPTConfig.num_classes must be an integer >= 2, got {self.num_classes!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def head_kind(self) -> str:
        return "classification" if self.num_classes is not None else "tied" if self.tie_embeddings else "untied LM"

    def param_names(self, head: bool = True) -> set[str]:
        """The top-level names of this model's parameter tree (see jaxft.model): embeddings, blocks,
        final norm and, with `head`, the head's own (none when it is tied to `wte`)."""
        names = {"wte", "wpe", "ln_f", *(f"h_{i}" for i in range(self.n_layers))}
        own_head = {"classification": "cls_head", "untied LM": "lm_head"}.get(self.head_kind)
        return names | ({own_head} if head and own_head else set())

    def check_params(self, params: Any, head: bool = True) -> None:
        """One line when a parameter tree lacks names this model needs: another model's parameters."""
        if head and self.num_classes is None and "cls_head" in params:
            raise ValueError("the parameters have a classification head (cls_head) but this config has no num_classes")
        missing = sorted(self.param_names(head) - set(params), key=lambda n: (len(n), n))
        if missing:
            raise ValueError(f"the parameters lack {', '.join(missing[:3])}{' ...' * (len(missing) > 3)}, which this config "
                             f"({self.n_layers} blocks, {self.head_kind} head) needs: they belong to another model")

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_hparams(self) -> dict[str, int]:
        """The OpenAI `hparams.json` view of this config."""
        return {
            "n_vocab": self.vocab_size,
            "n_ctx": self.context_length,
            "n_embd": self.emb_dim,
            "n_head": self.n_heads,
            "n_layer": self.n_layers,
        }


# The reference's spellings are the canonical names; short aliases resolve to them.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

# Directory names of the OpenAI checkpoint ("124M") per canonical name.
OPENAI_SIZE_DIRS: dict[str, str] = {
    "gpt2-small (124M)": "124M",
    "gpt2-medium (355M)": "355M",
    "gpt2-large (774M)": "774M",
    "gpt2-xl (1558M)": "1558M",
}


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for canonical, size_dir in OPENAI_SIZE_DIRS.items():
        short = canonical.split(" ")[0]  # "gpt2-small"
        for alias in (canonical, short, size_dir, short.replace("gpt2-", ""), f"gpt2-{size_dir}"):
            table[alias.lower()] = canonical
    table["gpt2"] = "gpt2-small (124M)"
    return table


ALIASES = _aliases()


def canonical_name(name: str) -> str:
    """Map any accepted spelling ("124M", "gpt2-small", "gpt2-small (124M)") to the reference's."""
    try:
        return ALIASES[name.strip().lower()]
    except KeyError:
        choices = ", ".join(sorted(MODEL_SIZES))
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of: {choices} (or 124M/355M/774M/1558M)") from None


def is_size_name(name: str) -> bool:
    return name.strip().lower() in ALIASES


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """The config of a named GPT-2 size, with optional field overrides (e.g. drop_rate)."""
    canonical = canonical_name(name)
    return GPTConfig(name=canonical, **{**MODEL_SIZES[canonical], **overrides})


def from_hparams(hparams: dict[str, Any] | str | Path, **overrides: Any) -> GPTConfig:
    """Build a config from an OpenAI `hparams.json` (a dict or a path to the file)."""
    source = "hparams"
    if not isinstance(hparams, dict):
        source = str(hparams)
        try:
            hparams = json.loads(Path(hparams).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{source}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(hparams, dict):
        raise ValueError(f"{source}: not an hparams object ({{\"n_vocab\": ..., \"n_ctx\": ..., ...}}), got a JSON {type(hparams).__name__}")
    required = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    missing = [key for key in required if key not in hparams]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    for key in required:
        value = hparams[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not str(value).strip().isdigit() or int(value) < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    fields = dict(
        vocab_size=int(hparams["n_vocab"]),
        context_length=int(hparams["n_ctx"]),
        emb_dim=int(hparams["n_embd"]),
        n_heads=int(hparams["n_head"]),
        n_layers=int(hparams["n_layer"]),
    )
    name = "custom"
    for canonical, dims in MODEL_SIZES.items():
        if all(fields[k] == v for k, v in dims.items()) and fields["vocab_size"] == 50257:
            name = canonical
    return GPTConfig(name=name, **{**fields, **overrides})
