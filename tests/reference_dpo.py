"""The reference's DPO pieces (ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb), written as
the reference writes them, on the reference model of reference_gpt.py: its PreferenceDataset,
custom_collate_fn, compute_logprobs, compute_dpo_loss, the batch and loader losses, the
evaluation and train_model_dpo_simple.

Additions, each marked "bench:": the training loader's `set_epoch` (jaxft's example order, as in
reference_training.py), a `max_steps` stop placed as jaxft's --max-steps stops, the METER clocks
around steps and evaluations, and a `log` for the printed lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from jaxft.data.prompts import format_prompt
from jaxft.tokenizer import encode_text
from reference_training import METER, generate_and_print_sample, loader  # noqa: F401 (loader: the reference's loaders)


class PreferenceDataset(Dataset):
    def __init__(self, data, tokenizer):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = format_prompt(entry)  # the reference's format_input
            rejected_response = entry["rejected"]
            chosen_response = entry["chosen"]
            prompt_tokens = encode_text(tokenizer, prompt)
            chosen_full_text = f"{prompt}\n\n### Response:\n{chosen_response}"
            rejected_full_text = f"{prompt}\n\n### Response:\n{rejected_response}"
            chosen_full_tokens = encode_text(tokenizer, chosen_full_text)
            rejected_full_tokens = encode_text(tokenizer, rejected_full_text)
            self.encoded_texts.append({"prompt": prompt_tokens, "chosen": chosen_full_tokens, "rejected": rejected_full_tokens})

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"):
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = 0
    if batch:
        for key in ["chosen", "rejected"]:
            current_max = max(len(item[key]) + 1 for item in batch)
            max_length_common = max(max_length_common, current_max)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ["chosen", "rejected"]:
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ["chosen", "rejected", "chosen_mask", "rejected_mask"]:
        tensor_stack = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs, reference_rejected_logprobs, beta=0.1):
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_logprobs(logits, labels, selection_mask=None):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask
        avg_log_prob = selected_log_probs.sum(-1) / mask.sum(-1)
        return avg_log_prob
    else:
        return selected_log_probs.mean(-1)


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    policy_chosen_log_probas = compute_logprobs(logits=policy_model(batch["chosen"]), labels=batch["chosen"], selection_mask=batch["chosen_mask"])
    policy_rejected_log_probas = compute_logprobs(logits=policy_model(batch["rejected"]), labels=batch["rejected"], selection_mask=batch["rejected_mask"])
    with torch.no_grad():
        ref_chosen_log_probas = compute_logprobs(logits=reference_model(batch["chosen"]), labels=batch["chosen"], selection_mask=batch["chosen_mask"])
        ref_rejected_log_probas = compute_logprobs(logits=reference_model(batch["rejected"]), labels=batch["rejected"], selection_mask=batch["rejected_mask"])
    loss, chosen_rewards, rejected_rewards = compute_dpo_loss(
        model_chosen_logprobs=policy_chosen_log_probas, model_rejected_logprobs=policy_rejected_log_probas,
        reference_chosen_logprobs=ref_chosen_log_probas, reference_rejected_logprobs=ref_rejected_log_probas, beta=beta,
    )
    return loss, chosen_rewards, rejected_rewards


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    total_loss, total_chosen_rewards, total_rejected_rewards = 0., 0., 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, batch in enumerate(data_loader):
        if i < num_batches:
            loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta)
            total_loss += loss.item()
            total_chosen_rewards += chosen_rewards.item()
            total_rejected_rewards += rejected_rewards.item()
        else:
            break
    total_loss /= num_batches
    total_chosen_rewards /= num_batches
    total_rejected_rewards /= num_batches
    return total_loss, total_chosen_rewards, total_rejected_rewards


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter):
    with METER.clock("eval", 1):  # bench
        policy_model.eval()
        with torch.no_grad():
            train_loss, train_chosen_rewards, train_rejected_rewards = compute_dpo_loss_loader(
                data_loader=train_loader, policy_model=policy_model, reference_model=reference_model, beta=beta, num_batches=eval_iter)
            val_loss, val_chosen_rewards, val_rejected_rewards = compute_dpo_loss_loader(
                data_loader=val_loader, policy_model=policy_model, reference_model=reference_model, beta=beta, num_batches=eval_iter)
        res = {
            "train_loss": train_loss, "train_chosen_reward": train_chosen_rewards, "train_rejected_reward": train_rejected_rewards,
            "val_loss": val_loss, "val_chosen_reward": val_chosen_rewards, "val_rejected_reward": val_rejected_rewards,
        }
        policy_model.train()
    return res


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer, num_epochs, beta, eval_freq, eval_iter,
                           start_context, tokenizer, max_steps=None, log=print, sample=True):
    tracking = {"train_losses": [], "train_chosen_rewards": [], "train_rejected_rewards": [], "val_losses": [],
                "val_chosen_rewards": [], "val_rejected_rewards": [], "tokens_seen": []}
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        policy_model.train()
        train_loader.batch_sampler.set_epoch(epoch)  # bench: jaxft's order
        for batch_idx, batch in enumerate(train_loader):
            with METER.clock("step", batch["chosen"].numel()):  # bench
                optimizer.zero_grad()
                loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta)
                loss.backward()
                optimizer.step()
            tokens_seen += batch["chosen"].numel()
            global_step += 1
            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(policy_model=policy_model, reference_model=reference_model, train_loader=train_loader,
                                               val_loader=val_loader, beta=beta, eval_iter=eval_iter)
                tracking["train_losses"].append(res["train_loss"])
                tracking["train_chosen_rewards"].append(res["train_chosen_reward"])
                tracking["train_rejected_rewards"].append(res["train_rejected_reward"])
                tracking["val_losses"].append(res["val_loss"])
                tracking["val_chosen_rewards"].append(res["val_chosen_reward"])
                tracking["val_rejected_rewards"].append(res["val_rejected_reward"])
                tracking["tokens_seen"].append(tokens_seen)
                train_reward_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
                val_reward_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
                log(f"Ep {epoch+1} (Step {global_step:06d}): Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
                    f"Train reward margins {train_reward_margin:.3f}, Val reward margins {val_reward_margin:.3f}")
            if max_steps is not None and global_step + 1 >= max_steps:  # bench
                break
        if sample:  # bench: the race times the sample; the parity test skips it
            generate_and_print_sample(model=policy_model, tokenizer=tokenizer, device="cpu", start_context=start_context, log=log)
        if max_steps is not None and global_step + 1 >= max_steps:  # bench
            break
    return tracking
