"""Instruction fine-tuning (the seed's Alpaca recipe) and responses from a fine-tuned model.

GPT-2 medium, every parameter trained with AdamW 5e-5 / weight decay 0.1 for 2 epochs on
batches of 8, on the masked next-token loss (targets -100 ignored, the seed's collate). Batches
are padded up to 32-token buckets so the jitted step compiles a handful of times per run; the
loss equals the tightly padded one. Afterwards every test entry gets a response from the
KV-cached generator, saved as `instruction-data-with-response.json` for the judge.
Every variant (prompt style, prompt masking, which parameters train, LoRA, model size) is a
setting of `InstructRecipe`, not a code change.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from .. import generate as gen
from .. import model, optim, sources, train, weights
from ..config import GPTConfig, canonical_name, is_size_name
from ..data import instruct as data
from ..data.batching import num_batches
from ..lora import add_lora
from ..plots import plot_values
from ..tokenizer import EOT_ID, get_tokenizer
from .common import resolve_model, run_info, write_json

Params = dict[str, Any]
Entry = dict[str, Any]

RESPONSES_FILE = "instruction-data-with-response.json"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
SAMPLE_NEW_TOKENS = 50  # the seed's generate_and_print_sample after each epoch


@dataclass(frozen=True)
class InstructRecipe:
    """Settings of an instruction fine-tuning run; the defaults are the seed's."""

    model: str = "gpt2-medium (355M)"
    init: str = "pretrained"  # or "random"
    trainable: str = "all"  # head | last-block | last-N-blocks | all | lora
    final_norm: bool | None = None  # default: trains unless trainable is head or lora
    tie_head: bool = False  # False: a separate LM head initialised from wte (the seed's GPTModel.out_head)
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    style: str = "alpaca"  # alpaca | phi3 (see jaxft.data.instruct.PROMPT_STYLES)
    mask_prompt: bool = False  # also ignore the targets inside the instruction and input
    allowed_max_length: int = data.DEFAULT_MAX_LENGTH  # capped at the model's context length
    bucket_multiple: int = 32  # pad batch widths up to multiples of this (static shapes)
    limit: int | None = None  # use only the first `limit` entries (quick runs)
    max_steps: int | None = None  # stop training after this many steps (quick runs)
    max_new_tokens: int = 256  # response length for the test split
    response_batch_size: int = 8
    drop_rate: float = 0.0
    grad_clip_norm: float | None = None
    accumulation_steps: int = 1
    lora_rank: int = 0  # > 0 adds LoRA adapters (train them with trainable="lora")
    lora_alpha: float = 16.0
    models_dir: str = "gpt2"
    export_pth: bool = False  # also write the reference's <model>-sft.pth state dict
    responses: bool = True  # generate the test split's responses after training

    def validate(self) -> None:
        data.get_style(self.style)  # unknown style: a clear error
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulation_steps", "bucket_multiple",
                     "max_new_tokens", "response_batch_size", "allowed_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("limit", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")


# --------------------------------------------------------------------------- model


def untie_head(config: GPTConfig, params: Params) -> tuple[GPTConfig, Params]:
    """Give the model its own LM head, initialised as a copy of `wte` (transposed).

    The seed's GPTModel has a separate `out_head` into which the OpenAI loader copies the
    token embedding; fine-tuning then updates the two independently. Keeping jaxft's head tied
    would train a different model than the seed's.
    """
    if not config.tie_embeddings or config.num_classes is not None:
        return config, params
    params = {**params, "lm_head": {"kernel": np.array(np.asarray(params["wte"]["embedding"]).T)}}
    return config.replace(tie_embeddings=False), params


def sft_file_name(model_name: str, config: GPTConfig | None = None) -> str:
    """The seed's file name: "gpt2-medium (355M)" -> "gpt2-medium355M-sft.pth"; "model-sft.pth"
    for a custom size."""
    if is_size_name(model_name):
        base = canonical_name(model_name)
    else:
        base = config.name if config is not None and config.name != "custom" else "model"
    return f"{re.sub(r'[^A-Za-z0-9._-]', '', base)}-sft.pth"


# --------------------------------------------------------------------------- generation


