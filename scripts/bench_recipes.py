#!/usr/bin/env python
"""The end-to-end race: whole fine-tuning recipes, the reference's own loops against the jaxft commands.

Same weights, same data, same CPU, one run. Three races:

1. classification, the reference's recipe (pad to the longest training text = 120 tokens, the
   last position's logits, last block + final norm + head trainable, 5 epochs, evaluation every
   50 steps on 5 batches, accuracy after every epoch, final accuracies on the whole splits):
   `jaxft finetune-classifier` against chapter 6's `train_classifier_simple` (with its
   `calc_loss_loader`, `calc_accuracy_loader`, `evaluate_model`), the initial losses before it
   and the final accuracies after it;
2. `jaxft finetune-classifier --pooling last-non-pad --padding bucket` against the same
   reference recipe (1.); its test accuracy is compared with jaxft's padded run;
3. instruction fine-tuning (all parameters, the reference's separate output head, batch 8,
   2 epochs, evaluation every 5 steps on 5 batches, a 50-token sample after every epoch, then
   a response for every test entry, up to --max-new-tokens): `jaxft finetune-instruct`
   against chapter 7's `train_model_simple` with `custom_collate_fn` and the reference's
   one-prompt-at-a-time `generate(..., eos_id=50256)` (tests/reference_gpt.py). The model is
   the --size shape (gpt2-small by default, not the reference's gpt2-medium: time).
4. preference tuning (`--races pref`, scripts/bench_preference.py): `jaxft finetune-preference`
   against the reference's dpo-from-scratch loop, whole recipe and per step.

Weights: a random model of the --size shape (no pretrained GPT-2 exists here), written once as
a jaxft checkpoint directory that the commands load with `--model DIR --init pretrained`; the
reference's GPTModel gets the same values (`params_to_state_dict`), and the classifier head is
built as the recipe builds it (`with_classifier_head` with the recipe's key for --seed). The
initial losses (before any update) check that both sides start from the same model.

Data: the bundled SMS Spam Collection and instruction-data.json, tokenized once by jaxft; the
reference's torch DataLoaders get the same token ids and visit the training examples in jaxft's
order (`jaxft.data.batching.permutation(n, seed, epoch)`, through a batch sampler with
`set_epoch`, as a DistributedSampler is used), so the loss curves are comparable step by step.

Timing: each jaxft command runs as a subprocess; its figure is the process's wall time (start-up,
data, compilation, training, evaluations, saving: everything), with metrics.json's
train_seconds alongside. The reference's figure is the time of its recipe in this process
(model already built: the reference's loops, evaluations and final accuracies; for 3., also the
responses). With --ref-steps N the reference runs only its first N steps (with the evaluations
that fall in them, one epoch-end evaluation, and --ref-prompts responses) and the rest is
extrapolated from what it measured: seconds per token of training steps, of evaluation forward
passes, per epoch-end sample and per response. The table says which figures are measured and
which extrapolated. Ratios compare the SAME work: the reference's time for as many steps as
jaxft ran (jaxft's --max-steps, if given) against jaxft's wall time.

    python scripts/bench_recipes.py --quick                       # tiny model, < 1 minute
    python scripts/bench_recipes.py --ref-steps 20                # gpt2-small, jaxft's whole recipes
    python scripts/bench_recipes.py --ref-steps 10 --max-steps 30 --max-new-tokens 32   # shorter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests", REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# On a GPU this process (the reference, torch) and each jaxft command share the card: no process
# may take 75% of it up front, as JAX does by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxft  # noqa: E402
from bench_preference import preference_race, report_lines  # noqa: E402
from bench_train import cpu_name, load_average, parse_size  # noqa: E402
from jaxft import sources  # noqa: E402
from jaxft.config import GPTConfig  # noqa: E402
from jaxft.data import instruct as idata  # noqa: E402
from jaxft.data import spam  # noqa: E402
from jaxft.recipes.classify import encode_splits, with_classifier_head  # noqa: E402
from jaxft.weights.torch_ref import params_to_state_dict  # noqa: E402
from reference_gpt import GPTModel, config_dict, generate  # noqa: E402
from reference_training import (  # noqa: E402
    METER,
    InstructionDataset,
    Meter,
    SpamDataset,
    calc_accuracy_loader,
    calc_loss_batch_lm,
    calc_loss_loader,
    custom_collate_fn,
    loader,
    text_to_token_ids,
    token_ids_to_text,
    train_classifier_simple,
    train_model_simple,
)

PAD = 50256
LR, WEIGHT_DECAY = 5e-5, 0.1
# Where the reference's model runs (--ref-device); set once by main() before any race.
REF_DEVICE = torch.device("cpu")


# --------------------------------------------------------------------------- models


def reference_model(config: GPTConfig, params) -> torch.nn.Module:
    model = GPTModel(config_dict(config))
    if config.num_classes is not None:
        model.out_head = torch.nn.Linear(config.emb_dim, config.num_classes)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(config, params).items()})
    return model.to(REF_DEVICE)


def make_checkpoint(config: GPTConfig, seed: int, directory: Path):
    """Random weights of `config` (jaxft's init) saved as a jaxft checkpoint: (config, params)."""
    params = jaxft.init_params(config, jax.random.key(seed + 1000))
    params = jax.tree_util.tree_map(np.asarray, params)
    jaxft.export(config, params, directory, "jaxft")
    return config, params


def recipe_head(config: GPTConfig, params, num_classes: int, seed: int):
    """The classifier head exactly as jaxft.recipes.classify.run builds it for --seed."""
    _, key_head, _ = jax.random.split(jax.random.PRNGKey(seed), 3)
    cls_config, cls_params = with_classifier_head(config, params, num_classes, key_head)
    return cls_config, jax.tree_util.tree_map(np.asarray, cls_params)


# --------------------------------------------------------------------------- the jaxft side


def run_jaxft(name: str, command: str, flags: list[str], out_dir: Path, root: Path, log_dir: Path) -> dict[str, Any]:
    """Run `python -m jaxft COMMAND FLAGS --out OUT_DIR --overwrite` (OUT_DIR is scratch: a rerun in
    the same --work-dir replaces the last run's); its wall time and metrics.json."""
    argv = [sys.executable, "-m", "jaxft", command, *flags, "--out", str(out_dir), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = log_dir / f"{name}.log"
    print(f"[jaxft {name}] {shlex.join(argv[1:])}", flush=True)
    load_before = load_average()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"jaxft {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"[jaxft {name}] wall {wall:.1f} s, train_seconds {metrics['train_seconds']:.1f} s, steps {metrics['steps']}", flush=True)
    return {"argv": argv, "wall_s": wall, "metrics": metrics, "log": str(log_path), "load_before": load_before, "load_after": load_average()}


# --------------------------------------------------------------------------- work counts (for the extrapolation)


def first_batches_tokens(batch_tokens: list[float], k: int) -> float:
    return float(sum(batch_tokens[: min(k, len(batch_tokens))]))


@dataclass
class Work:
    """Tokens per kind of work of a recipe cut after `steps` steps."""

    units: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, units: float) -> None:
        self.units[kind] += units

    def seconds(self, meter: Meter) -> tuple[float | None, list[str]]:
        """Estimated seconds from the meter's rates; None if a kind has no measured rate.
        Evaluation-like work (final accuracies) uses the evaluation rate."""
        total, missing = 0.0, []
        for kind, units in self.units.items():
            rate = meter.rate(kind)
            if rate is None:
                missing.append(kind)
            else:
                total += units * rate
        return (None if missing else total), missing


def recipe_work(steps: int, *, epochs: int, train_batches: Callable[[int], list[float]], val_batches: list[float],
                eval_freq: int, eval_iter: int, epoch_end: Callable[[int, Work], None], final: Callable[[Work], None] | None) -> Work:
    """The work of the reference's recipe stopped after `steps` steps (all of it when steps = epochs x batches).
    `train_batches(epoch)` lists each training batch's tokens in the epoch's order."""
    work = Work()
    work.add("eval", first_batches_tokens(train_batches(0), eval_iter) + first_batches_tokens(val_batches, eval_iter))  # initial losses
    step = 0
    for epoch in range(epochs):
        batches = train_batches(epoch)
        for tokens in batches:
            work.add("step", tokens)
            if step % eval_freq == 0:
                work.add("eval", first_batches_tokens(batches, eval_iter) + first_batches_tokens(val_batches, eval_iter))
            step += 1
            if step >= steps:
                break
        epoch_end(epoch, work)
        if step >= steps:
            break
    if final is not None:
        final(work)
    return work


# --------------------------------------------------------------------------- the races


def loss_agreement(ref: dict[str, Any], jx: dict[str, Any], points: int) -> dict[str, Any]:
    """max |reference - jaxft| over the first `points` common evaluation points (initial losses included)."""
    ref_pts = {"initial": (ref["initial_train_loss"], ref["initial_validation_loss"])}
    ref_pts.update({s: (t, v) for s, t, v in zip(ref["eval_steps"], ref["eval_train_losses"], ref["eval_validation_losses"])})
    jx_pts = {"initial": (jx["initial_train_loss"], jx["initial_validation_loss"])}
    jx_pts.update({s: (t, v) for s, t, v in zip(jx["eval_steps"], jx["eval_train_losses"], jx["eval_validation_losses"])})
    common = [k for k in ref_pts if k in jx_pts][:points]
    rows = [{"at": k, "reference": ref_pts[k], "jaxft": jx_pts[k],
             "abs_diff": [abs(a - b) for a, b in zip(ref_pts[k], jx_pts[k])]} for k in common]
    return {"points": rows, "max_abs_diff": max((max(r["abs_diff"]) for r in rows), default=None)}


def classification_race(args, config, params, tokenizer, work_dir: Path, ckpt: Path, results: dict) -> None:
    seed, bs, epochs = args.seed, args.batch_size, args.cls_epochs
    dataset = spam.splits_with_classes(sources.sms_spam_file(), seed=seed)
    data = encode_splits(dataset.frames(), dataset.class_names, tokenizer, max_length=None, context_length=config.context_length)
    n_train = len(data.train)
    per_epoch = n_train // bs
    total_steps = epochs * per_epoch
    jaxft_steps = min(args.max_steps, total_steps) if args.max_steps else total_steps
    ref_steps = min(args.ref_steps, jaxft_steps) if args.ref_steps else jaxft_steps
    eval_freq, eval_iter = args.cls_eval_freq, args.eval_iter
    width = data.max_length
    print(f"\n## classification: {n_train}/{len(data.validation)}/{len(data.test)} examples, padded to {width}, "
          f"{per_epoch} steps/epoch x {epochs} = {total_steps} steps; jaxft runs {jaxft_steps}, the reference {ref_steps}", flush=True)

    common = ["--model", str(ckpt), "--init", "pretrained", "--epochs", str(epochs), "--batch-size", str(bs),
              "--eval-freq", str(eval_freq), "--eval-iter", str(eval_iter), "--seed", str(seed), "--compile-cache", args.compile_cache]
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    common += shlex.split(args.cls_args)
    runs = {}
    if "cls" in args.races:
        runs["cls"] = run_jaxft("classify-reference-recipe", "finetune-classifier", common, work_dir / "cls", args.jaxft_root, work_dir)

    # The reference, same work as jaxft's (steps), measured for its first ref_steps.
    cls_config, cls_params = recipe_head(config, params, len(data.class_names), seed)
    METER.reset()
    torch.manual_seed(seed)
    model = reference_model(cls_config, cls_params)
    for p in model.parameters():
        p.requires_grad = False
    for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
        for p in module.parameters():
            p.requires_grad = True
    train_loader = loader(SpamDataset(data.train), bs, shuffle=True, seed=seed)
    val_loader = loader(SpamDataset(data.validation), bs, shuffle=False, seed=seed)
    test_loader = loader(SpamDataset(data.test), bs, shuffle=False, seed=seed)
    device = REF_DEVICE
    run_final = ref_steps == jaxft_steps or args.ref_final
    quiet = (lambda s: None) if args.quiet_reference else (lambda s: print("  [reference] " + s, flush=True))

    load_before = load_average()
    t0 = time.perf_counter()
    train_loader.batch_sampler.set_epoch(0)
    with torch.no_grad():  # the reference's initial losses (chapter 6, 5.3)
        init_train = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        init_val = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tl, vl, ta, va, seen, eval_steps = train_classifier_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=epochs, eval_freq=eval_freq, eval_iter=eval_iter,
        tokenizer=tokenizer, max_steps=ref_steps, log=quiet)
    final = {}
    if run_final:  # the reference's final accuracies on the whole splits (chapter 6, 6.5)
        train_loader.batch_sampler.set_epoch(epochs)  # a fresh shuffle; jaxft's is permutation(n, seed, epochs)
        final = {f"{name}_accuracy": calc_accuracy_loader(dl, model, device)
                 for name, dl in (("train", train_loader), ("validation", val_loader), ("test", test_loader))}
    METER.sync()  # the reference's queued GPU work, before the clock reads
    ref_wall = time.perf_counter() - t0
    ref = {"initial_train_loss": init_train, "initial_validation_loss": init_val, "eval_steps": eval_steps,
           "eval_train_losses": tl, "eval_validation_losses": vl, "epoch_train_accuracy": ta, "epoch_validation_accuracy": va,
           "examples_seen": seen, "steps_run": ref_steps, "final_run": run_final, **final,
           "measured_wall_s": ref_wall, "meter": METER.to_dict(), "load_before": load_before, "load_after": load_average()}
    del model, optimizer

    # Work of the reference's recipe after S steps, in tokens.
    train_b = lambda epoch: [float(bs * width)] * per_epoch
    val_b = [float(n * width) for n in np.diff(np.r_[0:len(data.validation):bs, len(data.validation)])]
    test_n = len(data.test)

    def epoch_end(epoch, work):
        work.add("eval", first_batches_tokens(train_b(epoch), eval_iter) + first_batches_tokens(val_b, eval_iter))

    def final_work(work):
        work.add("eval", per_epoch * bs * width + len(data.validation) * width + test_n * width)

    def est(steps):
        return recipe_work(steps, epochs=epochs, train_batches=train_b, val_batches=val_b, eval_freq=eval_freq,
                           eval_iter=eval_iter, epoch_end=epoch_end, final=final_work).seconds(METER)[0]

    measured_same = ref_steps == jaxft_steps and run_final
    ref["same_work_as_jaxft_s"] = ref_wall if measured_same else est(jaxft_steps)
    ref["same_work_measured"] = measured_same
    whole_measured = measured_same and jaxft_steps == total_steps
    ref["whole_recipe_s"] = ref_wall if whole_measured else est(total_steps)
    ref["whole_recipe_measured"] = whole_measured
    ref["seconds_per_step"] = METER.seconds["step"] / max(ref_steps, 1)
    print(f"[reference classification] {ref_steps} steps measured in {ref_wall:.1f} s "
          f"({ref['seconds_per_step']:.2f} s/step); same work as jaxft: {ref['same_work_as_jaxft_s']:.1f} s "
          f"({'measured' if measured_same else 'extrapolated'}); whole recipe {ref['whole_recipe_s']:.1f} s "
          f"({'measured' if whole_measured else 'extrapolated'})", flush=True)

    if "bucket" in args.races:
        flags = common + ["--pooling", "last-non-pad", "--padding", "bucket"]
        runs["bucket"] = run_jaxft("classify-last-non-pad-bucket", "finetune-classifier", flags, work_dir / "bucket", args.jaxft_root, work_dir)

    results["classification"] = {
        "split_sizes": [n_train, len(data.validation), len(data.test)], "padded_length": width, "steps_per_epoch": per_epoch,
        "whole_recipe_steps": total_steps, "jaxft_steps": jaxft_steps, "reference": ref,
        "jaxft": runs,
    }
    if "cls" in runs:
        results["classification"]["loss_agreement"] = loss_agreement(ref, runs["cls"]["metrics"], args.agree_points)


