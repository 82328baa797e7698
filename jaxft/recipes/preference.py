"""Preference tuning (DPO): the reference's dpo-from-scratch recipe (an instruction-tuned model, every
parameter, AdamW 5e-6 / decay 0.01, 1 epoch of batches of 8, beta 0.1, the mean response
log-probability, the sigmoid loss) on `train.fit`, then the test split's responses of the policy
and of the reference model. Every variant is a setting of `PreferenceRecipe`.

The reference model is the starting model, frozen, without dropout (the reference keeps it in
eval mode), and with LoRA the base with the adapters off. Its log-probabilities are therefore
fixed numbers: by default (`reference_logprobs="precompute"`) they are computed in one batched
pass before training, kept per example, looked up by the shuffled batches and stored in the
checkpoints; each step then runs the policy only (one forward over chosen and rejected stacked,
where the reference runs four). "live" recomputes them in every step, as the reference does.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import generate as gen
from .. import optim, train
from .. import preference_losses as pl
from ..config import GPTConfig
from ..data import instruct as idata
from ..data import preference as data
from ..data.batching import num_batches
from ..fileio import write_json
from ..lora import add_lora
from ..model import Params
from ..plots import plot_values
from ..resume import hash_arrays
from ..responses import generate_responses, sample_text
from ..settings import TrainerSettings, run_mesh, setting
from ..timing import Timing
from ..tokenizer import get_tokenizer
from .common import resolve_model
from .instruct import _check_vocabulary, untie_head

Entry = dict[str, Any]

POLICY_RESPONSES_FILE = "policy-responses.json"
REFERENCE_RESPONSES_FILE = "reference-responses.json"
REFERENCE_LOGPROBS = ("precompute", "live")
REWARDS = ("chosen_reward", "rejected_reward", "reward_margin")


def _trainer_defaults() -> TrainerSettings:
    return TrainerSettings(model="gpt2-medium (355M)", trainable="all", epochs=1, lr=5e-6, weight_decay=0.01, eval_freq=5, eval_iter=5)


@dataclass(frozen=True)
class PreferenceRecipe:
    """Settings of a preference-tuning run; the defaults are the reference's recipe (pass the
    instruction-tuned model as --model, e.g. runs/sft/model)."""

    trainer: TrainerSettings = field(default_factory=_trainer_defaults)
    beta: float = setting(0.1, "DPO's beta: how far the policy may move from the reference", group="preference")
    loss: str = setting("sigmoid", "sigmoid (DPO, the reference's), hinge (SLiC) or ipo", group="preference", choices=pl.LOSSES)
    label_smoothing: float = setting(0.0, "conservative DPO: the share of pairs assumed mislabelled (sigmoid loss only)", group="preference")
    logprob: str = setting("mean", "a response's log-probability: mean over its tokens (the reference's) or sum (TRL, Tunix, the DPO paper)",
                           group="preference", choices=pl.LOGPROBS)
    reference_logprobs: str = setting("precompute", "precompute: the reference model's log-probabilities in one pass before training "
                                      "(kept and checkpointed; exact: it is frozen, without dropout); live: in every step, as the reference",
                                      group="preference", choices=REFERENCE_LOGPROBS)
    tie_head: bool = setting(False, "keep the LM head tied to wte (default: untie a tied one, as finetune-instruct)", group="model")
    style: str = setting("alpaca", "prompt style", group="data", choices=tuple(sorted(idata.PROMPT_STYLES)))
    allowed_max_length: int = setting(idata.DEFAULT_MAX_LENGTH, "cut texts to this many tokens (capped at the context length)", group="data")
    bucket_multiple: int = setting(32, "pad batch widths up to multiples of this (few static shapes)", group="data")
    limit: int | None = setting(None, "use only the first N entries (then split 85/10/5)", group="data")
    data: str | None = setting(None, "a local JSON list of {instruction, input, chosen, rejected} entries (default: the bundled "
                               "instruction-data-with-preference.json of the reference)", group="data")
    max_new_tokens: int = setting(256, "response length limit (greedy, eos stop)", group="responses")
    response_batch_size: int = setting(8, "prompts per generation batch", group="responses")
    responses: bool = setting(True, "generate the test split's responses of the policy and the reference model after training", group="responses")

    def validate(self) -> None:
        self.trainer.validate()
        if not (np.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label-smoothing is for the sigmoid loss (conservative DPO), not {self.loss}")
        idata.get_style(self.style)
        for name in ("bucket_multiple", "max_new_tokens", "response_batch_size", "allowed_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.reference_logprobs == "live" and run_mesh(self.trainer.mesh) is not None:
            raise ValueError("reference-logprobs live runs on one device: use precompute (the default) on a device mesh")


def data_file(recipe: PreferenceRecipe) -> Path:
    return Path(recipe.data) if recipe.data else data.bundled_file()


def reference_model(config: GPTConfig, params: Params) -> tuple[GPTConfig, Params]:
    """The frozen reference: the model without LoRA adapters (the base with adapters off)."""
    if not config.lora_rank:
        return config, params
    strip = lambda tree: {k: strip(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")} if isinstance(tree, dict) else tree
    return config.replace(lora_rank=0), strip(params)


class PreferenceTask(train.Task):
    """Batches of chosen/rejected pairs (with the reference's log-probabilities when precomputed);
    rewards besides the loss at every evaluation; both models' test responses at the end."""

    seen_label = "Tokens seen"
    seen_unit = "tokens"
    eval_metrics = {"reward_margin": "reward margins"}

    def __init__(self, recipe: PreferenceRecipe, config: GPTConfig, tokens: data.TokenizedPreferences, splits: idata.Splits,
                 tokenizer: Any, source: str | Path, progress: bool) -> None:
        self.recipe, self.config, self.splits, self.tokenizer = recipe, config, splits, tokenizer
        self.source, self.progress = source, progress
        self.max_length = min(recipe.allowed_max_length, config.context_length)
        n_train, n_test = len(splits.train), len(splits.test)
        self.parts = {"train": tokens.part(0, n_train), "test": tokens.part(n_train, n_train + n_test),
                      "validation": tokens.part(n_train + n_test, len(tokens))}
        self.n_over_length = tokens.n_over_length
        self.reference_logprobs: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # split -> (chosen, rejected) [n]
        self.reference: tuple[GPTConfig, Params] | None = None  # host copy, for live steps and the reference's responses
        self.precompute_seconds: float | None = None
        sample = splits.validation[2] if len(splits.validation) > 2 else splits.validation[0]  # the reference's val_data[2]
        self.sample_prompt = idata.format_prompt(sample, recipe.style)
        self.samples: list[str] = []
        self.compiled_before = gen.compilations()

    # ------------------------------------------------------------------ steps and the reference

    def step_options(self, config: GPTConfig, params: Params, mask: Params, log: Callable[[str], None]) -> dict[str, Any]:
        ref_config, ref_params = reference_model(config, params)
        if self.recipe.reference_logprobs == "live" or self.recipe.responses:  # a copy: the steps donate the state's arrays
            self.reference = (ref_config, jax.tree_util.tree_map(lambda x: np.array(x, copy=True), ref_params))
        if self.recipe.reference_logprobs == "live":
            return {"reference": (ref_config, jax.tree_util.tree_map(jnp.asarray, self.reference[1]))}
        start = time.perf_counter()
        logprobs = pl.make_logprobs_fn(ref_config, reduction=self.recipe.logprob, dtype=self.recipe.trainer.compute_dtype,
                                       attention=self.recipe.trainer.attention)
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, part in self.parts.items():
            chosen, rejected = np.zeros(len(part), np.float32), np.zeros(len(part), np.float32)
            for batch in self._collated(split, shuffle=False):
                c, r = jax.device_get(logprobs(ref_params, {k: batch[k] for k in ("chosen", "rejected", "chosen_mask", "rejected_mask")}))
                real = batch["weights"] > 0
                chosen[batch["index"][real]], rejected[batch["index"][real]] = c[real], r[real]
            found[split] = (chosen, rejected)
        self.precompute_seconds = time.perf_counter() - start
        if self.reference_logprobs is None:  # (a resumed run has the checkpoint's: the numbers it trained with)
            self.reference_logprobs = found
        log(f"reference log-probabilities of {sum(map(len, self.parts.values()))} pairs precomputed in {self.precompute_seconds:.1f} s")
        return {}

    def make_steps(self, config: GPTConfig, optimizer: Any, **options: Any) -> tuple[Callable, Callable]:
        r = self.recipe
        return pl.make_preference_steps(config, optimizer, beta=r.beta, loss=r.loss, label_smoothing=r.label_smoothing,
                                        reduction=r.logprob, **options)

    # ------------------------------------------------------------------ batches

    def _collated(self, split: str, *, shuffle: bool, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        # Training: shuffled, drop_last; evaluation: in order, the short last batch filled (weight 0).
        return data.preference_batches(self.parts[split], self.recipe.trainer.batch_size, shuffle=shuffle, drop_last=shuffle,
                                       seed=self.recipe.trainer.seed, epoch=epoch, allowed_max_length=self.max_length,
                                       bucket_multiple=self.recipe.bucket_multiple, fill_last_batch=not shuffle)

    def _batches(self, split: str, *, shuffle: bool, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._collated(split, shuffle=shuffle, epoch=epoch):
            if self.reference_logprobs is not None:
                chosen, rejected = self.reference_logprobs[split]
                batch["ref_chosen"], batch["ref_rejected"] = chosen[batch["index"]], rejected[batch["index"]]
            yield batch

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return self._batches("train", shuffle=True, epoch=epoch)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return self._batches(split, shuffle=False)

    def steps_per_epoch(self) -> int:
        return num_batches(len(self.splits.train), self.recipe.trainer.batch_size, drop_last=True)

    def seen(self, batch: dict[str, np.ndarray]) -> int:
        """The reference's batch["chosen"].numel(): rows x its tight width."""
        index = batch["index"][batch["weights"] > 0]
        return len(index) * data.tight_width(self.parts["train"], index, self.max_length)

    def describe(self, config: GPTConfig, params: Params, trainable: Params) -> str:
        s, r = self.splits, self.recipe
        return (f"{super().describe(config, params, trainable)} ({r.trainer.trainable}); splits: train {len(s.train)}, "
                f"validation {len(s.validation)}, test {len(s.test)}; {r.loss} loss, beta {r.beta}, {r.logprob} log-probabilities, "
                f"reference log-probabilities {r.reference_logprobs}; {self.n_over_length} longer than {self.max_length} tokens")

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, run: train.Run, batches: Iterator[dict[str, np.ndarray]], n: int | None = None) -> dict[str, float]:
        # the reference's compute_dpo_loss_loader: means of per-batch means; "accuracy": the reward accuracy over pairs
        return run.evaluate(batches, n, means=REWARDS)

    def initial(self, run: train.Run) -> dict[str, Any]:
        n = run.settings.eval_iter
        train_m, val_m = self._evaluate(run, self.train_batches(0), n), self._evaluate(run, self.eval_batches("validation"), n)
        run.log(f"Training loss: {train_m['loss']}")
        run.log(f"Validation loss: {val_m['loss']}")
        run.log(f"Train reward margin: {train_m['reward_margin']}")
        run.log(f"Val reward margin: {val_m['reward_margin']}")
        return {"initial_train_loss": train_m["loss"], "initial_validation_loss": val_m["loss"],
                "initial_train_reward_margin": train_m["reward_margin"], "initial_validation_reward_margin": val_m["reward_margin"]}

    def epoch_end(self, run: train.Run, epoch: int) -> None:
        text = sample_text(self.config, run.params, self.tokenizer, self.sample_prompt)
        self.samples.append(text)
        run.log(text)

    def final(self, run: train.Run) -> dict[str, Any]:
        beta, metrics = self.recipe.beta, {}
        for split in ("validation", "test"):
            m = self._evaluate(run, self.eval_batches(split))
            metrics.update({
                f"{split}_loss": m["loss"], f"{split}_reward_margin": m["reward_margin"], f"{split}_chosen_reward": m["chosen_reward"],
                f"{split}_rejected_reward": m["rejected_reward"], f"{split}_reward_accuracy": m["accuracy"],
                f"{split}_rewards": {"rewards/chosen": beta * m["chosen_reward"], "rewards/rejected": beta * m["rejected_reward"],
                                     "rewards/margins": beta * m["reward_margin"], "rewards/accuracies": m["accuracy"]},
            })
        run.log(f"Whole validation split: loss {metrics['validation_loss']:.3f}, reward margin {metrics['validation_reward_margin']:.3f}, "
                f"reward accuracy {metrics['validation_reward_accuracy']:.3f}; test split: loss {metrics['test_loss']:.3f}, "
                f"reward margin {metrics['test_reward_margin']:.3f}, reward accuracy {metrics['test_reward_accuracy']:.3f}")
        return metrics

    # ------------------------------------------------------------------ outputs and resume

    def model_metadata(self) -> dict[str, Any]:
        r = self.recipe
        return {"task": "instruction", "style": r.style, "mask_prompt": True, "base_model": r.trainer.model, "init": r.trainer.init,
                "allowed_max_length": self.max_length, "max_new_tokens": r.max_new_tokens, "preference": {"loss": r.loss, "beta": r.beta}}

    def pth_name(self, config: GPTConfig) -> str:
        return "model-dpo.pth"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"samples": list(self.samples)}
        if self.reference_logprobs is not None:  # JSON floats hold float32 values exactly
            state["reference_logprobs"] = {split: [c.tolist(), r.tolist()] for split, (c, r) in self.reference_logprobs.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = list(state.get("samples", []))
        if "reference_logprobs" in state:
            self.reference_logprobs = {split: (np.asarray(c, np.float32), np.asarray(r, np.float32))
                                       for split, (c, r) in state["reference_logprobs"].items()}

    def data_hash(self) -> str:
        return _hash_part(self.parts["train"])

    def data_hashes(self) -> dict[str, str]:
        return {f"{split} data (its {split} split of {self.source})": _hash_part(part) for split, part in self.parts.items()}

    def outputs(self, run: train.Run, out_dir: Path, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        history, outputs = run.history, {"plots": []}
        margins = (history.eval_metrics.get("train_reward_margin", []), history.eval_metrics.get("validation_reward_margin", []))
        if margins[0]:
            epochs_run = history.total_steps / self.steps_per_epoch()
            drawn = plot_values(epochs_run, history.total_seen, margins[0], margins[1], out_dir, "reward margin", seen_label=self.seen_label)
            outputs["plots"] += [str(p) for p in drawn]
        response_seconds = None
        if self.recipe.responses:
            t0 = time.perf_counter()
            for name, (config, model_params) in (("policy", (self.config, params)), ("reference", self.reference)):
                path = out_dir / (POLICY_RESPONSES_FILE if name == "policy" else REFERENCE_RESPONSES_FILE)
                texts = generate_responses(
                    config, model_params, self.splits.test, self.tokenizer, style=self.recipe.style, max_new_tokens=self.recipe.max_new_tokens,
                    batch_size=self.recipe.response_batch_size, progress=self.progress, source=self.source,
                    mesh=run.mesh if jax.process_count() == 1 else None, log=run.log,
                )
                write_json(path, [{**entry, "model_response": text} for entry, text in zip(self.splits.test, texts)])
                outputs[f"{name}_responses"] = str(path)
                run.log(f"wrote {len(texts)} {name} responses to {path}")
            response_seconds = time.perf_counter() - t0
        metrics = {
            "eval_train_reward_margins": margins[0], "eval_validation_reward_margins": margins[1],
            "eval_tokens_seen": history.seen, "tokens_seen": history.total_seen,
            "reference_logprobs_seconds": self.precompute_seconds, "response_seconds": response_seconds,
            "generate_compilations": gen.compilations() - self.compiled_before, "epoch_samples": self.samples,
            "split_sizes": {name: len(getattr(self.splits, name)) for name in ("train", "validation", "test")},
        }
        return metrics, outputs


def _hash_part(part: Any) -> str:
    """A split's tokens (prompt lengths, chosen and rejected), for the resume's data comparison."""
    flat = lambda seqs: (np.array([len(s) for s in seqs], np.int64), np.array([t for s in seqs for t in s], np.int64))
    return hash_arrays(np.array(part.prompt_lengths, np.int64), *flat(part.chosen), *flat(part.rejected))


def run(recipe: PreferenceRecipe, out_dir: str | Path, entries: Sequence[Entry] | str | Path | None = None, tokenizer: Any = None, *,
        log: Callable[[str], None] = print, progress: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False,
        claim: Callable[[], Path] | None = None, timing: Timing | None = None) -> dict[str, Any]:
    """Preference-tune on `entries` (a list, a JSON file, or None: the recipe's data file), evaluate,
    plot, generate both models' test responses and save everything in `out_dir`. Returns the
    metrics (also `out_dir/metrics.json`, written last). `recipe` must be valid. `timing`: see `train.fit`."""
    settings, timing = recipe.trainer, Timing() if timing is None else timing
    data_started = time.perf_counter()
    source: str | Path = "<data>"
    if entries is None:
        entries = data_file(recipe)
    if isinstance(entries, (str, Path)):
        source = Path(entries)
        entries = data.load_entries(source)
    else:
        entries = data.validate_entries(list(entries), source)
    if recipe.limit is not None:
        entries = entries[: recipe.limit]
    splits = idata.split_entries(entries)
    for name in ("train", "validation", "test"):
        if not getattr(splits, name):
            raise ValueError(f"{source}: {len(entries)} entries leave the {name} split empty (85/10/5 split); use more entries")
    if settings.batch_size > len(splits.train):
        raise ValueError(f"batch size {settings.batch_size} is larger than the {len(splits.train)} training entries (drop_last would leave no batch)")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    start = time.perf_counter()
    timing.seconds["data_s"] += start - data_started

    key_model, key_lora = jax.random.split(jax.random.PRNGKey(settings.seed))
    with timing.phase("model_s"):
        config, params = resolve_model(settings.model, init=settings.init, models_dir=settings.models_dir, key=key_model, drop_rate=settings.drop_rate)
    if config.num_classes is not None:
        raise ValueError(f"{settings.model}: a classification model; preference tuning needs a language model")
    if config.lora_rank:
        raise ValueError(f"{settings.model}: a model with LoRA adapters; merge them first (the reference model is the model without adapters)")
    if not recipe.tie_head:
        config, params = untie_head(config, params)
    if settings.lora_rank:
        config, params = add_lora(config, params, settings.lora_rank, settings.lora_alpha, key_lora)
    if recipe.responses and recipe.max_new_tokens >= config.context_length:
        raise ValueError(f"max-new-tokens ({recipe.max_new_tokens}) must be smaller than the context length ({config.context_length})")
    max_length = min(recipe.allowed_max_length, config.context_length)
    with timing.phase("data_s"):
        tokens = data.tokenize_entries(entries, tokenizer, recipe.style, max_length=max_length, source=source)
    _check_vocabulary(settings.model, config, idata.TokenizedInstructions(tokens.chosen + tokens.rejected, tokens.prompt_lengths * 2))
    optim.trainable_blocks(config, settings.trainable)
    task = PreferenceTask(recipe, config, tokens, splits, tokenizer, source, progress)
    if claim is not None:
        checkpoint_dir = claim()
    return train.fit(settings, config, params, task, out_dir, record=dataclasses.asdict(recipe), log=log, started=start,
                     checkpoint_dir=checkpoint_dir, resume=resume, timing=timing)