def encode_prompts(
    entries: Sequence[Entry], tokenizer: Any, style: str, context_length: int, source: str | Path = "<data>"
) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, their token ids); a prompt longer than the context names its entry."""
    texts, ids = [], []
    for index, entry in enumerate(entries):
        text = data.format_prompt(entry, style)
        tokens = tokenizer.encode(text, disallowed_special=())  # as the training texts are encoded
        if len(tokens) > context_length:
            raise data.InstructionDataError(
                f"{source}: entry {index}: prompt is {len(tokens)} tokens, longer than the context length {context_length}"
            )
        texts.append(text)
        ids.append(tokens)
    return texts, ids


def generate_responses(
    config: GPTConfig,
    params: Params,
    entries: Sequence[Entry],
    tokenizer: Any,
    *,
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    source: str | Path = "<data>",
) -> list[str]:
    """The seed's response for every entry: greedy until eos or `max_new_tokens`, the text
    after the prompt with the style's response marker removed. Batched, KV-cached."""
    texts, prompts = encode_prompts(entries, tokenizer, style, config.context_length, source)
    new_tokens = gen.generate_batched(
        config, params, prompts, batch_size=batch_size, progress=progress, max_new_tokens=max_new_tokens, eos_id=EOT_ID
    )
    return [
        data.extract_response(tokenizer.decode(ids + new), text, style)
        for text, ids, new in zip(texts, prompts, new_tokens)
    ]


def sample_text(config: GPTConfig, params: Params, tokenizer: Any, prompt_text: str, max_new_tokens: int = SAMPLE_NEW_TOKENS) -> str:
    """The seed's generate_and_print_sample: prompt + greedy tokens (no eos stop), on one line."""
    prompt = tokenizer.encode(prompt_text, disallowed_special=())
    new = gen.generate(config, params, [prompt], max_new_tokens=min(max_new_tokens, config.context_length - 1), eos_id=None)[0]
    return tokenizer.decode(prompt + new).replace("\n", " ")


# --------------------------------------------------------------------------- outputs


def _save_model_dir(config: GPTConfig, params: Params, path: Path, metadata: dict[str, Any]) -> Path:
    """Write the jaxft model beside `path`, then swap it in: never a half-written model dir."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model dir is an ordinary output
    try:
        weights.export(config, params, tmp, "jaxft", metadata=metadata)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_plots(out_dir: Path, epochs: float, total_seen: int, train_losses: list[float], val_losses: list[float]) -> list[Path]:
    """loss-plot.pdf/.png, drawn in a scratch dir and renamed into place."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".plots."))
    try:
        drawn = plot_values(epochs, total_seen, train_losses, val_losses, tmp, "loss", seen_label="Tokens seen")
        final = []
        for path in drawn:
            os.replace(path, out_dir / path.name)
            final.append(out_dir / path.name)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the run


def load_data(path: str | Path | None = None, *, data_dir: str | Path = ".", url: str = sources.INSTRUCTION_DATA_URL) -> tuple[list[Entry], Path]:
    """(entries, file): a given file must exist; without one, the seed's file is downloaded
    to `data_dir/instruction-data.json` (skipped when already there)."""
    if path is not None:
        return data.load_entries(path), Path(path)
    # The reference's file is hash-checked; a file from another --url cannot be.
    sha256 = sources.INSTRUCTION_DATA_SHA256 if url == sources.INSTRUCTION_DATA_URL else None
    target = sources.instruction_data_file(download=True, data_dir=data_dir, url=url, sha256=sha256)
    return data.load_entries(target), target


def _split(entries: Sequence[Entry], recipe: InstructRecipe, source: str | Path) -> data.Splits:
    splits = data.split_entries(entries)
    for name in ("train", "validation", "test"):
        if not getattr(splits, name):
            raise ValueError(f"{source}: {len(entries)} entries leave the {name} split empty (85/10/5 split); use more entries")
    if recipe.batch_size > len(splits.train):
        raise ValueError(
            f"batch size {recipe.batch_size} is larger than the {len(splits.train)} training entries (drop_last would leave no batch)"
        )
    return splits


