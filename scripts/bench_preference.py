"""The preference (DPO) race of scripts/bench_recipes.py (`--races pref`): the reference's
dpo-from-scratch loop (tests/reference_dpo.py: train_model_dpo_simple with its four forward
passes per step, its evaluations every --pref-eval-freq steps on --eval-iter batches, the
before-training evaluation and the epoch-end sample) against `jaxft finetune-preference
--no-responses` on the same random weights, the bundled preference data and jaxft's batch
order, for as many steps as jaxft runs (--max-steps, else the whole epoch).

Two figures: the whole recipe (jaxft: the command's wall time, start-up, precompute and
compilation included, and its final whole-split evaluations, which the reference does not do;
the reference: its loop's time in this process, models built), and per step (the training
step alone, in this process, on the same first training batches after one warm-up step:
the reference's zero_grad / 4 forwards / backward / AdamW step against jaxft's jitted step with
precomputed, and with live, reference log-probabilities).
"""

from __future__ import annotations

import copy
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

from jaxft import optim, steps
from jaxft.data import instruct as idata
from jaxft.data import preference as pdata
from jaxft.preference_losses import make_logprobs_fn, make_preference_steps
from jaxft.recipes.instruct import untie_head
from reference_dpo import METER, PreferenceDataset, compute_dpo_loss_batch, custom_collate_fn, loader, train_model_dpo_simple

LR, WEIGHT_DECAY, BETA = 5e-6, 0.01, 0.1


def _jaxft_step_seconds(config, params, batches: list[dict], live: bool) -> float:
    """Seconds per jaxft training step (one warm-up step not counted)."""
    config, params = untie_head(config, params)
    optimizer = optim.adamw(LR, WEIGHT_DECAY)
    mask = optim.trainable_mask(config, params, "all")
    reference = (config, jax.tree_util.tree_map(jax.numpy.array, params)) if live else None  # a device copy: the state is donated
    train_step, _ = make_preference_steps(config, optimizer, reference=reference, beta=BETA)
    if not live:  # the batches carry the reference's numbers, as the recipe's do
        logprobs = make_logprobs_fn(config)
        for batch in batches:
            batch["ref_chosen"], batch["ref_rejected"] = jax.device_get(logprobs(params, batch))
    state = steps.init_state(params, mask, optimizer)
    state, m = train_step(state, batches[0])
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for batch in batches[1:]:
        state, m = train_step(state, batch)
        float(m["loss"])  # the loop's host sync per step, as fit's
    return (time.perf_counter() - t0) / (len(batches) - 1)


def _reference_step_seconds(policy, reference, batches: list[dict]) -> float:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    policy.train()

    def one(batch):
        optimizer.zero_grad()
        loss, _, _ = compute_dpo_loss_batch(batch=batch, policy_model=policy, reference_model=reference, beta=BETA)
        loss.backward()
        optimizer.step()
        return loss.item()

    one(batches[0])
    METER.sync()
    t0 = time.perf_counter()
    for batch in batches[1:]:
        one(batch)
    METER.sync()
    return (time.perf_counter() - t0) / (len(batches) - 1)


