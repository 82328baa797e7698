"""A fine-tuned classifier at work: raw text in, class out, encoded exactly as the training
texts were (`tokenizer.encode_text`: user text never becomes a special token)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from . import losses, model, train, weights
from .config import GPTConfig
from .model import Params
from .recipes.common import check_vocabulary
from .tokenizer import PAD_ID, encode_text, get_tokenizer
from .weights import sidecar


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


BATCH_ROWS = 64  # texts per forward pass: memory stays bounded for a file of thousands of lines
WIDTH_MULTIPLE = 32  # without a trained padded length, widths are rounded up to this: few compilations


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
        """[len(texts), classes]. In batches of BATCH_ROWS rows of one width (one compilation):
        the trained padded length; without one (a converted model), the longest text rounded up
        to WIDTH_MULTIPLE, each text then read at its own last token, never at padding."""
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {i + 1} is empty: nothing to classify (training refuses empty texts too)")
        encoded = [encode_for_classification(self.tokenizer, t, self.max_length, self.config.context_length) for t in texts]
        # An id beyond the embedding table reads NaN (which padding spreads to every position), not an error.
        check_vocabulary("the classifier", self.config, max([PAD_ID, *(max(ids) for ids, _ in encoded)]), "the texts and padding use")
        pooling = self.pooling
        if self.max_length is None:
            longest = max((len(ids) for ids, _ in encoded), default=1)
            width = min(-(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, self.config.context_length)
            pooling = "last-non-pad" if pooling == "last" else pooling  # "last" of a row padded here would read padding
        else:
            width = min(self.max_length, self.config.context_length)
        probabilities = []
        for start in range(0, len(encoded), BATCH_ROWS):
            chunk = encoded[start : start + BATCH_ROWS]
            rows = min(BATCH_ROWS, len(encoded))  # a short last batch is padded: the same shape
            tokens = np.full((rows, width), PAD_ID, np.int32)
            lengths = np.ones(rows, np.int32)
            for row, (ids, n) in enumerate(chunk):
                tokens[row, : len(ids)], lengths[row] = ids, n
            logits = _predict(self.config, self.params, tokens, lengths, pooling)
            probabilities.append(np.asarray(jax.nn.softmax(logits, axis=-1))[: len(chunk)])
        result = np.concatenate(probabilities) if probabilities else np.zeros((0, self.config.num_classes), np.float32)
        broken = np.flatnonzero(~np.isfinite(result).all(axis=1))
        if broken.size:  # argmax of NaNs is class 0: a label that the model never gave
            raise ValueError(
                f"text {broken[0] + 1}{f' (and {broken.size - 1} more)' if broken.size > 1 else ''}: the classifier's "
                "probabilities are not finite (NaN or inf), so it has no answer; its weights overflow or are not finite"
            )
        return result

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
    def load(cls, path: str | Path, tokenizer: Any = None, config: GPTConfig | str | Path | None = None) -> "Classifier":
        """`config` (size name or hparams.json) for a reference state dict without its sidecar,
        which does not record its shape."""
        config, params, meta = weights.load_with_metadata(path, config)
        if config.num_classes is None:
            raise ValueError(f"{path}: not a classification model (it has no classification head)")
        if meta is None:
            warnings.warn(ConvertedClassifierWarning(
                f"{path} records no class names, trained padded length or pooling (only a jaxft model directory, or a "
                f"torch-reference file with its {sidecar.SUFFIX} sidecar, does): the classes are numbered and each text "
                "is read at its own last token"))
            meta = {}
        names = meta.get("class_names") or [str(i) for i in range(config.num_classes)]
        return cls(config, params, list(names), meta.get("max_length"), meta.get("pooling", "last"), tokenizer)


class ConvertedClassifierWarning(UserWarning):
    """A classifier loaded from another format than jaxft's model directory (a .pth, safetensors)."""


def classify_review(text: str, classifier: Classifier) -> str:
    """The reference's `classify_review`: its spam model answers "spam" or "not spam"."""
    label = classifier.classify(text)
    if classifier.class_names == ["ham", "spam"]:
        return "spam" if label == "spam" else "not spam"
    return label
