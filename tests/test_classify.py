"""Classification fine-tuning: trainable subsets, pooling, static shapes, torch parity, CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import torch

from jaxft import classifier, losses, optim, steps, train
from jaxft.config import GPTConfig
from jaxft.data import batching
from jaxft.tokenizer import PAD_ID
from jaxft.settings import TrainerSettings
from jaxft.model import apply, init_params, param_count
from jaxft.recipes import classify
from jaxft.weights import torch_ref
from jaxft.weights.common import flatten
from reference_gpt import GPTModel, config_dict, random_reference_model

TINY = GPTConfig(vocab_size=120, context_length=32, emb_dim=32, n_layers=3, n_heads=4)


def _batch(rs: np.random.RandomState, batch=8, seq=20, vocab=120, classes=2):
    tokens = rs.randint(0, vocab, (batch, seq)).astype(np.int32)
    return {
        "tokens": tokens,
        "labels": rs.randint(0, classes, batch).astype(np.int32),
        "lengths": rs.randint(1, seq + 1, batch).astype(np.int32),
        "weights": np.ones(batch, np.float32),
    }


# --------------------------------------------------------------------------- what trains


@pytest.mark.parametrize(
    "trainable, final_norm, blocks, ln_f",
    [("head", None, [], False), ("last-block", None, [2], True), ("last-2-blocks", False, [1, 2], False), ("all", None, [0, 1, 2], True)],
)
def test_trainable_mask_selects_by_name(trainable, final_norm, blocks, ln_f):
    config = TINY.replace(num_classes=2)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(config, params, trainable, final_norm)
    flat = flatten(mask)
    assert all(flat[k] for k in flat if k.startswith("cls_head"))
    assert all(flat[k] == ln_f for k in flat if k.startswith("ln_f"))
    for i in range(config.n_layers):
        assert all(flat[k] == (i in blocks) for k in flat if k.startswith(f"h_{i}/"))
    assert all(flat[k] == (trainable == "all") for k in flat if k.startswith(("wte", "wpe")))


def test_unknown_trainable_is_a_clear_error():
    params = init_params(TINY, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="last-N-blocks"):
        optim.trainable_mask(TINY, params, "middle")
    with pytest.raises(ValueError, match=r"N must be 1 to 3, the model.s blocks"):
        optim.trainable_mask(TINY, params, "last-7-blocks")


def test_frozen_leaves_bitwise_unchanged_and_trainable_ones_move():
    config, params = classify.with_classifier_head(TINY, init_params(TINY, jax.random.PRNGKey(1)), 2, jax.random.PRNGKey(2))
    mask = optim.trainable_mask(config, params, "last-block")
    opt = optim.adamw(1e-3, 0.1)
    state = train.init_state(params, mask, opt)
    step, _ = train.make_steps(config, opt, "classification")
    rs = np.random.RandomState(0)
    for _ in range(3):
        state, _ = step(state, _batch(rs))
    # Frozen weights get neither gradients nor optimizer state.
    assert param_count(state.trainable) < param_count(params)
    assert all(m is None or m.size > 0 for m in jax.tree_util.tree_leaves(state.opt_state))
    before, after, flat_mask = flatten(params), flatten(jax.device_get(state.params)), flatten(mask)
    for key, trains in flat_mask.items():
        if trains:
            assert not np.array_equal(before[key], after[key]), f"{key} should have moved"
        else:
            assert np.array_equal(np.asarray(before[key]), after[key]), f"{key} is frozen but changed"


# --------------------------------------------------------------------------- pooling


def test_pooling_variants():
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    lengths = jnp.array([2, 4])
    np.testing.assert_array_equal(losses.pool(logits, lengths, "last"), logits[:, -1])
    np.testing.assert_array_equal(losses.pool(logits, lengths, "first"), logits[:, 0])
    np.testing.assert_array_equal(losses.pool(logits, lengths, "last-non-pad"), jnp.stack([logits[0, 1], logits[1, 3]]))
    np.testing.assert_allclose(losses.pool(logits, lengths, "mean"), jnp.stack([logits[0, :2].mean(0), logits[1].mean(0)]))
    with pytest.raises(ValueError, match="unknown pooling"):
        losses.pool(logits, lengths, "max")


def test_padding_rows_do_not_change_eval_metrics():
    config, params = classify.with_classifier_head(TINY, init_params(TINY, jax.random.PRNGKey(1)), 2, jax.random.PRNGKey(2))
    _, eval_step = train.make_steps(config, optim.adamw(), "classification")
    batch = _batch(np.random.RandomState(3), batch=5)
    padded = batching.pad_rows(batch, 8, {"tokens": 50, "labels": 0, "lengths": 1, "weights": 0.0})
    a, b = eval_step(params, batch), eval_step(params, padded)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    assert float(a["correct"]) == float(b["correct"]) and float(b["count"]) == 5


# --------------------------------------------------------------------------- parity with torch


def _reference_logits(ref, tokens: np.ndarray, pooling: str, pad_id: int) -> torch.Tensor:
    """The reference's classifier logits: the last position (its recipe), or its follow-up
    experiment's "flexible" variant, the last token before the padding (mask = input != pad)."""
    logits = ref(torch.from_numpy(tokens).long())
    if pooling == "last":
        return logits[:, -1, :]
    last = (torch.from_numpy(tokens) != pad_id).sum(dim=1) - 1
    return logits[torch.arange(len(tokens)), last]


