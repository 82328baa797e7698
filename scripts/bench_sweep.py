"""A K-run sweep in one vmapped program against the same K runs done one after another by the
classification recipe (classify.run, what finetune-classifier runs), same settings, same data.

    python scripts/bench_sweep.py [--runs 8] [--emb 256] [--layers 4] [--trainable head] [--sweep seed|lr]

Both sides do everything a user gets: trunk cache, compilation, training, evaluation, plots and
saved models. Prints the wall times and the ratio (sequential / sweep)."""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax

import jaxft
from jaxft.config import GPTConfig
from jaxft.model import init_params
from jaxft.recipes import classify
from jaxft.settings import TrainerSettings
from jaxft.sweep import expand
from jaxft.sweep_run import run_sweep


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--emb", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trainable", default="head")
    parser.add_argument("--sweep", choices=("seed", "lr"), default="seed", help="what differs between the runs")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    config = GPTConfig(vocab_size=50257, context_length=128, emb_dim=args.emb, n_layers=args.layers, n_heads=4)
    jaxft.export(config, init_params(config, jax.random.PRNGKey(0)), tmp / "model", "jaxft")
    tokenizer = jaxft.get_tokenizer()
    recipe = classify.ClassifierRecipe(trainer=TrainerSettings(model=str(tmp / "model"), init="pretrained", trainable=args.trainable,
                                                               epochs=args.epochs, lr=5e-4, eval_freq=50, eval_iter=5))
    frames, names, _ = classify.load_frames(recipe)  # the bundled SMS spam splits (seed 123)
    grid = {"seed": list(range(1, args.runs + 1))} if args.sweep == "seed" else {"lr": [1e-4 * (i + 1) for i in range(args.runs)]}
    quiet = lambda _: None

    start = time.perf_counter()
    result = run_sweep(recipe, grid, tmp / "sweep", tokenizer, frames=frames, class_names=names, log=quiet)
    swept = time.perf_counter() - start

    start = time.perf_counter()
    alone = {}
    for name, _, run_recipe in expand(recipe, grid):
        alone[name] = classify.run(run_recipe, tmp / "alone" / name, frames, names, tokenizer, log=quiet)
    sequential = time.perf_counter() - start

    same = all(alone[n]["test_accuracy"] == result["runs"][n]["test_accuracy"] for n in alone)
    report = {"runs": args.runs, "model": f"{args.layers} layers x {args.emb}", "trainable": args.trainable, "sweep": args.sweep, "steps": alone[next(iter(alone))]["steps"],
              "sweep_seconds": round(swept, 2), "sequential_seconds": round(sequential, 2), "ratio": round(sequential / swept, 2),
              "sweep_train_seconds": round(result["train_seconds"], 2),
              "sequential_train_seconds": round(sum(m["train_seconds"] for m in alone.values()), 2),
              "identical_test_accuracies": same, "backend": jax.default_backend()}
    print(json.dumps(report, indent=2))
    return sequential / swept


if __name__ == "__main__":
    main()
