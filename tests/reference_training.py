"""The reference's fine-tuning loops (chapters 6 and 7), written as the reference writes them, for
the end-to-end race (scripts/bench_recipes.py) on the reference model of reference_gpt.py.

Three additions, each marked "bench:": the training loader's `set_epoch` (jaxft's example order,
as a DistributedSampler is used), a `max_steps` stop placed as jaxft's --max-steps stops, and the
METER clocks around steps, evaluations and samples (for the race's extrapolation). The data
loading gets jaxft's token ids, so both sides train on the same batches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from jaxft.data import spam
from jaxft.data.batching import permutation
from jaxft.tokenizer import encode_text
from reference_gpt import generate_text_simple

# --------------------------------------------------------------------------- the clock of the reference side


class Meter:
    """Seconds and tokens per kind of work ("step", "eval", "sample", "response") in the reference's
    run. `device`: where the reference's model runs; on a GPU the clock waits for its queued work,
    so that it times the work itself."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.units: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def clock(self, kind: str, units: float):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[kind] += time.perf_counter() - t0
        self.units[kind] += units

    def rate(self, kind: str) -> float | None:
        """Seconds per unit, or None if nothing of this kind was measured."""
        return self.seconds[kind] / self.units[kind] if self.units.get(kind) else None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "units": dict(self.units)}


METER = Meter()


# --------------------------------------------------------------------------- the reference's data loading, in jaxft's order


class JaxftOrder(torch.utils.data.Sampler):
    """Batches of indices: `permutation(n, seed, epoch)` cut in batches (drop_last), or in order.
    `set_epoch` selects the epoch's order, as with torch's DistributedSampler."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed, self.epoch = n, batch_size, shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = permutation(self.n, self.seed, self.epoch) if self.shuffle else np.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class SpamDataset(Dataset):
    """The reference's SpamDataset over jaxft's encoded split (same ids, padded to the same length)."""

    def __init__(self, split: spam.EncodedSplit) -> None:
        self.encoded_texts, self.labels = split.tokens.astype(np.int64), split.labels.astype(np.int64)

    def __getitem__(self, index):
        return torch.tensor(self.encoded_texts[index], dtype=torch.long), torch.tensor(self.labels[index], dtype=torch.long)

    def __len__(self):
        return len(self.labels)


class InstructionDataset(Dataset):
    """The reference's InstructionDataset: the token ids of each entry's full text."""

    def __init__(self, token_ids: list[list[int]]) -> None:
        self.encoded_texts = token_ids

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.encoded_texts)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu"):
    """The reference's collate (chapter 7), as it writes it."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, collate_fn: Callable | None = None) -> DataLoader:
    """The reference's loaders: training shuffled with drop_last, evaluation in order without."""
    sampler = JaxftOrder(len(dataset), batch_size, shuffle=shuffle, drop_last=shuffle, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0)


# --------------------------------------------------------------------------- the reference's loops (chapters 5-7)
#
# Written as the reference writes them. Three additions, marked "bench:": the training loader's
# `set_epoch` (jaxft's order), a `max_steps` stop placed as jaxft's --max-steps stops, and the
# METER clocks around steps, evaluations and samples (for the extrapolation).


def calc_loss_batch_classifier(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)[:, -1, :]  # logits of the last output token
    return torch.nn.functional.cross_entropy(logits, target_batch)


def calc_loss_batch_lm(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    model.eval()
    correct_predictions, num_examples = 0, 0
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            with METER.clock("eval", input_batch.numel()):  # bench
                input_batch, target_batch = input_batch.to(device), target_batch.to(device)
                with torch.no_grad():
                    logits = model(input_batch)[:, -1, :]
                predicted_labels = torch.argmax(logits, dim=-1)
                num_examples += predicted_labels.shape[0]
                correct_predictions += (predicted_labels == target_batch).sum().item()
        else:
            break
    return correct_predictions / num_examples


def calc_loss_loader(data_loader, model, device, num_batches=None, calc_loss_batch=calc_loss_batch_classifier):
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            with METER.clock("eval", input_batch.numel()):  # bench
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter, calc_loss_batch=calc_loss_batch_classifier):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, calc_loss_batch=calc_loss_batch)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, calc_loss_batch=calc_loss_batch)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                            tokenizer, max_steps=None, log=print):
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    eval_steps = []  # bench: the step of each evaluation
    for epoch in range(num_epochs):
        model.train()
        train_loader.batch_sampler.set_epoch(epoch)  # bench: jaxft's order
        for input_batch, target_batch in train_loader:
            with METER.clock("step", input_batch.numel()):  # bench
                optimizer.zero_grad()
                loss = calc_loss_batch_classifier(input_batch, target_batch, model, device)
                loss.backward()
                optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                eval_steps.append(global_step)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if max_steps is not None and global_step + 1 >= max_steps:  # bench: stop as jaxft's --max-steps
                break
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        log(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
        if max_steps is not None and global_step + 1 >= max_steps:  # bench
            break
    return train_losses, val_losses, train_accs, val_accs, examples_seen, eval_steps


def text_to_token_ids(text, tokenizer):
    return torch.tensor(encode_text(tokenizer, text)).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def generate_and_print_sample(model, tokenizer, device, start_context, log=print):
    with METER.clock("sample", 1):  # bench
        model.eval()
        context_size = model.pos_emb.weight.shape[0]
        encoded = text_to_token_ids(start_context, tokenizer).to(device)
        with torch.no_grad():
            token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
        decoded_text = token_ids_to_text(token_ids, tokenizer)
        log(decoded_text.replace("\n", " "))
        model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, max_steps=None, log=print):
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    eval_steps = []  # bench
    lm_loss = calc_loss_batch_lm
    for epoch in range(num_epochs):
        model.train()
        train_loader.batch_sampler.set_epoch(epoch)  # bench: jaxft's order
        for input_batch, target_batch in train_loader:
            with METER.clock("step", input_batch.numel()):  # bench
                optimizer.zero_grad()
                loss = lm_loss(input_batch, target_batch, model, device)
                loss.backward()
                optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, calc_loss_batch=lm_loss)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                eval_steps.append(global_step)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if max_steps is not None and global_step + 1 >= max_steps:  # bench
                break
        generate_and_print_sample(model, tokenizer, device, start_context, log=log)
        if max_steps is not None and global_step + 1 >= max_steps:  # bench
            break
    return train_losses, val_losses, track_tokens_seen, tokens_seen, eval_steps