@pytest.mark.parametrize("pooling", ["last", "last-non-pad"])
def test_twenty_steps_match_the_torch_reference(pooling):
    """Same weights, head, batches: jaxft vs a torch loop written like the reference's; with
    last-non-pad pooling, against the reference's "flexible" variant (texts padded with pad_id
    after their lengths, as its loader pads them)."""
    _race_the_torch_reference(pooling, n_steps=20, lr=5e-5)


def test_gradient_accumulation_matches_the_reference_loop():
    """The reference's follow-up experiment's accumulation: loss / k, an update after every k-th
    batch of an epoch and after the epoch's last (here 5 batches an epoch, k = 2: updates after
    batches 2, 4, 5, 7, 9, 10), not optax.MultiSteps' groups that run across epochs."""
    _race_the_torch_reference("last", n_steps=10, lr=1e-3, k=2, steps_per_epoch=5)


def _race_the_torch_reference(pooling: str, n_steps: int, lr: float, k: int = 1, steps_per_epoch: int | None = None) -> None:
    ref = random_reference_model(TINY, seed=3)
    torch.manual_seed(7)
    ref.out_head = torch.nn.Linear(TINY.emb_dim, 2)  # the reference's new head
    for p in ref.parameters():
        p.requires_grad = False
    for module in (ref.out_head, ref.trf_blocks[-1], ref.final_norm):
        for p in module.parameters():
            p.requires_grad = True
    config, params = torch_ref.state_dict_to_params(TINY, ref.state_dict())
    mask = optim.trainable_mask(config, params, "last-block")
    opt = optim.adamw(lr, 0.1, accumulation_steps=k, steps_per_epoch=steps_per_epoch)
    state = train.init_state(params, mask, opt)
    step, _ = train.make_steps(config, opt, "classification", pooling=pooling)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1)

    rs = np.random.RandomState(0)
    pad_id = TINY.vocab_size - 1
    ref.train()
    loss_diffs, updates = [], 0
    for i in range(n_steps):
        batch = _batch(rs, vocab=pad_id)  # texts never contain pad_id
        batch["tokens"][np.arange(batch["tokens"].shape[1]) >= batch["lengths"][:, None]] = pad_id
        state, metrics = step(state, batch)
        logits = _reference_logits(ref, batch["tokens"], pooling, pad_id)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]).long())
        (loss / k).backward()
        batch_idx = i % steps_per_epoch if steps_per_epoch else i
        if (batch_idx + 1) % k == 0 or batch_idx + 1 == steps_per_epoch:  # the reference's is_update_step
            torch_opt.step()
            torch_opt.zero_grad()
            updates += 1
        loss_diffs.append(abs(float(metrics["loss"]) - loss.item()))
    assert max(loss_diffs) <= 1e-4, loss_diffs

    _, torch_params = torch_ref.state_dict_to_params(TINY, ref.state_dict())
    ours, theirs, flat_mask = flatten(jax.device_get(state.params)), flatten(torch_params), flatten(mask)
    d = config.emb_dim
    for key, trains in flat_mask.items():
        if not trains:
            np.testing.assert_array_equal(ours[key], theirs[key])
            continue
        a, b = ours[key], theirs[key]
        if key.endswith("attn/c_attn/bias"):
            # The key bias adds q.b_k to every score of a query: softmax cancels it, so its
            # true gradient is 0 and Adam normalises rounding noise (±lr per update) in both
            # frameworks. Compare q and v biases; check the key bias only moved by noise.
            np.testing.assert_array_less(np.abs(a[d : 2 * d] - b[d : 2 * d]), updates * lr * 2)
            a, b = np.concatenate([a[:d], a[2 * d :]]), np.concatenate([b[:d], b[2 * d :]])
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-4, f"{key}: relative difference {rel:.2e}"


