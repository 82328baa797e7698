"""Four seeds of the head-only spam classifier trained at once: `jax.vmap` over whole runs.

Only the head trains, so the frozen model's features are computed once (the final LayerNorm's
output at the last position, the reference's pooling) and every run shares them; each seed
has its own head initialisation and data order. One compiled program trains all four.

    python scripts/functional_seeds.py [--model gpt2/124M] [--seeds 1 2 3 4]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxft
from jaxft import sources
from jaxft.data import batching, spam


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint (default: a small random GPT-2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    if args.model:
        config, params = jaxft.load(args.model)
    else:
        config = jaxft.GPTConfig(context_length=128, emb_dim=64, n_layers=2, n_heads=4)
        params = jaxft.init_params(config, jax.random.key(0))
    data = spam.splits_with_classes(sources.sms_spam_file())
    train, val, _ = spam.encode_splits(*data.frames(), jaxft.get_tokenizer(), context_length=config.context_length)
    features = jax.jit(lambda t: jaxft.apply(config, params, t, return_hidden=True)[:, -1, :])
    x_train, x_val = features(train.tokens), features(val.tokens)
    y_train, y_val = jnp.asarray(train.labels), jnp.asarray(val.labels)

    def init_head(seed):  # the classifier head a run starts from, as with_classifier_head makes it
        return jaxft.with_classifier_head(config, {}, 2, jax.random.key(seed))[1]["cls_head"]

    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    loss_fn = lambda head, x, y: optax.softmax_cross_entropy_with_integer_labels(x @ head["kernel"] + head["bias"], y).mean()

    def run(head, order):  # one whole run: every step of every epoch, in the run's own order
        def step(carry, index):
            head, opt_state = carry
            grads = jax.grad(loss_fn)(head, x_train[index], y_train[index])
            updates, opt_state = optimizer.update(grads, opt_state, head)
            return (optax.apply_updates(head, updates), opt_state), None
        (head, _), _ = jax.lax.scan(step, (head, optimizer.init(head)), order)
        return head

    heads = jax.vmap(init_head)(jnp.array(args.seeds))
    orders = np.stack([  # [runs, steps, batch]: each seed's shuffled batches of 8, epoch after epoch
        np.concatenate([batching.permutation(len(train), seed, epoch)[: len(train) // 8 * 8].reshape(-1, 8) for epoch in range(args.epochs)])
        for seed in args.seeds
    ])
    heads = jax.jit(jax.vmap(run))(heads, orders)
    accuracy = jax.vmap(lambda h: ((x_val @ h["kernel"] + h["bias"]).argmax(-1) == y_val).mean())(heads)
    for seed, acc in zip(args.seeds, accuracy):
        print(f"seed {seed}: validation accuracy {float(acc):.3f}")
    return [float(a) for a in accuracy]


if __name__ == "__main__":
    main()
