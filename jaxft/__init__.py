"""jaxft: pure-functional GPT-2 fine-tuning in JAX/Flax/optax.

The stable public API:
    jaxft.load(path, config=None) -> (config, params)
    jaxft.logits(config, params, token_ids) -> fp32 array [batch, seq, vocab or num_classes]
    jaxft.export(config, params, path, format)   # "openai-tf", "hf", "torch-reference", "jaxft"
"""

from .config import GPTConfig, get_config
from .model import init_params, logits
from .weights import FORMATS, export, load

__version__ = "0.1.0"

__all__ = ["FORMATS", "GPTConfig", "export", "get_config", "init_params", "load", "logits", "__version__"]
