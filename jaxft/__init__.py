"""jaxft: pure-functional GPT-2 fine-tuning in JAX/Flax/optax.

Weights:
    jaxft.load(path, config=None) -> (config, params)
    jaxft.logits(config, params, token_ids) -> fp32 array [batch, seq, vocab or num_classes]
    jaxft.export(config, params, path, format)   # "openai-tf", "hf", "torch-reference", "jaxft"

The functional pieces (README, "Functional API"): `apply` (the model), `with_classifier_head`,
`trainable_mask` + `masked` (one tree) or `split`/`merge` + `init_state` (two trees), `adamw`,
the loss functions `classification_metrics` / `lm_metrics`, `make_steps`, `evaluate`; data via
`get_tokenizer`, `jaxft.data`, `jaxft.sources`.

Importing jaxft imports none of this: each name (and each submodule, `jaxft.train`, ...) is
imported when first used, so that `jaxft --help` and scripts that need a part start fast.
"""

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"  # (modules read it: defined before any of them is imported)

_EXPORTS = {  # public name -> the module that defines it
    "FORMATS": "weights",
    "GPTConfig": "config",
    "TrainState": "steps",
    "adamw": "optim",
    "apply": "model",
    "classification_metrics": "steps",
    "encode_text": "tokenizer",
    "evaluate": "steps",
    "export": "weights",
    "get_config": "config",
    "get_tokenizer": "tokenizer",
    "init_params": "model",
    "init_state": "steps",
    "lm_metrics": "steps",
    "load": "weights",
    "logits": "model",
    "make_steps": "steps",
    "masked": "optim",
    "merge": "optim",
    "param_count": "model",
    "split": "optim",
    "trainable_mask": "optim",
    "with_classifier_head": "recipes.classify",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
