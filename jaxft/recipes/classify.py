"""Classification fine-tuning (the seed's SMS spam recipe, any labelled text data).

A pretrained GPT-2 gets a new `Dense(emb -> num_classes)` head; by default only the head,
the final LayerNorm and the last block train (AdamW 5e-5, weight decay 0.1, 5 epochs,
batch 8), and the class is predicted from the last token's logits. Every variant of the
reference's follow-up experiments is a setting of `ClassifierRecipe`, not a code change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import losses, model, optim, train, weights
from ..config import GPTConfig
from ..data import batching, spam
from ..lora import add_lora
from ..plots import plot_values
from ..tokenizer import PAD_ID, get_tokenizer
from .common import resolve_model, run_info, write_json

Params = dict[str, Any]


@dataclass(frozen=True)
class ClassifierRecipe:
    """Settings of a classification run; the defaults are the seed's."""

    model: str = "gpt2-small (124M)"
    init: str = "pretrained"  # or "random"
    trainable: str = "last-block"  # head | last-block | last-N-blocks | all | lora
    final_norm: bool | None = None  # default: trains unless trainable == "head"
    pooling: str = "last"  # last | last-non-pad | first | mean
    padding: str = "longest"  # longest (in the training set) | batch | bucket
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 50
    eval_iter: int = 5
    seed: int = 123
    max_length: int | None = None  # pad/truncate to this; default the longest training text
    drop_rate: float = 0.0
    accumulation_steps: int = 1
    grad_clip_norm: float | None = None
    lora_rank: int = 0  # > 0 adds LoRA adapters (train them with trainable="lora")
    lora_alpha: float = 16.0
    models_dir: str = "gpt2"
    export_pth: bool = False

    def validate(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of: {', '.join(PADDINGS)}")
        if self.pooling not in losses.POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(losses.POOLINGS)}")
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max-length must be >= 1, got {self.max_length}")


# --------------------------------------------------------------------------- model surgery


def with_classifier_head(config: GPTConfig, params: Params, num_classes: int, key: jax.Array) -> tuple[GPTConfig, Params]:
    """Replace the LM head by `Dense(emb_dim -> num_classes)` with bias.

    Initialised like torch's nn.Linear (uniform in ±1/sqrt(emb_dim) for weight and bias),
    so a run starts from the same distribution as the reference's.
    """
    bound = 1.0 / math.sqrt(config.emb_dim)
    k_w, k_b = jax.random.split(key)
    params = {k: v for k, v in params.items() if k not in ("lm_head", "cls_head")}
    params["cls_head"] = {
        "kernel": jax.random.uniform(k_w, (config.emb_dim, num_classes), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (num_classes,), jnp.float32, -bound, bound),
    }
    return config.replace(num_classes=num_classes), params


# --------------------------------------------------------------------------- batches


PADDINGS = ("longest", "batch", "bucket")
BUCKET_MULTIPLE = 16


