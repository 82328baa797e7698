"""Classification fine-tuning (the reference's SMS spam recipe, any labelled text data).

A pretrained GPT-2 gets a new `Dense(emb -> num_classes)` head; by default only the head,
the final LayerNorm and the last block train (AdamW 5e-5, weight decay 0.1, 5 epochs,
batch 8), and the class is predicted from the last token's logits. Every variant of the
reference's follow-up experiments is a setting of `ClassifierRecipe`, not a code change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import losses, optim, packing, sources, train, trunk
from ..classifier import Classifier
from ..config import GPTConfig
from ..data import batching, labeled, spam
from ..data.batching import PADDINGS
from ..lora import add_lora
from ..model import Params
from ..plots import plot_values
from ..tokenizer import PAD_ID
from ..resume import hash_arrays
from ..settings import TrainerSettings, run_mesh, setting
from ..timing import Timing
from .common import check_vocabulary, resolve_model


def _parse_name(value: str) -> str:
    return "reference" if value == "seed" else value  # "seed": the flag's earlier spelling


def _trainer_defaults() -> TrainerSettings:
    return TrainerSettings(model="gpt2-small (124M)", trainable="last-block", epochs=5, eval_freq=50, eval_iter=5)


@dataclass(frozen=True)
class ClassifierRecipe:
    """Settings of a classification run; the defaults are the reference's recipe."""

    trainer: TrainerSettings = field(default_factory=_trainer_defaults)
    data: str | None = setting(None, "a local label<TAB>text file such as SMSSpamCollection (default: the bundled SMS Spam Collection)", group="data")
    download: bool = setting(False, "download the original SMS Spam Collection (primary, then backup URL; hash-checked) instead of the bundled copy", group="data")
    data_dir: str = setting("sms_spam_collection", "where --download puts the SMS Spam Collection", group="data")
    parse: str = setting("reference", "reference: pandas' quote handling, as the reference (5,572 rows); exact: every line (5,574)", group="data", choices=("reference", "exact"), type=_parse_name)
    train: str | None = setting(None, "CSV with columns Label,Text (with --validation and --test), instead of splitting one file", group="data")
    validation: str | None = setting(None, "validation CSV (Label,Text)", group="data")
    test: str | None = setting(None, "test CSV (Label,Text)", group="data")
    normalize_labels: bool = setting(False, "fold labels that differ only by case or surrounding spaces (default: refuse them)", group="data")
    pooling: str = setting("last", "which position's logits classify: last (the reference), last-non-pad, first or mean", group="model", choices=losses.POOLINGS)
    padding: str = setting("longest", "pad to the longest training text, the longest in each batch, or 16-token buckets (with the trunk cache and "
                           "last-non-pad or first pooling: cached texts packed several to a row)", group="data", choices=PADDINGS)
    max_length: int | None = setting(None, "pad/truncate to this many tokens (default: the longest training text)", group="data")
    trunk_cache: bool | None = setting(
        None,
        "compute the frozen prefix of the model once per example and train only the suffix: on/off "
        "(default on where exact: dropout 0 and leading blocks frozen, i.e. head, last-block, last-N-blocks)",
    )
    trunk_cache_max_gb: float = setting(8.0, "host-memory bound of the trunk cache (GB); above it the run trains uncached")

    def validate(self, devices: bool = True) -> None:
        self.trainer.validate(devices)
        files = [self.train, self.validation, self.test]
        if any(files) and not all(files):
            raise ValueError("--train, --validation and --test go together")
        if any(files) and (self.data or self.download):
            raise ValueError("--train/--validation/--test replace --data/--download: give one or the other")
        if self.data and self.download:
            raise ValueError("--data is a local file; --download fetches the original: give one or the other")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of: {', '.join(PADDINGS)}")
        if self.pooling not in losses.POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(losses.POOLINGS)}")
        if self.pooling == "last" and (self.padding == "bucket" or (self.padding == "batch" and self.trainer.batch_size > 1)):
            # Position max-length of a row padded per batch is padding for most texts, and which
            # token it is depends on the batch: no saved classifier could read text that way.
            raise ValueError(
                f"--pooling last reads each row's last position, padding included: with --padding {self.padding} that "
                "depends on the batch; use --pooling last-non-pad (each text's last token; the reference's 'flexible')"
                + (" or --batch-size 1 (no padding at all)" if self.padding == "batch" else "")
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max-length must be >= 1, got {self.max_length}")
        if not self.trunk_cache_max_gb >= 0:
            raise ValueError(f"trunk-cache-max-gb must be >= 0, got {self.trunk_cache_max_gb}")


# --------------------------------------------------------------------------- model surgery


def with_classifier_head(config: GPTConfig, params: Params, num_classes: int, key: jax.Array) -> tuple[GPTConfig, Params]:
    """Replace the LM head by `Dense(emb_dim -> num_classes)` with bias.

    Initialised like torch's nn.Linear (uniform in ±1/sqrt(emb_dim) for weight and bias),
    so a run starts from the same distribution as the reference's.
    """
    num_classes = int(num_classes) if isinstance(num_classes, np.integer) else num_classes  # (labels.max() + 1, say)
    classifier = config.replace(num_classes=num_classes)  # (checks num_classes first)
    bound = 1.0 / math.sqrt(config.emb_dim)
    k_w, k_b = jax.random.split(key)
    params = {k: v for k, v in params.items() if k not in ("lm_head", "cls_head")}
    params["cls_head"] = {
        "kernel": jax.random.uniform(k_w, (config.emb_dim, num_classes), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (num_classes,), jnp.float32, -bound, bound),
    }
    return classifier, params


# --------------------------------------------------------------------------- the run


Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def load_frames(recipe: ClassifierRecipe) -> tuple[Frames, list[str], bool]:
    """(train, validation, test frames, class names, whether the splits were made here): three
    user CSVs, or one labelled file (local, downloaded, or the bundled SMS Spam Collection)
    balanced and split as the reference does."""
    if recipe.train:
        train_df, class_names = labeled.read_labeled_csv(recipe.train, normalize_labels=recipe.normalize_labels)
        val_df, _ = labeled.read_labeled_csv(recipe.validation, class_names=class_names, normalize_labels=recipe.normalize_labels)
        test_df, _ = labeled.read_labeled_csv(recipe.test, class_names=class_names, normalize_labels=recipe.normalize_labels)
        return (train_df, val_df, test_df), class_names, False
    path = Path(recipe.data) if recipe.data else sources.sms_spam_file(download=recipe.download, data_dir=recipe.data_dir)
    dataset = spam.splits_with_classes(path, seed=recipe.trainer.seed, parse=recipe.parse, normalize_labels=recipe.normalize_labels)
    return dataset.frames(), dataset.class_names, True


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


SPLITS = ("train", "validation", "test")


def check_data_vocabulary(model: str, config: GPTConfig, data: ClassificationData) -> None:
    """Every split's ids, padding included, within the model's vocabulary (else a NaN loss, not an error)."""
    top = max(int(split.tokens.max()) for split in (data.train, data.validation, data.test) if split.tokens.size)
    check_vocabulary(model, config, top)


class ClassificationTask(train.Task):
    """Batches of encoded texts, loss on one pooled position, accuracy after every epoch.

    With a frozen trunk (see jaxft.trunk and `step_options`), the batches carry the cached
    output of the frozen blocks (`hidden`) instead of token ids, in the same order and padding.
    """

    loss = "classification"
    seen_label = "Examples seen"

    def __init__(self, recipe: ClassifierRecipe, data: ClassificationData) -> None:
        self.recipe, self.data = recipe, data
        self.pooling = recipe.pooling
        self.train_accs: list[float] = []
        self.val_accs: list[float] = []
        self.hidden: dict[str, np.ndarray] | None = None  # split -> cached trunk output [N, T, D]
        self.one_device = run_mesh(recipe.trainer.mesh) is None  # packed batches only there (rows differ in number)
        self.trunk_cache: dict[str, Any] = trunk.CachePlan(False, "not planned (no step_options call)", 0, 0).record()

    def step_options(self, config: GPTConfig, params: Params, mask: Params, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Called by `train.fit` before it compiles the steps: when exact and within the memory
        bound, compute the frozen trunk's output for every example of every split once, and
        return `make_steps`' `start_block`; else {} (the uncached path)."""
        self.hidden, self.trunk_cache, start_block = trunk.cache_splits(
            config, params, mask, {name: getattr(self.data, name).tokens for name in SPLITS},
            enabled=self.recipe.trunk_cache is not False, batch_size=self.recipe.trainer.batch_size,
            max_bytes=self.recipe.trunk_cache_max_gb * 1e9, log=log, scan_layers=self.recipe.trainer.scan_layers,
            widths={name: trunk.needed_widths(self.pooling, getattr(self.data, name).lengths) for name in SPLITS},
            progress=None if self.recipe.trainer.progress else False,  # --no-progress: no bar here either
            dtype=self.recipe.trainer.compute_dtype,
        )
        return {} if start_block is None else {"start_block": start_block}

    def _batches(self, name: str, *, shuffle: bool, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        arrays = getattr(self.data, name).arrays()
        if self.hidden is not None:
            arrays = {"hidden": self.hidden[name], "labels": arrays["labels"], "lengths": arrays["lengths"]}
        batches = batching.classification_batches(
            arrays, self.recipe.trainer.batch_size, shuffle=shuffle, drop_last=shuffle,
            seed=self.recipe.trainer.seed, epoch=epoch, padding=self.recipe.padding, pad_id=PAD_ID,
        )
        return map(self._pack, batches) if self.packs() else batches

    def packs(self) -> bool:
        """Whether cached bucketed batches are packed rows (jaxft.packing.pack_pooled_batch): with
        the trunk cache, a pooling that reads one real position, and one device. Each text keeps
        the positions up to the one read, so the trainable blocks compute fewer positions, in a
        few shapes (rows of the padded width), with the same losses."""
        return (self.hidden is not None and self.recipe.padding == "bucket" and self.pooling in ("last-non-pad", "first")
                and self.one_device)

    def _pack(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        widths = np.maximum(batch["lengths"], 1) if self.pooling == "last-non-pad" else np.ones(len(batch["lengths"]), np.int64)
        return packing.pack_pooled_batch(batch, widths, self.data.max_length)

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return self._batches("train", shuffle=True, epoch=epoch)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return self._batches(split, shuffle=False)

    def steps_per_epoch(self) -> int:
        return batching.num_batches(len(self.data.train), self.recipe.trainer.batch_size, drop_last=True)

    def seen(self, batch: dict[str, np.ndarray]) -> int:
        return int(batch["weights"].sum())

    def describe(self, config: GPTConfig, params: Params, trainable: Params) -> str:
        return (
            f"{super().describe(config, params, trainable)} ({self.recipe.trainer.trainable}); "
            f"{len(self.data.train)} training examples padded to {self.data.max_length} tokens"
        )

    def initial(self, run: train.Run) -> dict[str, Any]:
        n = run.settings.eval_iter
        losses_ = {"train": run.evaluate(self.train_batches(0), n)["loss"], "validation": run.evaluate(self.eval_batches("validation"), n)["loss"]}
        run.log(f"Initial loss on {n} batches: train {losses_['train']:.3f}, validation {losses_['validation']:.3f}")
        return {"initial_train_loss": losses_["train"], "initial_validation_loss": losses_["validation"]}

    def epoch_end(self, run: train.Run, epoch: int) -> None:
        n = run.settings.eval_iter
        train_acc = run.evaluate(self.train_batches(epoch), n)["accuracy"]
        val_acc = run.evaluate(self.eval_batches("validation"), n)["accuracy"]
        self.train_accs.append(train_acc)
        self.val_accs.append(val_acc)
        run.log(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")

    def final(self, run: train.Run) -> dict[str, Any]:
        final = {
            "train": run.evaluate(self.train_batches(run.settings.epochs)),
            "validation": run.evaluate(self.eval_batches("validation")),
            "test": run.evaluate(self.eval_batches("test")),
        }
        for name in ("train", "validation", "test"):
            run.log(f"{name.capitalize()} accuracy: {final[name]['accuracy'] * 100:.2f}%")
        metrics = {f"{name}_accuracy": final[name]["accuracy"] for name in final}
        metrics.update({f"{name}_loss": final[name]["loss"] for name in final})
        return metrics

    def model_metadata(self) -> dict[str, Any]:
        # batch padding with one text a batch (the reference's "no padding"): the last position is the last token
        pooling = "last-non-pad" if self.recipe.pooling == "last" and self.recipe.padding != "longest" else self.recipe.pooling
        return Classifier.metadata(self.data.class_names, self.data.max_length, pooling)

    def pth_name(self, config: GPTConfig) -> str:
        return "review_classifier.pth"  # the reference's file name

    def state_dict(self) -> dict[str, Any]:
        return {"train_accs": list(self.train_accs), "val_accs": list(self.val_accs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_accs = list(state.get("train_accs", []))
        self.val_accs = list(state.get("val_accs", []))

    def data_hash(self) -> str:
        arrays = self.data.train.arrays()
        return hash_arrays(*(arrays[k] for k in sorted(arrays)))

    def data_hashes(self) -> dict[str, str]:
        r = self.recipe
        whole = f"--data {r.data}" if r.data else (f"the download in {r.data_dir}" if r.download else "the bundled SMS Spam Collection")
        hashes = {}
        for split in SPLITS:
            arrays = getattr(self.data, split).arrays()
            source = f"--{split} {getattr(r, split)}" if r.train else f"its {split} split of {whole}"
            hashes[f"{split} data ({source})"] = hash_arrays(*(arrays[k] for k in sorted(arrays)))
        return hashes

    def outputs(self, run: train.Run, out_dir: Path, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        epochs_run = run.history.total_steps / self.steps_per_epoch()
        plots = plot_values(epochs_run, run.history.total_seen, self.train_accs, self.val_accs, out_dir, "accuracy")
        data = self.data
        metrics = {
            "epoch_train_accuracy": self.train_accs,
            "epoch_validation_accuracy": self.val_accs,
            "examples_seen": run.history.total_seen,
            "class_names": data.class_names,
            "split_sizes": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
            "padded_length": data.max_length,
            "trunk_cache": self.trunk_cache,
        }
        return metrics, {"plots": [str(p) for p in plots]}


def run(
    recipe: ClassifierRecipe,
    out_dir: str | Path,
    frames: Frames,
    class_names: Sequence[str],
    tokenizer: Any,
    *,
    log: Callable[[str], None] = print,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    claim: Callable[[], Path] | None = None,
    timing: Timing | None = None,
) -> dict[str, Any]:
    """Fine-tune on (train, validation, test) frames (`Label` ids, `Text`), evaluate, plot and
    save. Returns the metrics (also written to out_dir/metrics.json). `recipe` must be valid.
    `checkpoint_dir`/`resume`: see `train.fit`; `claim()`, called once the checks have passed, returns
    the checkpoint directory (the CLI takes --out then); `timing`: see `train.fit`."""
    settings, timing = recipe.trainer, Timing() if timing is None else timing
    n_train = len(frames[0])
    if settings.batch_size > n_train:
        raise ValueError(f"batch size {settings.batch_size} is larger than the {n_train} training examples (drop_last would leave no batch)")

    with timing.phase("model_s"):
        key_model, key_head, key_lora = jax.random.split(jax.random.PRNGKey(settings.seed), 3)
        config, params = resolve_model(settings.model, init=settings.init, models_dir=settings.models_dir, key=key_model, drop_rate=settings.drop_rate)
    optim.trainable_blocks(config, settings.trainable)  # last-N-blocks against this model's blocks, before the claim
    with timing.phase("data_s"):
        data = encode_splits(frames, list(class_names), tokenizer, max_length=recipe.max_length, context_length=config.context_length)
        check_data_vocabulary(settings.model, config, data)
    with timing.phase("model_s"):
        config, params = with_classifier_head(config, params, len(data.class_names), key_head)
        if settings.lora_rank:
            config, params = add_lora(config, params, settings.lora_rank, settings.lora_alpha, key_lora)
    if claim is not None:  # the checks passed: take the run directory just before training
        checkpoint_dir = claim()
    return train.fit(settings, config, params, ClassificationTask(recipe, data), out_dir, record=dataclasses.asdict(recipe), log=log,
                     checkpoint_dir=checkpoint_dir, resume=resume, timing=timing)
