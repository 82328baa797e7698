"""Instruction fine-tuning: the reference's Alpaca recipe (GPT-2 medium, every parameter, AdamW
5e-5 / decay 0.1, 2 epochs of batches of 8, the masked next-token loss of the reference's
collate), batches padded to 32-token buckets (a handful of compilations; the same loss), then
the test split's responses (jaxft.responses) for the judge. Every variant is a setting of
`InstructRecipe`."""
from __future__ import annotations

import dataclasses
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from .. import generate as gen
from .. import optim, packing, sources, train
from ..config import GPTConfig, canonical_name, is_size_name
from ..data import instruct as data
from ..data.batching import num_batches
from ..lora import add_lora
from ..model import Params
from ..tokenizer import get_tokenizer
from ..fileio import write_json
from ..resume import hash_arrays
from ..losses import IGNORE_INDEX
from ..settings import TrainerSettings, run_mesh, setting
from ..timing import Timing
from ..responses import generate_responses, sample_text
from .common import check_vocabulary, resolve_model

Entry = dict[str, Any]

RESPONSES_FILE = "instruction-data-with-response.json"
METRICS_FILE = train.METRICS_FILE


def _trainer_defaults() -> TrainerSettings:
    return TrainerSettings(model="gpt2-medium (355M)", trainable="all", epochs=2, eval_freq=5, eval_iter=5)