def test_key_bias_gradient_is_zero_in_theory():
    """Backs the exemption above: the loss does not depend on the key bias."""
    config = TINY.replace(num_classes=2)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = _batch(np.random.RandomState(1))

    def loss(p):
        return steps.classification_metrics(config, "last", p, batch)[0]

    grads = flatten(jax.grad(loss)(params))
    d = config.emb_dim
    for i in range(config.n_layers):
        g = np.asarray(grads[f"h_{i}/attn/c_attn/bias"])
        assert np.abs(g[d : 2 * d]).max() < 1e-6 * max(np.abs(g).max(), 1e-3)


# --------------------------------------------------------------------------- recipe and CLI


def _toy_frames(n_per_class=24, classes=("neg", "neu", "pos"), seed=0):
    """A small 3-class data set whose label is readable from the words."""
    rs = np.random.RandomState(seed)
    words = {"neg": "awful bad terrible", "neu": "table chair window", "pos": "great lovely wonderful"}
    rows = []
    for label in classes:
        for _ in range(n_per_class):
            w = words[label].split()
            rows.append((label, " ".join(rs.choice(w, size=rs.randint(2, 6)))))
    frame = pd.DataFrame(rows, columns=["Label", "Text"]).sample(frac=1, random_state=seed).reset_index(drop=True)
    return frame


def _write_csvs(tmp_path):
    frame = _toy_frames()
    paths = {}
    for name, part in (("train", frame[:48]), ("validation", frame[48:60]), ("test", frame[60:])):
        paths[name] = tmp_path / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def _tiny_hparams(tmp_path, ctx=64):
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps({"n_vocab": 50257, "n_ctx": ctx, "n_embd": 32, "n_head": 4, "n_layer": 2}))
    return path


def test_cli_finetune_classifier_on_user_csvs_then_classify(tmp_path, shared_data, capsys):
    from jaxft.cli import main

    csvs, out = _write_csvs(tmp_path), tmp_path / "run"
    code = main([
        "finetune-classifier", "--train", str(csvs["train"]), "--validation", str(csvs["validation"]),
        "--test", str(csvs["test"]), "--model", str(_tiny_hparams(tmp_path)), "--init", "random",
        "--trainable", "all", "--pooling", "last-non-pad", "--epochs", "3", "--batch-size", "4",
        "--lr", "1e-3", "--seed", "1", "--eval-freq", "5", "--out", str(out), "--export-pth",
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_accuracy", "validation_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["class_names"] == ["neg", "neu", "pos"]
    assert metrics["train_step_compilations"] == 1  # static shapes: one compile for the whole run
    assert metrics["test_accuracy"] > 0.5  # well above chance (1/3) on words that give the label away
    for name in ("loss-plot.pdf", "loss-plot.png", "accuracy-plot.pdf", "accuracy-plot.png"):
        assert (out / name).stat().st_size > 1000
    log = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in log and "Training accuracy:" in log

    # The saved model loads and classifies raw text with the class names.
    assert main(["classify", "--model", str(out / "model"), "great lovely wonderful great", "awful bad terrible"]) == 0
    printed = capsys.readouterr().out.split()
    assert set(printed) <= {"neg", "neu", "pos"} and len(printed) == 2

    # --file answers line for line: a blank line with a blank line
    texts = tmp_path / "texts.txt"
    texts.write_bytes("great lovely\x0cwonderful great\r\n\nawful bad\u2028terrible\n".encode())  # a form feed, U+2028
    assert main(["classify", "--model", str(out / "model"), "--file", str(texts)]) == 0
    answers = capsys.readouterr().out.split("\n")
    assert len(answers) == 4 and answers[1] == answers[3] == "" and {answers[0], answers[2]} <= {"neg", "neu", "pos"}

    # The exported .pth classifies too: its sidecar (review_classifier.pth.jaxft.json) holds the
    # config, class names, padded length and pooling the state dict cannot.
    assert main(["classify", "--model", str(out / "review_classifier.pth"), "great lovely wonderful great", "awful bad terrible"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == printed and captured.err == ""
    # Without the sidecar, given the shape it does not record: the same classes, as ids.
    (out / "review_classifier.pth.jaxft.json").unlink()
    assert main(["classify", "--model", str(out / "review_classifier.pth"), "--config", str(_tiny_hparams(tmp_path)),
                 "great lovely wonderful great", "awful bad terrible"]) == 0
    captured = capsys.readouterr()
    assert [metrics["class_names"][int(i)] for i in captured.out.split()] == printed
    assert captured.err.startswith("jaxft classify: warning: ") and "records no class names" in captured.err

    # The exported .pth loads into the reference GPTModel with a 3-class head (strict).
    ref_cfg = config_dict(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=4))
    ref = GPTModel(ref_cfg)
    ref.out_head = torch.nn.Linear(32, 3)
    ref.load_state_dict(torch.load(out / "review_classifier.pth", weights_only=True), strict=True)


def test_classify_review_truncates_to_the_context_length(tokenizer):
    config = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_layers=1, n_heads=2)
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    clf = classifier.Classifier(config, params, ["ham", "spam"], max_length=120, tokenizer=tokenizer)
    ids, length = classifier.encode_for_classification(tokenizer, "word " * 500, 120, config.context_length)
    assert len(ids) == 16 and length == 16  # not 120: the model has 16 positions
    assert classifier.classify_review("word " * 500, clf) in ("spam", "not spam")


def test_a_classifier_reads_each_text_where_it_was_trained_in_bounded_batches(tokenizer):
    config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, n_layers=1, n_heads=2)
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    texts = [f"text number {i} " + "word " * (i % 13) for i in range(150)]

    def alone(text: str) -> np.ndarray:  # the model on the text's own tokens, read at its last one
        ids = tokenizer.encode(text)
        return np.asarray(jax.nn.softmax(apply(config, params, np.array([ids]))[0, -1]))

    # A converted model (no trained padded length): each text at its own last token, never at
    # padding, whatever texts share its call; in batches of 64 rows (150 texts: 3 batches).
    converted = classifier.Classifier(config, params, ["ham", "spam"], max_length=None, tokenizer=tokenizer)
    together = converted.probabilities(texts)
    assert together.shape == (150, 2)
    for i in (0, 63, 64, 149):
        np.testing.assert_allclose(together[i], alone(texts[i]), atol=1e-6)
        np.testing.assert_allclose(converted.probabilities([texts[i]])[0], alone(texts[i]), atol=1e-6)
    # A trained one pads to its padded length and reads the last position, as it was trained.
    trained = classifier.Classifier(config, params, ["ham", "spam"], max_length=20, tokenizer=tokenizer)
    ids = tokenizer.encode(texts[5])
    padded = np.array([ids + [PAD_ID] * (20 - len(ids))])
    np.testing.assert_allclose(trained.probabilities([texts[5]])[0], np.asarray(jax.nn.softmax(apply(config, params, padded)[0, -1])), atol=1e-6)
    with pytest.raises(ValueError, match="text 2 is empty"):
        trained.probabilities(["fine", "  "])


def test_a_classifier_never_labels_a_non_finite_probability(tokenizer):
    """argmax of NaNs is class 0: 'ham' with exit 0 for weights that cannot compute. Finite
    weights can overflow too (in fp32 here): no label, one error naming the text."""
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_layers=1, n_heads=2)
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    params["cls_head"]["kernel"] = jnp.sign(params["cls_head"]["kernel"]) * 3e38
    clf = classifier.Classifier(config, params, ["ham", "spam"], max_length=None, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"^text 1 \(and 2 more\): the classifier's probabilities are not finite"):
        clf.probabilities(["one", "two", "three"])
    with pytest.raises(ValueError, match="not finite"):
        clf.classify("one")


def test_a_classifier_refuses_a_vocabulary_smaller_than_the_tokenizer(tokenizer):
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=16, n_layers=1, n_heads=2)
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    clf = classifier.Classifier(config, params, ["ham", "spam"], max_length=8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="the model's vocabulary has 300 tokens, too few for the GPT-2 tokenizer "
                                         r"\(the texts and padding use token ids up to 50256\)"):
        clf.probabilities(["hello"])


