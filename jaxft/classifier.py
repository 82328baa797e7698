"""A fine-tuned classifier at work: raw text in, class out, encoded exactly as the training
texts were (`tokenizer.encode_text`: user text never becomes a special token)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from . import losses, model, train, weights
from .config import GPTConfig
from .model import Params
from .tokenizer import PAD_ID, encode_text, get_tokenizer
from .weights import native


def encode_for_classification(tokenizer: Any, text: str, max_length: int | None, context_length: int) -> tuple[list[int], int]:
    """Token ids truncated to min(max_length, context) and padded to max_length; and the real length.

    (The reference truncates with the wrong dimension of the position table; this uses the
    model's context length.)
    """
    ids = encode_text(tokenizer, text)  # the training texts' rule: user text is never a special token
    limit = context_length if max_length is None else min(max_length, context_length)
    ids = ids[:limit]
    length = max(len(ids), 1)
    if not ids:
        ids = [PAD_ID]
    if max_length is not None:
        ids = ids + [PAD_ID] * (limit - len(ids))
    return ids, length


@functools.partial(jax.jit, static_argnums=(0, 4))
def _predict(config: GPTConfig, params: Params, tokens: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    return losses.pool(model.apply(config, params, tokens), lengths, pooling)


@dataclass
class Classifier:
    """A fine-tuned classifier with what it needs to classify raw text."""

    config: GPTConfig
    params: Params
    class_names: list[str]
    max_length: int | None
    pooling: str = "last"
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = get_tokenizer()

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        encoded = [encode_for_classification(self.tokenizer, t, self.max_length, self.config.context_length) for t in texts]
        width = max(len(ids) for ids, _ in encoded)
        tokens = np.full((len(encoded), width), PAD_ID, np.int32)
        for row, (ids, _) in enumerate(encoded):
            tokens[row, : len(ids)] = ids
        lengths = np.array([n for _, n in encoded], np.int32)
        logits = _predict(self.config, self.params, tokens, lengths, self.pooling)
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def classify(self, text: str) -> str:
        return self.class_names[int(np.argmax(self.probabilities([text])[0]))]

    @staticmethod
    def metadata(class_names: list[str], max_length: int | None, pooling: str) -> dict[str, Any]:
        """What `load` needs besides the weights, stored in the model directory."""
        return {"task": "classification", "class_names": class_names, "max_length": max_length, "pooling": pooling}

    def save(self, path: str | Path) -> Path:
        metadata = self.metadata(self.class_names, self.max_length, self.pooling)
        return train.save_model_dir(self.config, self.params, Path(path), metadata)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None) -> "Classifier":
        config, params = weights.load(path)
        meta = native.load_metadata(path)
        if config.num_classes is None:
            raise ValueError(f"{path}: not a classification model (it has no classification head)")
        names = meta.get("class_names") or [str(i) for i in range(config.num_classes)]
        return cls(config, params, list(names), meta.get("max_length"), meta.get("pooling", "last"), tokenizer)


def classify_review(text: str, classifier: Classifier) -> str:
    """The reference's `classify_review`: its spam model answers "spam" or "not spam"."""
    label = classifier.classify(text)
    if classifier.class_names == ["ham", "spam"]:
        return "spam" if label == "spam" else "not spam"
    return label