@dataclass(frozen=True)
class InstructRecipe:
    """Settings of an instruction fine-tuning run; the defaults are the reference's recipe."""

    trainer: TrainerSettings = field(default_factory=_trainer_defaults)
    tie_head: bool = setting(False, "keep the LM head tied to wte (default: a separate head, as the reference's GPTModel)", group="model")
    head_vocab_multiple: int | None = setting(None, "in the training loss, pad the LM head's vocabulary to a multiple of this "
                                              "(masked: the same loss; GPT-2's 50,257 is odd, GPU matmuls prefer multiples of 64)", group="model")
    style: str = setting("alpaca", "prompt style", group="data", choices=tuple(sorted(data.PROMPT_STYLES)))
    mask_prompt: bool = setting(False, "also ignore the instruction and input tokens in the loss", group="data")
    allowed_max_length: int = setting(data.DEFAULT_MAX_LENGTH, "truncate examples to this many tokens (capped at the context length)", group="data")
    bucket_multiple: int = setting(32, "pad batch widths up to multiples of this (few static shapes)", group="data")
    pack: bool = setting(False, "pack each batch's examples into as few rows as fit (a row width chosen from the data, a "
                         "multiple of --bucket-multiple; per-example positions and attention): the same loss on fewer positions", group="data")
    limit: int | None = setting(None, "use only the first N entries (then split 85/10/5)", group="data")
    max_new_tokens: int = setting(256, "response length limit (greedy, eos stop)", group="responses")
    response_batch_size: int = setting(8, "prompts per generation batch", group="responses")
    responses: bool = setting(True, "generate the test split's responses after training", group="responses")
    data: str | None = setting(None, "a local JSON list of {instruction, input, output} entries (default: the bundled instruction-data.json of the reference)", group="data")
    download: bool = setting(False, "download the reference's instruction-data.json (hash-checked) instead of the bundled copy", group="data")
    data_dir: str = setting(".", "where --download puts instruction-data.json", group="data")
    url: str = setting(sources.INSTRUCTION_DATA_URL, "the URL --download fetches", group="data")

    def validate(self) -> None:
        self.trainer.validate()
        if self.data and self.download:
            raise ValueError("--data is a local file; --download fetches the original: give one or the other")
        data.get_style(self.style)  # unknown style: a clear error
        for name in ("bucket_multiple", "max_new_tokens", "response_batch_size", "allowed_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.head_vocab_multiple is not None and self.head_vocab_multiple < 1:
            raise ValueError(f"head-vocab-multiple must be >= 1, got {self.head_vocab_multiple}")


def untie_head(config: GPTConfig, params: Params) -> tuple[GPTConfig, Params]:
    """Give the model its own LM head, initialised as a copy of `wte` (transposed).

    The reference's GPTModel has a separate `out_head` into which the OpenAI loader copies the
    token embedding; fine-tuning then updates the two independently. Keeping jaxft's head tied
    would train a different model than the reference's.
    """
    if not config.tie_embeddings or config.num_classes is not None:
        return config, params
    params = {**params, "lm_head": {"kernel": np.array(np.asarray(params["wte"]["embedding"]).T)}}
    return config.replace(tie_embeddings=False), params


def sft_file_name(model_name: str, config: GPTConfig | None = None) -> str:
    """The reference's file name: "gpt2-medium (355M)" -> "gpt2-medium355M-sft.pth"; "model-sft.pth"
    for a custom size."""
    if is_size_name(model_name):
        base = canonical_name(model_name)
    else:
        base = config.name if config is not None and config.name != "custom" else "model"
    return f"{re.sub(r'[^A-Za-z0-9._-]', '', base)}-sft.pth"


def data_file(recipe: InstructRecipe) -> Path:
    """The instruction data the recipe names: a local file, the downloaded original (hash-checked
    when it comes from the reference's URL), or the bundled copy."""
    if recipe.data:
        return Path(recipe.data)
    sha256 = sources.INSTRUCTION_DATA_SHA256 if recipe.url == sources.INSTRUCTION_DATA_URL else None
    return sources.instruction_data_file(download=recipe.download, data_dir=recipe.data_dir, url=recipe.url, sha256=sha256)


def _split(entries: Sequence[Entry], recipe: InstructRecipe, source: str | Path) -> data.Splits:
    splits = data.split_entries(entries)
    for name in ("train", "validation", "test"):
        if not getattr(splits, name):
            raise ValueError(f"{source}: {len(entries)} entries leave the {name} split empty (85/10/5 split); use more entries")
    if recipe.trainer.batch_size > len(splits.train):
        raise ValueError(
            f"batch size {recipe.trainer.batch_size} is larger than the {len(splits.train)} training entries (drop_last would leave no batch)"
        )
    return splits




def _hash_part(part: data.TokenizedInstructions) -> str:
    lengths = np.array([len(ids) for ids in part.token_ids], np.int64)
    flat = np.array([t for ids in part.token_ids for t in ids], np.int64)
    return hash_arrays(lengths, flat, np.array(part.prompt_lengths, np.int64))


class InstructionTask(train.Task):
    """Bucketed, masked next-token batches; a sample response after every epoch; the test
    split's responses at the end."""

    loss = "lm"
    seen_label = "Tokens seen"
    seen_unit = "tokens"

    def __init__(self, recipe: InstructRecipe, config: GPTConfig, tokens: data.TokenizedInstructions, splits: data.Splits,
                 tokenizer: Any, source: str | Path, progress: bool) -> None:
        self.recipe, self.config, self.splits, self.tokenizer = recipe, config, splits, tokenizer
        self.source, self.progress = source, progress
        self.max_length = min(recipe.allowed_max_length, config.context_length)
        n_train, n_test = len(splits.train), len(splits.test)
        part = lambda lo, hi: data.TokenizedInstructions(tokens.token_ids[lo:hi], tokens.prompt_lengths[lo:hi])
        self.parts = {"train": part(0, n_train), "test": part(n_train, n_train + n_test), "validation": part(n_train + n_test, len(tokens))}
        self.n_over_length = tokens.n_over_length
        self.batch_shapes: set[tuple[int, int]] = set()
        self.sample_prompt = data.format_prompt(splits.validation[0], recipe.style)
        self.samples: list[str] = []
        self.compiled_before = gen.compilations()
        self.row_width, self.row_multiple = None, 1
        if recipe.pack:  # one row width for the run, chosen from every training batch; rows split evenly over a mesh
            mesh = run_mesh(recipe.trainer.mesh)
            self.row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
            lengths = [packing.lm_lengths(targets, IGNORE_INDEX) for split, shuffle, epochs in
                       (("train", True, range(recipe.trainer.epochs)), ("validation", False, [0]), ("test", False, [0]))
                       for epoch in epochs for _, targets in self._collated(split, shuffle=shuffle, epoch=epoch)]
            self.row_width = packing.choose_row_width(lengths, recipe.bucket_multiple)

    def step_options(self, config: GPTConfig, params: Params, mask: Params, log: Callable[[str], None]) -> dict[str, Any]:
        """`make_steps`' vocab_multiple, when --head-vocab-multiple asks for one."""
        multiple = self.recipe.head_vocab_multiple
        return {} if multiple is None else {"vocab_multiple": multiple}

    def _collated(self, split: str, *, shuffle: bool, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Training: shuffled, drop_last (the reference's loader). Evaluation: in order, the short
        # final batch filled with ignored rows so it has the training batch shape. Packed: the
        # reference's tight batches, packed by _batches.
        recipe = self.recipe
        return data.instruction_batches(
            self.parts[split], recipe.trainer.batch_size, shuffle=shuffle, drop_last=shuffle, seed=recipe.trainer.seed,
            epoch=epoch, mask_prompt=recipe.mask_prompt, allowed_max_length=self.max_length,
            bucket_multiple=None if recipe.pack else recipe.bucket_multiple, fill_last_batch=not shuffle and not recipe.pack,
        )

    def _batches(self, split: str, *, shuffle: bool, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for inputs, targets in self._collated(split, shuffle=shuffle, epoch=epoch):
            if self.row_width is None:
                batch = {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}
            else:
                batch = packing.pack_lm_batch(inputs.astype(np.int32), targets.astype(np.int32), self.row_width,
                                              row_multiple=self.row_multiple, pad_id=data.PAD_ID, ignore_index=IGNORE_INDEX)
            if shuffle:
                self.batch_shapes.add(batch["inputs"].shape)
            yield batch

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return self._batches("train", shuffle=True, epoch=epoch)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return self._batches(split, shuffle=False)

    def steps_per_epoch(self) -> int:
        return num_batches(len(self.splits.train), self.recipe.trainer.batch_size, drop_last=True)

    def example_batches(self) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
        """One batch of each width of the first epoch (its steps that run) and of the validation and
        test splits (collating is cheap next to compiling): each bucket's step compiles ahead of time."""
        def one_per_shape(batches: Iterator[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            return list({batch["inputs"].shape: batch for batch in batches}.values())

        seen_shapes = set(self.batch_shapes)  # (the record of the shapes trained on: only steps add to it)
        train = one_per_shape(itertools.islice(self.train_batches(0), self.recipe.trainer.max_steps))
        self.batch_shapes = seen_shapes
        return train, one_per_shape(itertools.chain(self.eval_batches("validation"), self.eval_batches("test")))

    def seen(self, batch: dict[str, np.ndarray]) -> int:
        if "segments" in batch:  # packed: examples x the longest example's length
            return packing.reference_numel(batch["segments"])
        return int(np.prod(data.tight_shape(batch["targets"])))  # the reference's input_batch.numel()

    def describe(self, config: GPTConfig, params: Params, trainable: Params) -> str:
        s = self.splits
        return (
            f"{super().describe(config, params, trainable)} ({self.recipe.trainer.trainable}); splits: train {len(s.train)}, "
            f"validation {len(s.validation)}, test {len(s.test)}; {self.recipe.style} prompts, "
            f"{self.n_over_length} longer than {config.context_length} tokens"
        )

    def _losses(self, run: train.Run, epoch: int) -> tuple[float, float]:
        # The reference's calc_loss_loader(..., num_batches=eval_iter) before and after training.
        n = run.settings.eval_iter
        return run.evaluate(self.train_batches(epoch), n)["loss"], run.evaluate(self.eval_batches("validation"), n)["loss"]

    def initial(self, run: train.Run) -> dict[str, Any]:
        train_loss, val_loss = self._losses(run, 0)
        run.log(f"Training loss: {train_loss}")
        run.log(f"Validation loss: {val_loss}")
        return {"initial_train_loss": train_loss, "initial_validation_loss": val_loss}

    def epoch_end(self, run: train.Run, epoch: int) -> None:
        text = sample_text(self.config, run.params, self.tokenizer, self.sample_prompt)
        self.samples.append(text)
        run.log(text)

    def final(self, run: train.Run) -> dict[str, Any]:
        final_train, final_val = self._losses(run, run.settings.epochs)
        full_val = run.evaluate(self.eval_batches("validation"))["loss"]
        full_test = run.evaluate(self.eval_batches("test"))["loss"]
        run.log(f"Final loss on {run.settings.eval_iter} batches: train {final_train:.3f}, validation {final_val:.3f}; "
                f"whole validation split {full_val:.3f}, test split {full_test:.3f}")
        return {"final_train_loss": final_train, "final_validation_loss": final_val, "validation_loss": full_val, "test_loss": full_test}

    def model_metadata(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "task": "instruction", "style": r.style, "mask_prompt": r.mask_prompt, "base_model": r.trainer.model,
            "init": r.trainer.init, "allowed_max_length": self.max_length, "max_new_tokens": r.max_new_tokens,
        }

    def pth_name(self, config: GPTConfig) -> str:
        return sft_file_name(self.recipe.trainer.model, config)

    def state_dict(self) -> dict[str, Any]:
        return {"samples": list(self.samples), "batch_shapes": sorted(list(s) for s in self.batch_shapes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = list(state.get("samples", []))
        self.batch_shapes = {tuple(s) for s in state.get("batch_shapes", [])}

    def data_hash(self) -> str:
        return _hash_part(self.parts["train"])

    def data_hashes(self) -> dict[str, str]:
        return {f"{split} data (its {split} split of {self.source})": _hash_part(part) for split, part in self.parts.items()}

    def outputs(self, run: train.Run, out_dir: Path, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        outputs: dict[str, Any] = {}
        response_seconds = None
        if self.recipe.responses:
            t0 = time.perf_counter()
            responses = generate_responses(
                self.config, params, self.splits.test, self.tokenizer, style=self.recipe.style,
                max_new_tokens=self.recipe.max_new_tokens, batch_size=self.recipe.response_batch_size,
                # outputs run on process 0 alone, from whole host copies: a mesh over every process's
                # devices would wait for the others in its first transfer
                progress=self.progress, source=self.source, mesh=run.mesh if jax.process_count() == 1 else None, log=run.log,
            )
            response_seconds = time.perf_counter() - t0
            with_responses = [{**entry, "model_response": text} for entry, text in zip(self.splits.test, responses)]
            write_json(out_dir / RESPONSES_FILE, with_responses)
            outputs["responses"] = str(out_dir / RESPONSES_FILE)
            run.log(f"wrote {len(with_responses)} responses to {out_dir / RESPONSES_FILE} ({response_seconds:.1f} s)")
        history = run.history
        metrics = {
            "eval_tokens_seen": history.seen,
            "tokens_seen": history.total_seen,
            "response_seconds": response_seconds,
            "generate_compilations": gen.compilations() - self.compiled_before,
            "train_batch_shapes": sorted(list(s) for s in self.batch_shapes),
            "epoch_samples": self.samples,
            "split_sizes": {name: len(getattr(self.splits, name)) for name in ("train", "validation", "test")},
        }
        return metrics, outputs


def _check_vocabulary(model: str, config: GPTConfig, tokens: data.TokenizedInstructions) -> None:
    check_vocabulary(model, config, max([data.PAD_ID, *(max(ids) for ids in tokens.token_ids if ids)]))


def run(
    recipe: InstructRecipe,
    out_dir: str | Path,
    entries: Sequence[Entry] | str | Path | None = None,
    tokenizer: Any = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    claim: Callable[[], Path] | None = None,
    timing: Timing | None = None,
) -> dict[str, Any]:
    """Fine-tune on `entries` (a validated list, a JSON file, or None: the recipe's data file), evaluate, plot, generate the
    test split's responses and save everything in `out_dir`. Returns the metrics (also
    `out_dir/metrics.json`, written last: its presence means the run completed). `recipe`
    must be valid. `timing`: see `train.fit`."""
    settings, timing = recipe.trainer, Timing() if timing is None else timing
    source: str | Path = "<data>"
    data_started = time.perf_counter()
    if entries is None:
        entries = data_file(recipe)
    if isinstance(entries, (str, Path)):
        source = Path(entries)
        entries = data.load_entries(source)
    else:
        entries = data.validate_entries(list(entries), source)
    if recipe.limit is not None:
        entries = entries[: recipe.limit]
    splits = _split(entries, recipe, source)
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    start = time.perf_counter()
    timing.seconds["data_s"] += start - data_started

    with timing.phase("model_s"):
        key_model, key_lora = jax.random.split(jax.random.PRNGKey(settings.seed))
        config, params = resolve_model(settings.model, init=settings.init, models_dir=settings.models_dir, key=key_model, drop_rate=settings.drop_rate)
        if config.num_classes is not None:
            raise ValueError(f"{settings.model}: a classification model; instruction tuning needs a language model")
        if not recipe.tie_head:
            config, params = untie_head(config, params)
        if settings.lora_rank:
            config, params = add_lora(config, params, settings.lora_rank, settings.lora_alpha, key_lora)
    if recipe.responses and recipe.max_new_tokens >= config.context_length:
        raise ValueError(f"max-new-tokens ({recipe.max_new_tokens}) must be smaller than the context length ({config.context_length})")

    with timing.phase("data_s"):  # the whole file at once, so that errors name the entry's index in the file
        tokens = data.tokenize_entries(entries, tokenizer, recipe.style, max_length=config.context_length, source=source)
        _check_vocabulary(settings.model, config, tokens)
        optim.trainable_blocks(config, settings.trainable)  # last-N-blocks against this model's blocks, before the claim
        task = InstructionTask(recipe, config, tokens, splits, tokenizer, source, progress)
    if claim is not None:  # the checks passed: take the run directory just before training
        checkpoint_dir = claim()
    return train.fit(settings, config, params, task, out_dir, record=dataclasses.asdict(recipe), log=log, started=start,
                     checkpoint_dir=checkpoint_dir, resume=resume, timing=timing)