def run(
    recipe: InstructRecipe,
    out_dir: str | Path,
    entries: Sequence[Entry] | str | Path,
    tokenizer: Any = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune on `entries` (a validated list, or a JSON file), evaluate, plot, generate the
    test split's responses and save everything in `out_dir`. Returns the metrics (also
    `out_dir/metrics.json`, written last: its presence means the run completed)."""
    recipe.validate()
    source: str | Path = "<data>"
    if isinstance(entries, (str, Path)):
        source = Path(entries)
        entries = data.load_entries(source)
    else:
        entries = data.validate_entries(list(entries), source)
    if recipe.limit is not None:
        entries = entries[: recipe.limit]
    splits = _split(entries, recipe, source)
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    out_dir = Path(out_dir)
    start = time.perf_counter()

    key_model, key_lora = jax.random.split(jax.random.PRNGKey(recipe.seed))
    config, params = resolve_model(recipe.model, init=recipe.init, models_dir=recipe.models_dir, key=key_model, drop_rate=recipe.drop_rate)
    if config.num_classes is not None:
        raise ValueError(f"{recipe.model}: a classification model; instruction tuning needs a language model")
    if not recipe.tie_head:
        config, params = untie_head(config, params)
    if recipe.lora_rank:
        config, params = add_lora(config, params, recipe.lora_rank, recipe.lora_alpha, key_lora)
    if recipe.responses and recipe.max_new_tokens >= config.context_length:
        raise ValueError(f"max-new-tokens ({recipe.max_new_tokens}) must be smaller than the context length ({config.context_length})")
    max_length = min(recipe.allowed_max_length, config.context_length)

    # Tokenise the whole file at once so that errors name the entry's index in the file.
    tokens = data.tokenize_entries(entries, tokenizer, recipe.style, max_length=config.context_length, source=source)
    n_train, n_test = len(splits.train), len(splits.test)
    part = lambda lo, hi: data.TokenizedInstructions(tokens.token_ids[lo:hi], tokens.prompt_lengths[lo:hi])
    tok_train, tok_test, tok_val = part(0, n_train), part(n_train, n_train + n_test), part(n_train + n_test, len(entries))

    batch_shapes: set[tuple[int, int]] = set()

    def batches(split: data.TokenizedInstructions, *, shuffle: bool, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        # Training: shuffled, drop_last (the seed's loader). Evaluation: in order, the short
        # final batch filled with ignored rows so it has the training batch shape.
        for inputs, targets in data.instruction_batches(
            split, recipe.batch_size, shuffle=shuffle, drop_last=shuffle, seed=recipe.seed, epoch=epoch,
            mask_prompt=recipe.mask_prompt, allowed_max_length=max_length, bucket_multiple=recipe.bucket_multiple,
            fill_last_batch=not shuffle,
        ):
            if shuffle:
                batch_shapes.add(inputs.shape)
            yield {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}

    steps_per_epoch = num_batches(n_train, recipe.batch_size, drop_last=True)

    def train_batches(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        batch_iter = batches(tok_train, shuffle=True, epoch=epoch)
        if recipe.max_steps is None:
            return batch_iter
        return itertools.islice(batch_iter, max(recipe.max_steps - epoch * steps_per_epoch, 0))

    val_batches = lambda: batches(tok_val, shuffle=False)
    test_batches = lambda: batches(tok_test, shuffle=False)

    mask = optim.trainable_mask(config, params, recipe.trainable, recipe.final_norm)
    optimizer = optim.adamw(recipe.lr, recipe.weight_decay, grad_clip_norm=recipe.grad_clip_norm, accumulation_steps=recipe.accumulation_steps)
    state = train.init_state(params, mask, optimizer, seed=recipe.seed)
    del params  # the state holds its own copy
    train_step, eval_step = train.make_steps(config, optimizer, "lm")
    log(
        f"model {config.name}: {model.param_count(state.params):,} parameters, {optim.count(state.trainable):,} trainable "
        f"({recipe.trainable}); splits: train {n_train}, validation {len(splits.validation)}, test {n_test}; "
        f"{recipe.style} prompts, {tokens.n_over_length} longer than {config.context_length} tokens"
    )

    # The seed's calc_loss_loader(..., num_batches=eval_iter) before and after training.
    def losses_now(params: Params, epoch: int) -> tuple[float, float]:
        return (
            train.evaluate(eval_step, params, batches(tok_train, shuffle=True, epoch=epoch), recipe.eval_iter)["loss"],
            train.evaluate(eval_step, params, val_batches(), recipe.eval_iter)["loss"],
        )

    initial_train, initial_val = losses_now(state.params, 0)
    log(f"Training loss: {initial_train}")
    log(f"Validation loss: {initial_val}")

    sample_prompt = data.format_prompt(splits.validation[0], recipe.style)
    samples: list[str] = []

    def on_epoch_end(state: train.TrainState, epoch: int, history: train.History) -> None:
        text = sample_text(config, state.params, tokenizer, sample_prompt)
        samples.append(text)
        log(text)

    compiled_before = gen.compilations()
    state, history = train.train_loop(
        state, train_step, eval_step, train_batches, val_batches,
        num_epochs=recipe.epochs, eval_freq=recipe.eval_freq, eval_iter=recipe.eval_iter,
        seen_per_batch=lambda batch: int(np.prod(data.tight_shape(batch["targets"]))),  # the seed's input_batch.numel()
        on_epoch_end=on_epoch_end, log=log,
    )
    log(f"Training completed in {history['seconds'] / 60:.2f} minutes.")

    params = jax.device_get(state.params)
    final_train, final_val = losses_now(params, recipe.epochs)
    full_val = train.evaluate(eval_step, params, val_batches())["loss"]
    full_test = train.evaluate(eval_step, params, test_batches())["loss"]
    log(f"Final loss on {recipe.eval_iter} batches: train {final_train:.3f}, validation {final_val:.3f}; "
        f"whole validation split {full_val:.3f}, test split {full_test:.3f}")

    epochs_run = history["total_steps"] / steps_per_epoch  # fewer than recipe.epochs with max_steps
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails early leaves nothing behind
    plots = _save_plots(out_dir, epochs_run, history["total_seen"], history["train_losses"], history["val_losses"]) if history["train_losses"] else []

    outputs: dict[str, Any] = {"plots": [str(p) for p in plots]}
    response_seconds = None
    if recipe.responses:
        t0 = time.perf_counter()
        responses = generate_responses(
            config, params, splits.test, tokenizer, style=recipe.style, max_new_tokens=recipe.max_new_tokens,
            batch_size=recipe.response_batch_size, progress=progress, source=source,
        )
        response_seconds = time.perf_counter() - t0
        with_responses = [{**entry, "model_response": text} for entry, text in zip(splits.test, responses)]
        write_json(out_dir / RESPONSES_FILE, with_responses)
        outputs["responses"] = str(out_dir / RESPONSES_FILE)
        log(f"wrote {len(with_responses)} responses to {out_dir / RESPONSES_FILE} ({response_seconds:.1f} s)")

    metadata = {
        "task": "instruction", "style": recipe.style, "mask_prompt": recipe.mask_prompt, "base_model": recipe.model,
        "init": recipe.init, "allowed_max_length": max_length, "max_new_tokens": recipe.max_new_tokens,
    }
    outputs["model"] = str(_save_model_dir(config, params, out_dir / MODEL_DIR, metadata))
    if recipe.export_pth:
        outputs["torch_reference"] = str(weights.export(config, params, out_dir / sft_file_name(recipe.model, config), "torch-reference"))

    metrics = {
        "initial_train_loss": initial_train,
        "initial_validation_loss": initial_val,
        "final_train_loss": final_train,
        "final_validation_loss": final_val,
        "validation_loss": full_val,
        "test_loss": full_test,
        "eval_steps": history["steps"],
        "eval_train_losses": history["train_losses"],
        "eval_validation_losses": history["val_losses"],
        "eval_tokens_seen": history["seen"],
        "tokens_seen": history["total_seen"],
        "steps": history["total_steps"],
        "epochs": epochs_run,
        "train_seconds": history["seconds"],
        "response_seconds": response_seconds,
        "total_seconds": time.perf_counter() - start,
        "train_step_compilations": train.compile_count(train_step),
        "eval_step_compilations": train.compile_count(eval_step),
        "generate_compilations": gen.compilations() - compiled_before,
        "train_batch_shapes": sorted(list(s) for s in batch_shapes),
        "epoch_samples": samples,
        "split_sizes": {"train": n_train, "validation": len(splits.validation), "test": n_test},
        "recipe": dataclasses.asdict(recipe),
        "model_config": config.to_dict(),
        "outputs": outputs,
        "run": run_info(),
    }
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics
