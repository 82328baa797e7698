"""Fine-tune a GPT-2 spam classifier from jaxft's pure pieces, one whole parameter tree:
load -> new head -> trainable mask -> optax (masked AdamW) -> a jitted step -> the loop.

    python scripts/functional_finetune.py                    # a small random GPT-2, 60 steps
    python scripts/functional_finetune.py --model gpt2/124M  # a pretrained checkpoint
"""

import argparse

import jax
import optax

import jaxft
from jaxft import sources
from jaxft.data import batching, spam


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint (default: a small random GPT-2)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args(argv)

    key_model, key_head = jax.random.split(jax.random.key(123))
    if args.model:
        config, params = jaxft.load(args.model)
    else:
        config = jaxft.GPTConfig(context_length=128, emb_dim=64, n_layers=2, n_heads=4)
        params = jaxft.init_params(config, key_model)
    data = spam.splits_with_classes(sources.sms_spam_file())  # the bundled SMS Spam Collection
    train, val, _ = spam.encode_splits(*data.frames(), jaxft.get_tokenizer(), context_length=config.context_length)
    config, params = jaxft.with_classifier_head(config, params, len(data.class_names), key_head)

    mask = jaxft.trainable_mask(config, params, "last-block")  # last block + final norm + head
    optimizer = jaxft.masked(optax.adamw(args.lr, weight_decay=0.1), mask)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss_fn = lambda p: jaxft.classification_metrics(config, "last", p, batch)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def batches(split, epoch=0, shuffle=True):
        return batching.classification_batches(split.arrays(), 8, shuffle=shuffle, drop_last=shuffle, seed=123, epoch=epoch, pad_id=50256)

    eval_step = jax.jit(lambda p, b: jaxft.classification_metrics(config, "last", p, b)[1])
    before = jaxft.evaluate(eval_step, params, batches(val, shuffle=False))
    done, epoch = 0, 0
    while done < args.steps:
        for batch in batches(train, epoch):
            params, opt_state, loss = step(params, opt_state, batch)
            done += 1
            if done == args.steps:
                break
        epoch += 1
    after = jaxft.evaluate(eval_step, params, batches(val, shuffle=False))
    print(f"validation loss {before['loss']:.3f} -> {after['loss']:.3f}, accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    return {"loss_before": before["loss"], "loss_after": after["loss"], "accuracy_after": after["accuracy"]}


if __name__ == "__main__":
    main()