def test_last_pooling_on_batch_dependent_padding_is_refused_unless_one_text_a_batch():
    for padding, batch_size in (("bucket", 8), ("bucket", 1), ("batch", 8)):
        recipe = classify.ClassifierRecipe(trainer=TrainerSettings(batch_size=batch_size), padding=padding)
        with pytest.raises(ValueError, match=f"with --padding {padding} that depends on the batch; use --pooling last-non-pad"):
            recipe.validate()
    # one text a batch, unpadded (the reference's "no padding"): its last position is its last token
    recipe = classify.ClassifierRecipe(trainer=TrainerSettings(batch_size=1), padding="batch")
    recipe.validate()
    data = classify.ClassificationData(None, None, None, ["ham", "spam"], 120)
    assert classify.ClassificationTask(recipe, data).model_metadata()["pooling"] == "last-non-pad"


def test_cli_user_mistakes_are_one_line_errors(tmp_path, capsys):
    from jaxft.cli import main

    bad = tmp_path / "train.csv"
    bad.write_text("Label,Body\nham,hello\n")
    code = main(["finetune-classifier", "--train", str(bad), "--validation", str(bad), "--test", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.csv" in err and "Text" in err and len(err.splitlines()) == 1

    csvs = _write_csvs(tmp_path)
    code = main([
        "finetune-classifier", "--train", str(csvs["train"]), "--validation", str(csvs["validation"]),
        "--test", str(csvs["test"]), "--model", str(_tiny_hparams(tmp_path)), "--init", "random",
        "--batch-size", "1000", "--out", str(tmp_path / "o"),
    ])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "batch size 1000" in err and len(err.splitlines()) == 1

    code = main(["finetune-classifier", "--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing.tsv" in err


@pytest.mark.slow
def test_learns_spam_from_random_init_on_real_data(shared_data, tokenizer, tmp_path):
    """No pretrained weights here: a small random GPT-2, all layers trainable, real SMS spam splits."""
    from jaxft.data import spam

    data = spam.splits_with_classes(shared_data / "sms_spam_collection" / "SMSSpamCollection")
    hparams = tmp_path / "hparams.json"  # 2 layers, 128 wide: about 6.8M parameters
    hparams.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 128, "n_embd": 128, "n_head": 4, "n_layer": 2}))
    recipe = classify.ClassifierRecipe(trainer=TrainerSettings(model=str(hparams), init="random", trainable="all", epochs=2, lr=5e-4, eval_freq=50))
    metrics = classify.run(recipe, tmp_path / "run", data.frames(), data.class_names, tokenizer)
    print(f"\nrandom-init spam classifier: test accuracy {metrics['test_accuracy']:.4f}, {metrics['train_seconds']:.0f} s training")
    assert metrics["split_sizes"] == {"train": 1045, "validation": 149, "test": 300}
    assert metrics["padded_length"] == 120
    assert metrics["test_accuracy"] >= 0.90
    assert metrics["train_step_compilations"] == 1
    assert math.isfinite(metrics["test_loss"])


def test_padding_variants_cut_batches_without_changing_last_non_pad_predictions():
    from jaxft.data.spam import EncodedSplit

    rs = np.random.RandomState(0)
    lengths = rs.randint(3, 40, 20).astype(np.int32)
    tokens = np.full((20, 40), 50256, np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rs.randint(0, 100, n)
    split = EncodedSplit(tokens, rs.randint(0, 2, 20).astype(np.int32), lengths)
    widths = {}
    for padding in batching.PADDINGS:
        batches = list(batching.classification_batches(split.arrays(), 8, shuffle=False, drop_last=False, seed=0, padding=padding, pad_id=PAD_ID))
        widths[padding] = [b["tokens"].shape[1] for b in batches]
        assert all(b["tokens"].shape[0] == 8 for b in batches)
    assert widths["longest"] == [40, 40, 40]
    assert widths["batch"] == [int(lengths[i : i + 8].max()) for i in range(0, 20, 8)]
    assert all(w % 16 == 0 or w == 40 for w in widths["bucket"])
    config, params = classify.with_classifier_head(TINY.replace(context_length=64), init_params(TINY.replace(context_length=64), jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    _, eval_step = train.make_steps(config, optim.adamw(), "classification", pooling="last-non-pad")
    results = {p: train.evaluate(eval_step, params, batching.classification_batches(split.arrays(), 8, shuffle=False, drop_last=False, seed=0, padding=p, pad_id=PAD_ID)) for p in batching.PADDINGS}
    for p in ("batch", "bucket"):
        np.testing.assert_allclose(results[p]["loss"], results["longest"]["loss"], rtol=1e-5)