def instruct_race(args, config, params, tokenizer, work_dir: Path, ckpt: Path, results: dict) -> None:
    seed, bs, epochs = args.seed, args.batch_size, args.instruct_epochs
    entries = idata.load_entries(sources.instruction_data_file())
    if args.instruct_limit:
        entries = entries[: args.instruct_limit]
    splits = idata.split_entries(entries)
    tokens = idata.tokenize_entries(entries, tokenizer, "alpaca", max_length=config.context_length)
    n_train, n_test = len(splits.train), len(splits.test)
    train_ids = tokens.token_ids[:n_train]
    val_ids = tokens.token_ids[n_train + n_test :]
    per_epoch = n_train // bs
    total_steps = epochs * per_epoch
    jaxft_steps = min(args.max_steps, total_steps) if args.max_steps else total_steps
    ref_steps = min(args.ref_steps, jaxft_steps) if args.ref_steps else jaxft_steps
    n_prompts = n_test if args.ref_prompts is None else min(args.ref_prompts, n_test)
    eval_freq, eval_iter, allowed = args.instruct_eval_freq, args.eval_iter, min(1024, config.context_length)
    print(f"\n## instruction: {n_train}/{len(val_ids)}/{n_test} entries, {per_epoch} steps/epoch x {epochs} = {total_steps} steps; "
          f"jaxft runs {jaxft_steps}, the reference {ref_steps}; responses up to {args.max_new_tokens} tokens "
          f"(the reference: {n_prompts} of {n_test} prompts)", flush=True)

    flags = ["--model", str(ckpt), "--init", "pretrained", "--trainable", "all", "--epochs", str(epochs),
             "--batch-size", str(bs), "--eval-freq", str(eval_freq), "--eval-iter", str(eval_iter), "--seed", str(seed),
             "--max-new-tokens", str(args.max_new_tokens), "--compile-cache", args.compile_cache]
    if args.max_steps:
        flags += ["--max-steps", str(args.max_steps)]
    if args.instruct_limit:
        flags += ["--limit", str(args.instruct_limit)]
    flags += shlex.split(args.instruct_args)
    runs = {"responses": run_jaxft("instruct", "finetune-instruct", flags, work_dir / "instruct", args.jaxft_root, work_dir)}
    if args.instruct_both:
        runs["no_responses"] = run_jaxft("instruct-no-responses", "finetune-instruct", flags + ["--no-responses"],
                                         work_dir / "instruct-nr", args.jaxft_root, work_dir)

    METER.reset()
    torch.manual_seed(seed)
    model = reference_model(config, params)  # the reference's separate out_head, a copy of wte
    collate = partial(custom_collate_fn, device=REF_DEVICE, allowed_max_length=1024)
    train_loader = loader(InstructionDataset(train_ids), bs, shuffle=True, seed=seed, collate_fn=collate)
    val_loader = loader(InstructionDataset(val_ids), bs, shuffle=False, seed=seed, collate_fn=collate)
    device = REF_DEVICE
    quiet = (lambda s: None) if args.quiet_reference else (lambda s: print("  [reference] " + s, flush=True))

    load_before = load_average()
    t0 = time.perf_counter()
    train_loader.batch_sampler.set_epoch(0)
    with torch.no_grad():  # chapter 7, 6.1
        init_train = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, calc_loss_batch=calc_loss_batch_lm)
        init_val = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, calc_loss_batch=calc_loss_batch_lm)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    t_train = time.perf_counter()
    tl, vl, track, tokens_seen, eval_steps = train_model_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=epochs, eval_freq=eval_freq, eval_iter=eval_iter,
        start_context=idata.format_prompt(splits.validation[0], "alpaca"), tokenizer=tokenizer, max_steps=ref_steps, log=quiet)
    METER.sync()  # the reference's queued GPU work, before the clock reads
    train_loop_s = time.perf_counter() - t_train
    model.eval()
    responses = []
    for entry in splits.test[:n_prompts]:  # chapter 7, 7.2, one prompt at a time
        input_text = idata.format_prompt(entry, "alpaca")
        idx = text_to_token_ids(input_text, tokenizer).to(REF_DEVICE)
        with METER.clock("response", 1):
            token_ids = generate(model=model, idx=idx, max_new_tokens=args.max_new_tokens, context_size=config.context_length, eos_id=PAD)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        responses.append({"prompt_tokens": idx.shape[1], "new_tokens": token_ids.shape[1] - idx.shape[1],
                          "response": generated_text[len(input_text):].replace("### Response:", "").strip()})
    METER.sync()  # the reference's queued GPU work, before the clock reads
    ref_wall = time.perf_counter() - t0
    ref = {"initial_train_loss": init_train, "initial_validation_loss": init_val, "eval_steps": eval_steps,
           "eval_train_losses": tl, "eval_validation_losses": vl, "eval_tokens_seen": track, "tokens_seen": tokens_seen,
           "steps_run": ref_steps, "train_loop_s": train_loop_s, "train_tokens_per_s": tokens_seen / train_loop_s,
           "step_tokens_per_s": METER.units["step"] / METER.seconds["step"], "prompts_run": n_prompts, "responses": responses,
           "measured_wall_s": ref_wall, "meter": METER.to_dict(), "load_before": load_before, "load_after": load_average()}
    del model, optimizer

    # Tokens per training / evaluation batch as the reference's collate makes them (allowed_max_length 1024).
    def numel(idx, ids):
        return float(len(idx) * min(max(len(ids[i]) for i in idx), allowed))

    train_b = lambda epoch: [numel(idx, train_ids) for idx in idata.batch_indices(n_train, bs, shuffle=True, drop_last=True, seed=seed, epoch=epoch)]
    val_b = [numel(idx, val_ids) for idx in idata.batch_indices(len(val_ids), bs, shuffle=False, drop_last=False, seed=seed)]

    def est(steps, with_responses):
        def final(work):
            if with_responses:
                work.add("response", n_test)
        work = recipe_work(steps, epochs=epochs, train_batches=train_b, val_batches=val_b, eval_freq=eval_freq,
                           eval_iter=eval_iter, epoch_end=lambda e, w: w.add("sample", 1), final=final)
        return work.seconds(METER)[0], work

    same_measured = ref_steps == jaxft_steps
    resp_measured = n_prompts == n_test
    measured_no_resp = ref_wall - METER.seconds["response"]
    s_nr, _ = est(jaxft_steps, False)
    s_r, _ = est(jaxft_steps, True)
    w_nr, whole_work = est(total_steps, False)
    w_r, _ = est(total_steps, True)
    ref["same_work_no_responses_s"] = measured_no_resp if same_measured else s_nr
    ref["same_work_no_responses_measured"] = same_measured
    ref["same_work_with_responses_s"] = ref_wall if (same_measured and resp_measured) else s_r
    ref["same_work_with_responses_measured"] = same_measured and resp_measured
    ref["response_s_all_prompts"] = (METER.rate("response") or math.nan) * n_test
    ref["whole_recipe_no_responses_s"] = w_nr if not (same_measured and jaxft_steps == total_steps) else measured_no_resp
    ref["whole_recipe_with_responses_s"] = w_r if not (same_measured and resp_measured and jaxft_steps == total_steps) else ref_wall
    ref["whole_recipe_tokens"] = whole_work.units.get("step", 0.0)
    print(f"[reference instruction] {ref_steps} steps in {train_loop_s:.1f} s ({ref['train_tokens_per_s']:.0f} training tok/s), "
          f"{n_prompts} response(s) in {METER.seconds['response']:.1f} s; same work as jaxft: "
          f"{ref['same_work_with_responses_s']:.1f} s with responses, {ref['same_work_no_responses_s']:.1f} s without", flush=True)

    jx = runs["responses"]["metrics"]
    results["instruction"] = {
        "split_sizes": [n_train, len(val_ids), n_test], "steps_per_epoch": per_epoch, "whole_recipe_steps": total_steps,
        "jaxft_steps": jaxft_steps, "max_new_tokens": args.max_new_tokens, "reference": ref, "jaxft": runs,
        "loss_agreement": loss_agreement(ref, jx, args.agree_points),
    }