def make_batches(
    split: spam.EncodedSplit,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epoch: int = 0,
    padding: str = "longest",
) -> Iterator[dict[str, np.ndarray]]:
    """Classification batches; a short final batch is padded with weight-0 rows.

    padding: "longest" keeps the split's width (the longest training text: one shape for the
    whole run, the seed's); "batch" cuts each batch to its longest text; "bucket" to that
    rounded up to a multiple of 16 (few shapes, little padding).
    """
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of: {', '.join(PADDINGS)}")
    arrays = {**split.arrays(), "weights": np.ones(len(split), np.float32)}
    fill = {"tokens": PAD_ID, "labels": 0, "lengths": 1, "weights": 0.0}
    for batch in batching.batches(arrays, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch):
        if padding != "longest":
            multiple = BUCKET_MULTIPLE if padding == "bucket" else 1
            width = min(-(-int(batch["lengths"].max()) // multiple) * multiple, split.length)
            batch = {**batch, "tokens": batch["tokens"][:, :width]}
        yield train.pad_rows(batch, batch_size, fill)


# --------------------------------------------------------------------------- prediction


def encode_for_classification(tokenizer: Any, text: str, max_length: int | None, context_length: int) -> tuple[list[int], int]:
    """Token ids truncated to min(max_length, context) and padded to max_length; and the real length.

    (The seed truncates with the wrong dimension of the position table; this uses the
    model's context length.)
    """
    ids = tokenizer.encode(text, disallowed_special=())
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

    def save(self, path: str | Path) -> Path:
        metadata = {"task": "classification", "class_names": self.class_names, "max_length": self.max_length, "pooling": self.pooling}
        return weights.export(self.config, self.params, path, "jaxft", metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None) -> "Classifier":
        from ..weights import native

        config, params = weights.load(path)
        meta = native.load_metadata(path)
        if config.num_classes is None:
            raise ValueError(f"{path}: not a classification model (it has no classification head)")
        names = meta.get("class_names") or [str(i) for i in range(config.num_classes)]
        return cls(config, params, list(names), meta.get("max_length"), meta.get("pooling", "last"), tokenizer)


def classify_review(text: str, classifier: Classifier) -> str:
    """The seed's `classify_review`: its spam model answers "spam" or "not spam"."""
    label = classifier.classify(text)
    if classifier.class_names == ["ham", "spam"]:
        return "spam" if label == "spam" else "not spam"
    return label


# --------------------------------------------------------------------------- the run


@dataclass
class ClassificationData:
    train: spam.EncodedSplit
    validation: spam.EncodedSplit
    test: spam.EncodedSplit
    class_names: list[str]
    max_length: int


def encode_splits(
    frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    class_names: list[str],
    tokenizer: Any,
    *,
    max_length: int | None,
    context_length: int,
) -> ClassificationData:
    """Pad to the longest training text (or `max_length`), never beyond the context."""
    train_split, val_split, test_split = spam.encode_splits(*frames, tokenizer, max_length, context_length=context_length)
    return ClassificationData(train_split, val_split, test_split, list(class_names), train_split.length)


def run(
    recipe: ClassifierRecipe,
    out_dir: str | Path,
    frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    class_names: Sequence[str],
    tokenizer: Any,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune on (train, validation, test) frames (`Label` ids, `Text`), evaluate, plot and
    save. Returns the metrics (also written to out_dir/metrics.json)."""
    recipe.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_train = len(frames[0])
    if recipe.batch_size > n_train:
        raise ValueError(f"batch size {recipe.batch_size} is larger than the {n_train} training examples (drop_last would leave no batch)")

    key_model, key_head, key_lora = jax.random.split(jax.random.PRNGKey(recipe.seed), 3)
    config, params = resolve_model(recipe.model, init=recipe.init, models_dir=recipe.models_dir, key=key_model, drop_rate=recipe.drop_rate)
    data = encode_splits(frames, list(class_names), tokenizer, max_length=recipe.max_length, context_length=config.context_length)
    config, params = with_classifier_head(config, params, len(data.class_names), key_head)
    if recipe.lora_rank:
        config, params = add_lora(config, params, recipe.lora_rank, recipe.lora_alpha, key_lora)

    mask = optim.trainable_mask(config, params, recipe.trainable, recipe.final_norm)
    optimizer = optim.adamw(
        recipe.lr, recipe.weight_decay, grad_clip_norm=recipe.grad_clip_norm, accumulation_steps=recipe.accumulation_steps
    )
    state = train.init_state(params, mask, optimizer, seed=recipe.seed)
    train_step, eval_step = train.make_steps(config, optimizer, "classification", pooling=recipe.pooling)
    log(
        f"model {config.name}: {model.param_count(params):,} parameters, "
        f"{optim.count(state.trainable):,} trainable ({recipe.trainable}); "
        f"{n_train} training examples padded to {data.max_length} tokens"
    )

    bs, seed = recipe.batch_size, recipe.seed
    pad = recipe.padding
    train_batches = lambda epoch: make_batches(data.train, bs, shuffle=True, drop_last=True, seed=seed, epoch=epoch, padding=pad)
    val_batches = lambda: make_batches(data.validation, bs, shuffle=False, drop_last=False, seed=seed, padding=pad)
    test_batches = lambda: make_batches(data.test, bs, shuffle=False, drop_last=False, seed=seed, padding=pad)

    initial = {
        "train": train.evaluate(eval_step, state.params, train_batches(0), recipe.eval_iter),
        "validation": train.evaluate(eval_step, state.params, val_batches(), recipe.eval_iter),
    }
    log(f"Initial loss on {recipe.eval_iter} batches: train {initial['train']['loss']:.3f}, validation {initial['validation']['loss']:.3f}")

    train_accs: list[float] = []
    val_accs: list[float] = []

    def on_epoch_end(state: train.TrainState, epoch: int, history: train.History) -> None:
        params = state.params
        train_acc = train.evaluate(eval_step, params, train_batches(epoch), recipe.eval_iter)["accuracy"]
        val_acc = train.evaluate(eval_step, params, val_batches(), recipe.eval_iter)["accuracy"]
        train_accs.append(train_acc)
        val_accs.append(val_acc)
        log(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")

    state, history = train.train_loop(
        state,
        train_step,
        eval_step,
        train_batches,
        val_batches,
        num_epochs=recipe.epochs,
        eval_freq=recipe.eval_freq,
        eval_iter=recipe.eval_iter,
        seen_per_batch=lambda batch: int(batch["weights"].sum()),
        on_epoch_end=on_epoch_end,
        log=log,
    )
    log(f"Training completed in {history['seconds'] / 60:.2f} minutes.")

    params = state.params
    final = {
        "train": train.evaluate(eval_step, params, train_batches(recipe.epochs)),
        "validation": train.evaluate(eval_step, params, val_batches()),
        "test": train.evaluate(eval_step, params, test_batches()),
    }
    for name in ("train", "validation", "test"):
        log(f"{name.capitalize()} accuracy: {final[name]['accuracy'] * 100:.2f}%")

    plots = []
    if history["train_losses"]:
        plots += plot_values(recipe.epochs, history["total_seen"], history["train_losses"], history["val_losses"], out_dir, "loss")
    plots += plot_values(recipe.epochs, history["total_seen"], train_accs, val_accs, out_dir, "accuracy")

    params = jax.device_get(params)
    classifier = Classifier(config, params, data.class_names, data.max_length, recipe.pooling, tokenizer=tokenizer)
    model_dir = classifier.save(out_dir / "model")
    outputs = {"model": str(model_dir), "plots": [str(p) for p in plots]}
    if recipe.export_pth:
        outputs["torch_reference"] = str(weights.export(config, params, out_dir / "review_classifier.pth", "torch-reference"))

    metrics = {
        "train_accuracy": final["train"]["accuracy"],
        "validation_accuracy": final["validation"]["accuracy"],
        "test_accuracy": final["test"]["accuracy"],
        "train_loss": final["train"]["loss"],
        "validation_loss": final["validation"]["loss"],
        "test_loss": final["test"]["loss"],
        "initial_train_loss": initial["train"]["loss"],
        "initial_validation_loss": initial["validation"]["loss"],
        "epoch_train_accuracy": train_accs,
        "epoch_validation_accuracy": val_accs,
        "eval_steps": history["steps"],
        "eval_train_losses": history["train_losses"],
        "eval_validation_losses": history["val_losses"],
        "examples_seen": history["total_seen"],
        "steps": history["total_steps"],
        "train_seconds": history["seconds"],
        "train_step_compilations": train.compile_count(train_step),
        "eval_step_compilations": train.compile_count(eval_step),
        "class_names": data.class_names,
        "split_sizes": {"train": n_train, "validation": len(data.validation.labels), "test": len(data.test.labels)},
        "padded_length": data.max_length,
        "recipe": dataclasses.asdict(recipe),
        "outputs": outputs,
        "run": run_info(),
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
