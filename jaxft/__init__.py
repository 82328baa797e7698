"""jaxft: pure-functional GPT-2 fine-tuning in JAX/Flax/optax.

Weights:
    jaxft.load(path, config=None) -> (config, params)
    jaxft.logits(config, params, token_ids) -> fp32 array [batch, seq, vocab or num_classes]
    jaxft.export(config, params, path, format)   # "openai-tf", "hf", "torch-reference", "jaxft"

The functional pieces (README, "Functional API"): `apply` (the model), `with_classifier_head`,
`trainable_mask` + `masked` (one tree) or `split`/`merge` + `init_state` (two trees), `adamw`,
the loss functions `classification_metrics` / `lm_metrics`, `make_steps`, `evaluate`; data via
`get_tokenizer`, `jaxft.data`, `jaxft.sources`.
"""

__version__ = "0.1.0"  # first: modules imported below read it

from .config import GPTConfig, get_config
from .model import apply, init_params, logits, param_count
from .optim import adamw, masked, merge, split, trainable_mask
from .recipes.classify import with_classifier_head
from .steps import TrainState, classification_metrics, evaluate, init_state, lm_metrics, make_steps
from .tokenizer import encode_text, get_tokenizer
from .weights import FORMATS, export, load


__all__ = [
    "FORMATS",
    "GPTConfig",
    "TrainState",
    "adamw",
    "apply",
    "classification_metrics",
    "encode_text",
    "evaluate",
    "export",
    "get_config",
    "get_tokenizer",
    "init_params",
    "init_state",
    "lm_metrics",
    "load",
    "logits",
    "make_steps",
    "masked",
    "merge",
    "param_count",
    "split",
    "trainable_mask",
    "with_classifier_head",
    "__version__",
]
