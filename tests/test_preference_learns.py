"""It learns, end to end (slow): a tiny random-init model is instruction-tuned, then preference-tuned
on a synthetic set whose chosen responses are polite and whose rejected ones are rude (a
learnable difference); on the validation split the chosen reward exceeds the rejected one for
at least 90% of the pairs, with a positive margin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft.recipes import instruct, preference
from jaxft.settings import TrainerSettings

TINY = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
THINGS = ["apple", "river", "stone", "cloud", "song", "garden", "window", "letter", "planet", "candle", "bread", "chair", "lamp",
          "book", "coat", "boat", "tree", "key", "cup", "map"]


def synthetic(n: int = 200) -> list[dict]:
    rs = np.random.RandomState(0)
    entries = []
    for i in range(n):
        a, b = rs.choice(THINGS, 2, replace=False)
        entries.append({
            "instruction": f"Give me the {a}.", "input": "" if i % 2 else f"I also want the {b}.",
            "output": f"Here is the {a}.",
            "chosen": f"Of course, here is the {a}. Thank you kindly.",
            "rejected": f"Take the {a} and go away, fool.",
        })
    return entries


@pytest.mark.slow
def test_instruction_then_preference_tuning_learns_the_preference(tmp_path, tokenizer):
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps(TINY))
    data = synthetic()
    sft = instruct.InstructRecipe(
        trainer=TrainerSettings(model=str(hparams), init="random", trainable="all", epochs=8, lr=3e-3, eval_freq=50, eval_iter=1, progress=False),
        responses=False, allowed_max_length=64,
    )
    sft_metrics = instruct.run(sft, tmp_path / "sft", data, tokenizer, log=lambda line: None, progress=False)
    assert sft_metrics["validation_loss"] < sft_metrics["initial_validation_loss"] / 2  # the instruction stage learned

    dpo = preference.PreferenceRecipe(
        trainer=TrainerSettings(model=str(tmp_path / "sft" / "model"), trainable="all", epochs=2, lr=1e-3, weight_decay=0.01,
                                eval_freq=10, eval_iter=2, progress=False),
        responses=False, allowed_max_length=64,
    )
    metrics = preference.run(dpo, tmp_path / "dpo", data, tokenizer, log=lambda line: None, progress=False)
    print(f"\nvalidation: reward accuracy {metrics['validation_reward_accuracy']:.2f}, margin {metrics['validation_reward_margin']:.3f}, "
          f"loss {metrics['initial_validation_loss']:.3f} -> {metrics['validation_loss']:.3f}")
    assert metrics["validation_reward_accuracy"] >= 0.9
    assert metrics["validation_reward_margin"] > 0
    assert metrics["validation_loss"] < metrics["initial_validation_loss"]