def preference_race(args, config, params, tokenizer, work_dir: Path, ckpt: Path, results: dict, *, run_jaxft, reference_model,
                    ref_device) -> None:
    seed, bs = args.seed, args.batch_size
    entries = pdata.load_entries(pdata.bundled_file())
    if args.instruct_limit:
        entries = entries[: args.instruct_limit]
    splits = pdata.split_entries(entries)
    allowed = min(1024, config.context_length)
    per_epoch = len(splits.train) // bs
    jaxft_steps = min(args.max_steps, per_epoch) if args.max_steps else per_epoch
    eval_freq, eval_iter = args.pref_eval_freq, args.eval_iter
    print(f"\n## preference: {len(splits.train)}/{len(splits.validation)}/{len(splits.test)} pairs, {per_epoch} steps in the epoch; "
          f"both sides run {jaxft_steps}", flush=True)

    flags = ["--model", str(ckpt), "--init", "pretrained", "--batch-size", str(bs), "--eval-freq", str(eval_freq), "--eval-iter", str(eval_iter),
             "--seed", str(seed), "--compile-cache", args.compile_cache, "--no-responses", "--max-steps", str(jaxft_steps)]
    if args.instruct_limit:
        flags += ["--limit", str(args.instruct_limit)]
    runs = {"precompute": run_jaxft("preference", "finetune-preference", flags, work_dir / "preference", args.jaxft_root, work_dir)}

    # the reference: models built (policy and its frozen copy), then its recipe timed
    torch.manual_seed(seed)
    policy = reference_model(config, params)
    reference = copy.deepcopy(policy).eval()
    collate = partial(custom_collate_fn, device=ref_device, allowed_max_length=1024, mask_prompt_tokens=True)
    train_loader = loader(PreferenceDataset(splits.train, tokenizer), bs, shuffle=True, seed=seed, collate_fn=collate)
    val_loader = loader(PreferenceDataset(splits.validation, tokenizer), bs, shuffle=False, seed=seed, collate_fn=collate)
    quiet = (lambda s: None) if args.quiet_reference else (lambda s: print("  [reference] " + s, flush=True))
    METER.reset()
    t0 = time.perf_counter()
    from reference_dpo import evaluate_dpo_loss_loader
    initial = evaluate_dpo_loss_loader(policy, reference, train_loader, val_loader, beta=BETA, eval_iter=eval_iter)  # the notebook's
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tracking = train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer, num_epochs=1, beta=BETA, eval_freq=eval_freq,
                                      eval_iter=eval_iter, start_context=idata.format_prompt(splits.validation[2]), tokenizer=tokenizer,
                                      max_steps=jaxft_steps, log=quiet)
    METER.sync()
    ref_wall = time.perf_counter() - t0
    ref = {"wall_s": ref_wall, "initial_train_loss": initial["train_loss"], "eval_train_losses": tracking["train_losses"],
           "eval_validation_losses": tracking["val_losses"], "steps_run": jaxft_steps, "meter": METER.to_dict(),
           "step_s_in_loop": METER.seconds["step"] / jaxft_steps}

    # per step, in this process, on the same first batches
    k = args.pref_step_batches
    tokens = pdata.tokenize_entries(splits.train, tokenizer, max_length=allowed)
    jx_batches = list(pdata.preference_batches(tokens, bs, shuffle=True, drop_last=True, seed=seed, allowed_max_length=allowed))[:k]
    ref_batches = []
    for idx in idata.batch_indices(len(tokens), bs, shuffle=True, drop_last=True, seed=seed)[:k]:
        ref_batches.append(collate([train_loader.dataset[int(i)] for i in idx]))
    torch.manual_seed(seed)
    policy = reference_model(config, params)
    per_step = {"reference": _reference_step_seconds(policy, copy.deepcopy(policy).eval(), ref_batches)}
    del policy
    for mode in ("precompute", "live"):
        per_step[f"jaxft_{mode}"] = _jaxft_step_seconds(config, params, [dict(b) for b in jx_batches], live=mode == "live")
    print(f"[preference] per step: reference {per_step['reference']:.2f} s, jaxft precompute {per_step['jaxft_precompute']:.2f} s, "
          f"live {per_step['jaxft_live']:.2f} s; whole: reference {ref_wall:.1f} s, jaxft {runs['precompute']['wall_s']:.1f} s", flush=True)
    jx = runs["precompute"]["metrics"]
    agree = [abs(a - b) for a, b in zip(jx["eval_train_losses"] + jx["eval_validation_losses"], ref["eval_train_losses"] + ref["eval_validation_losses"])]
    results["preference"] = {"split_sizes": [len(splits.train), len(splits.validation), len(splits.test)], "steps": jaxft_steps,
                             "per_epoch": per_epoch, "reference": ref, "jaxft": runs, "per_step_s": per_step, "step_batches": k,
                             "loss_max_abs_diff": max(agree) if agree else math.nan}


def report_lines(results: dict) -> tuple[list[str], list[str]]:
    """Rows for bench_recipes' table, and notes."""
    pref = results.get("preference")
    if not pref:
        return [], []
    jx, ref, ps = pref["jaxft"]["precompute"], pref["reference"], pref["per_step_s"]
    m = jx["metrics"]
    rows = [f"| preference (DPO), all trainable, {pref['steps']} of {pref['per_epoch']} steps, precomputed reference log-probs | "
            f"{jx['wall_s']:.1f} ({m['train_seconds']:.1f}) | {ref['wall_s']:.1f} (measured) | {ref['wall_s'] / jx['wall_s']:.2f}x | "
            f"{pref['loss_max_abs_diff']:.2e} over {len(m['eval_train_losses'])} points | per step: reference {ps['reference']:.2f} s, "
            f"jaxft {ps['jaxft_precompute']:.2f} s precompute ({ps['reference'] / ps['jaxft_precompute']:.2f}x), "
            f"{ps['jaxft_live']:.2f} s live ({ps['reference'] / ps['jaxft_live']:.2f}x) |"]
    notes = [f"preference: per step over {pref['step_batches'] - 1} timed training batches (one warm-up) in this process; the whole-recipe "
             f"jaxft figure includes start-up, the reference log-probabilities' precompute ({m.get('reference_logprobs_seconds') or 0:.1f} s), "
             f"compilation and the final whole-split evaluations the reference does not run."]
    return rows, notes