# --------------------------------------------------------------------------- report


def cache_note(metrics: dict[str, Any]) -> str:
    """', trunk cache 38.6 s (46,080 positions)' from metrics.json's trunk_cache, or why it was not used."""
    cache = metrics.get("trunk_cache")
    if not cache:
        return ""
    if not cache.get("used"):
        return f", no trunk cache ({cache.get('reason')})"
    positions = f" ({cache['positions']:,} positions)" if "positions" in cache else ""
    return f", trunk cache {cache['seconds']:.1f} s{positions}"


def fmt_s(seconds: float | None, measured: bool | None = None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    return f"{seconds:.1f}" + ("" if measured is None else (" (measured)" if measured else " (extrapolated)"))


def ratio(ref: float | None, jx: float | None) -> str:
    return f"{ref / jx:.2f}x" if ref and jx and math.isfinite(ref) else "n/a"


def report(results: dict) -> str:
    lines = ["| recipe | jaxft wall s (train s) | reference s, same work | speed-up | loss agreement max abs diff | accuracy / tokens/s |",
             "|---|---|---|---|---|---|"]
    notes = []
    cls = results.get("classification")
    if cls:
        ref = cls["reference"]
        ref_s, ref_m = ref["same_work_as_jaxft_s"], ref["same_work_measured"]
        padded_test = None
        if "cls" in cls["jaxft"]:
            jx = cls["jaxft"]["cls"]
            m = jx["metrics"]
            agree = cls["loss_agreement"]
            padded_test = m.get("test_accuracy")
            acc = f"test jaxft {100 * m['test_accuracy']:.2f}%" + (f", reference {100 * ref['test_accuracy']:.2f}%" if "test_accuracy" in ref else "")
            cache = cache_note(m)
            lines.append(f"| classification, the reference's recipe (pad {cls['padded_length']}, last token), {m['steps']} steps{cache} | "
                         f"{jx['wall_s']:.1f} ({m['train_seconds']:.1f}) | {fmt_s(ref_s, ref_m)} | {ratio(ref_s, jx['wall_s'])} | "
                         f"{agree['max_abs_diff']:.2e} over {len(agree['points'])} points | {acc} |")
        if "bucket" in cls["jaxft"]:
            jx = cls["jaxft"]["bucket"]
            m = jx["metrics"]
            diff = f" ({100 * (m['test_accuracy'] - padded_test):+.2f} points vs padded)" if padded_test is not None else ""
            cache = cache_note(m)
            lines.append(f"| classification, --pooling last-non-pad --padding bucket, {m['steps']} steps{cache} | "
                         f"{jx['wall_s']:.1f} ({m['train_seconds']:.1f}) | {fmt_s(ref_s, ref_m)} (the reference's recipe) | "
                         f"{ratio(ref_s, jx['wall_s'])} | n/a (other pooling) | test jaxft {100 * m['test_accuracy']:.2f}%{diff} |")
        notes.append(f"classification: the reference ran {ref['steps_run']} of {cls['jaxft_steps']} steps in {ref['measured_wall_s']:.1f} s "
                     f"({ref['seconds_per_step']:.2f} s/step); its whole recipe ({cls['whole_recipe_steps']} steps, evaluations, "
                     f"final accuracies) is {fmt_s(ref['whole_recipe_s'], ref['whole_recipe_measured'])} s.")
    ins = results.get("instruction")
    if ins:
        ref = ins["reference"]
        jx = ins["jaxft"]["responses"]
        m = jx["metrics"]
        agree = ins["loss_agreement"]
        resp_s = m.get("response_seconds") or 0.0
        jx_tps = m["tokens_seen"] / m["train_seconds"]
        if "no_responses" in ins["jaxft"]:
            nr = ins["jaxft"]["no_responses"]
            jx_nr, nr_note = nr["wall_s"], "measured, --no-responses"
        else:
            jx_nr, nr_note = jx["wall_s"] - resp_s, "wall minus response_seconds"
        tps = f"train tok/s jaxft {jx_tps:.0f}, reference {ref['train_tokens_per_s']:.0f} ({jx_tps / ref['train_tokens_per_s']:.2f}x)"
        lines.append(f"| instruction, all trainable, {m['steps']} steps, no responses ({nr_note}) | {jx_nr:.1f} ({m['train_seconds']:.1f}) | "
                     f"{fmt_s(ref['same_work_no_responses_s'], ref['same_work_no_responses_measured'])} | "
                     f"{ratio(ref['same_work_no_responses_s'], jx_nr)} | {agree['max_abs_diff']:.2e} over {len(agree['points'])} points | {tps} |")
        lines.append(f"| instruction, + the test split's {ins['split_sizes'][2]} responses (<= {ins['max_new_tokens']} tokens) | "
                     f"{jx['wall_s']:.1f} (responses {resp_s:.1f}) | "
                     f"{fmt_s(ref['same_work_with_responses_s'], ref['same_work_with_responses_measured'])} | "
                     f"{ratio(ref['same_work_with_responses_s'], jx['wall_s'])} | | reference responses {fmt_s(ref['response_s_all_prompts'], ref['prompts_run'] == ins['split_sizes'][2])} s |")
        notes.append(f"instruction: the reference ran {ref['steps_run']} of {ins['jaxft_steps']} steps ({ref['tokens_seen']} tokens, "
                     f"{ref['train_loop_s']:.1f} s) and {ref['prompts_run']} of {ins['split_sizes'][2]} prompts; its whole recipe "
                     f"({ins['whole_recipe_steps']} steps) is {fmt_s(ref['whole_recipe_no_responses_s'])} s without responses, "
                     f"{fmt_s(ref['whole_recipe_with_responses_s'])} s with them (extrapolated unless everything ran).")
    pref_rows, pref_notes = report_lines(results)
    lines += pref_rows
    notes += pref_notes
    devices = results["machine"].get("devices")
    if devices:
        notes.append(f"devices: the reference on {devices['reference']}, jaxft on {devices['jaxft']}.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", default="gpt2-small", help="GPT-2 size name or EMBxLAYERSxHEADS")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 64x2x2 model, 4 steps, evaluations every 2 steps on 1 batch, 8-token responses, 200 instruction entries")
    parser.add_argument("--races", default="cls,bucket,instruct", help="comma list of cls, bucket, instruct, pref")
    parser.add_argument("--ref-steps", type=int, default=None, help="the reference runs only its first N steps; the rest is extrapolated")
    parser.add_argument("--ref-final", action="store_true", help="with --ref-steps, still run the reference's final accuracies on the whole splits")
    parser.add_argument("--ref-prompts", type=int, default=1, help="test prompts the reference answers (the rest extrapolated); -1: all")
    parser.add_argument("--max-steps", type=int, default=None, help="jaxft's --max-steps (both sides then race that much of the recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="response length limit (the reference's 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cls-epochs", type=int, default=5)
    parser.add_argument("--instruct-epochs", type=int, default=2)
    parser.add_argument("--cls-eval-freq", type=int, default=50)
    parser.add_argument("--instruct-eval-freq", type=int, default=5)
    parser.add_argument("--eval-iter", type=int, default=5)
    parser.add_argument("--pref-eval-freq", type=int, default=5, help="the preference race's evaluation period (the reference's 5)")
    parser.add_argument("--pref-step-batches", type=int, default=4, help="training batches of the preference per-step timing (the first one warms up)")
    parser.add_argument("--instruct-limit", type=int, default=None, help="use only the first N instruction entries (jaxft's --limit)")
    parser.add_argument("--instruct-both", action="store_true", help="also run finetune-instruct --no-responses (else: wall minus response_seconds)")
    parser.add_argument("--cls-args", default="", help="extra flags for both finetune-classifier runs (e.g. '--trunk-cache off')")
    parser.add_argument("--instruct-args", default="", help="extra flags for finetune-instruct")
    parser.add_argument("--compile-cache", default="off", help="jaxft's --compile-cache (default off: compilation is timed)")
    parser.add_argument("--jaxft-root", type=Path, default=REPO, help="the checkout whose jaxft the commands run")
    parser.add_argument("--agree-points", type=int, default=5, help="evaluation points compared for the loss agreement")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint and run outputs (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path("bench_recipes.json"), help="JSON file with everything")
    parser.add_argument("--ref-device", default="cpu", help="torch device of the reference's model: cpu (default), cuda, "
                        "or auto (cuda when torch sees a GPU); jaxft runs on jax's default backend")
    parser.add_argument("--quiet-reference", action="store_true", help="do not print the reference loops' log lines")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "64x2x2" if args.size == "gpt2-small" else args.size
        args.max_steps = args.max_steps or 4
        args.cls_eval_freq, args.instruct_eval_freq, args.pref_eval_freq, args.eval_iter = 2, 2, 2, 1
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.instruct_limit = args.instruct_limit or 200
    if args.ref_prompts is not None and args.ref_prompts < 0:
        args.ref_prompts = None
    args.races = {r.strip() for r in args.races.split(",") if r.strip()}
    args.jaxft_root = args.jaxft_root.resolve()
    global REF_DEVICE
    if args.ref_device == "auto":
        args.ref_device = "cuda" if torch.cuda.is_available() else "cpu"
    REF_DEVICE = METER.device = torch.device(args.ref_device)
    if REF_DEVICE.type == "cuda":  # TF32 matmuls, as JAX's default on NVIDIA cards: the same arithmetic
        torch.set_float32_matmul_precision("high")
    accelerators = {"reference": torch.cuda.get_device_name(REF_DEVICE) if REF_DEVICE.type == "cuda" else "cpu",
                    "jaxft": f"{jax.devices()[0].device_kind} ({jax.default_backend()})"}

    started = time.perf_counter()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_recipes_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    config = parse_size(args.size, args.layers).replace(drop_rate=0.0)
    print(f"# jaxft recipe race {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores usable; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}; load average {load_average()}")
    print(f"devices: the reference on {accelerators['reference']}, jaxft on {accelerators['jaxft']}")
    print(f"model: {config.name}: {config.emb_dim} wide, {config.n_layers} layers, {config.n_heads} heads, vocab "
          f"{config.vocab_size}, context {config.context_length}; random weights; work dir {work_dir}", flush=True)
    ckpt = work_dir / "base-model"
    config, params = make_checkpoint(config, args.seed, ckpt)
    tokenizer = jaxft.get_tokenizer()
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                               "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                                           "torch": torch.__version__, "jax": jax.__version__, "load_start": load_average(),
                                           "devices": accelerators},
                               "model": config.to_dict()}
    if args.races & {"cls", "bucket"}:
        classification_race(args, config, params, tokenizer, work_dir, ckpt, results)
    if "instruct" in args.races:
        instruct_race(args, config, params, tokenizer, work_dir, ckpt, results)
    if "pref" in args.races:
        preference_race(args, config, params, tokenizer, work_dir, ckpt, results, run_jaxft=run_jaxft, reference_model=reference_model,
                        ref_device=REF_DEVICE)
    results["machine"]["load_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    table = report(results)
    results["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{table}\n\nload average at the end {load_average()}; {results['wall_s'] / 60:.1f} minutes in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
