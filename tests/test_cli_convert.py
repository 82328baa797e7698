"""`jaxft convert` and `jaxft generate`, through jaxft.cli.main (exit codes, one-line errors)."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
from reference_gpt import GPTModel, config_dict, random_reference_model
from test_weights import TINY, assert_same_params, random_params

import jaxft
import jaxft.cli
import jaxft.cli.app
import jaxft.generate
from jaxft import GPTConfig

# vocab 50257 so that real text tokenizes; small everywhere else.
TEXT_MODEL = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=4)
PROMPT = "Every effort moves you"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run jaxft.cli.main with only this module's commands registered (other command modules
    are tested elsewhere) -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(jaxft.cli.app, "COMMAND_MODULES", ("jaxft.cli.weights",))

    def run(*argv: str) -> tuple[int, str, str]:
        code = jaxft.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(result, *fragments: str) -> None:
    code, _, err = result
    assert code == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def reference_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).numpy()


# --- convert ------------------------------------------------------------------------------------


def test_convert_chain_preserves_logits(cli, tmp_path):
    """reference .pth -> jaxft -> hf -> torch-reference: a fresh GPTModel gives the same logits."""
    model = random_reference_model(TINY, seed=11)
    source = tmp_path / "model.pth"
    torch.save(model.state_dict(), source)
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps(TINY.to_hparams()))

    code, out, _ = cli("convert", source, tmp_path / "native", "--to", "jaxft", "--config", hparams)
    assert code == 0
    assert "read torch-reference" in out and "wrote jaxft" in out and "params.safetensors" in out
    code, out, _ = cli("convert", tmp_path / "native", tmp_path / "hf", "--to", "hf")
    assert code == 0 and "wrote hf" in out and "model.safetensors" in out
    code, out, _ = cli("convert", tmp_path / "hf", tmp_path / "back.pth", "--to", "torch-reference")
    assert code == 0 and "wrote torch-reference" in out

    fresh = GPTModel(config_dict(TINY))
    fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 64))
    np.testing.assert_allclose(reference_logits(fresh.eval(), ids), reference_logits(model, ids), rtol=0, atol=1e-5)
    config, params = jaxft.load(tmp_path / "native")
    np.testing.assert_allclose(jaxft.logits(config, params, ids), reference_logits(model, ids), rtol=0, atol=1e-4)


def test_convert_to_openai_and_back(cli, tmp_path):
    params = random_params(TINY)
    jaxft.export(TINY, params, tmp_path / "native", "jaxft")
    code, out, _ = cli("convert", tmp_path / "native", tmp_path / "tf", "--to", "openai-tf")
    assert code == 0 and "wrote openai-tf" in out and "hparams.json" in out
    code, _, _ = cli("convert", tmp_path / "tf", tmp_path / "again", "--to", "jaxft")
    assert code == 0
    config, loaded = jaxft.load(tmp_path / "again")
    assert config.n_heads == TINY.n_heads and config.tie_embeddings
    assert_same_params(loaded, params)


def test_convert_reference_with_openai_head_reties(cli, tmp_path):
    """A reference state dict whose out_head equals wte (weights from OpenAI) can go back to openai-tf."""
    params = random_params(TINY)
    jaxft.export(TINY, params, tmp_path / "ref.pth", "torch-reference")  # out_head = copy of wte
    code, out, _ = cli("convert", tmp_path / "ref.pth", tmp_path / "tf", "--to", "openai-tf", "--config", _hparams(tmp_path))
    assert code == 0 and "written tied" in out
    assert_same_params(jaxft.load(tmp_path / "tf")[1], params)


def _hparams(tmp_path, config: GPTConfig = TINY):
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(config.to_hparams()))
    return path


def test_convert_keeps_jaxft_metadata(cli, tmp_path):
    jaxft.export(TINY, random_params(TINY), tmp_path / "a", "jaxft", metadata={"classes": ["ham", "spam"]})
    assert cli("convert", tmp_path / "a", tmp_path / "b", "--to", "jaxft")[0] == 0
    from jaxft.weights import native

    assert native.load_metadata(tmp_path / "b") == {"classes": ["ham", "spam"]}


TEXTS = [f"text {i}: " + " ".join(["win cash now", "see you at lunch", "call me", "free prize"][j % 4] for j in range(i % 5 + 1))
         for i in range(24)]


@pytest.fixture
def spam_classifier(tmp_path, tokenizer):
    """A random 2-class classifier as finetune-classifier saves one: class names, padded length 24
    (texts read at the last padded position, as trained), in a jaxft model directory."""
    from jaxft.classifier import Classifier

    config = TEXT_MODEL.replace(num_classes=2, tie_embeddings=False)
    original = Classifier(config, random_params(config, seed=3), ["ham", "spam"], 24, "last", tokenizer)
    original.save(tmp_path / "clf")
    return Classifier.load(tmp_path / "clf", tokenizer=tokenizer)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_classifier_converted_to_torch_reference_and_back_classifies_as_the_original(cli, tmp_path, tokenizer, spam_classifier,
                                                                                        suffix, recwarn):
    """The state dict cannot hold class names, padded length or pooling (nor the head count): they go
    to the sidecar `X.pth.jaxft.json` and come back, so every answer is the original's."""
    from jaxft.classifier import Classifier
    from jaxft.weights import sidecar

    pth = tmp_path / f"review_classifier{suffix}"
    code, out, err = cli("convert", tmp_path / "clf", pth, "--to", "torch-reference")
    assert code == 0 and err == "", err
    assert f"wrote {sidecar.path_for(pth)}" in out and sidecar.path_for(pth).name == f"review_classifier{suffix}.jaxft.json"
    assert cli("convert", pth, tmp_path / "back", "--to", "jaxft")[0] == 0  # no --config: the sidecar has the shape
    expected = spam_classifier.probabilities(TEXTS)
    for path in (pth, tmp_path / "back"):
        again = Classifier.load(path, tokenizer=tokenizer)
        assert (again.class_names, again.max_length, again.pooling) == (["ham", "spam"], 24, "last")
        np.testing.assert_array_equal(again.probabilities(TEXTS), expected)
        assert [again.classify(t) for t in TEXTS] == [spam_classifier.classify(t) for t in TEXTS]
    assert not [w for w in recwarn if "records no class names" in str(w.message)]
    # The state dict itself is still the reference's: strict load into GPTModel with a 2-class head.
    if suffix == ".pth":
        ref = GPTModel(config_dict(TEXT_MODEL))
        ref.out_head = torch.nn.Linear(32, 2)
        ref.load_state_dict(torch.load(pth, weights_only=True), strict=True)


def test_a_sidecar_for_other_bytes_is_not_used_and_says_so(cli, tmp_path, tokenizer, spam_classifier):
    from jaxft.classifier import Classifier, ConvertedClassifierWarning
    from jaxft.weights import sidecar

    pth = tmp_path / "clf.pth"
    assert cli("convert", tmp_path / "clf", pth, "--to", "torch-reference")[0] == 0
    state = torch.load(pth, weights_only=True)
    state["out_head.bias"] += 1.0  # the file re-saved from PyTorch after more training, say
    torch.save(state, pth)
    with pytest.warns(sidecar.StaleSidecarWarning, match="clf.pth.jaxft.json was written for other bytes than clf.pth"):
        with pytest.warns(ConvertedClassifierWarning):
            again = Classifier.load(pth, tokenizer=tokenizer, config=TEXT_MODEL)
    assert again.class_names == ["0", "1"]  # numbered, never the other model's names
    # A later export to the same name without metadata (a language model) removes the old sidecar.
    jaxft.export(TEXT_MODEL, random_params(TEXT_MODEL), pth, "torch-reference")
    assert not sidecar.path_for(pth).exists()
    sidecar.path_for(pth).write_text("{ not json")
    assert_user_error(cli("convert", pth, tmp_path / "x", "--to", "jaxft"), "clf.pth.jaxft.json: unreadable jaxft sidecar")


def test_convert_to_a_format_without_room_for_metadata_warns_in_one_line(cli, tmp_path):
    jaxft.export(TINY, random_params(TINY), tmp_path / "a", "jaxft", metadata={"task": "instruction", "style": "alpaca"})
    code, _, err = cli("convert", tmp_path / "a", tmp_path / "hf", "--to", "hf")
    assert code == 0
    assert err.splitlines() == [
        "jaxft convert: warning: hf has no place for the model's metadata (style, task): not written; "
        "convert to jaxft or torch-reference to keep it"
    ]


def test_convert_user_errors(cli, tmp_path):
    assert_user_error(cli("convert", tmp_path / "nowhere", tmp_path / "out", "--to", "jaxft"), "jaxft convert: error:", "nowhere")

    model = random_reference_model(TINY, seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    assert_user_error(cli("convert", tmp_path / "model.pth", tmp_path / "out", "--to", "jaxft"), "model.pth", "--config")
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "out", "--to", "jaxft", "--config", "gpt5"), "gpt5"
    )
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "out", "--to", "jaxft", "--config", tmp_path / "nohparams.json"),
        "nohparams.json: file not found",
    )
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "out", "--to", "jaxft", "--config", "124M"),
        "model.pth",
        "vocab_size=101",
    )
    # The reference's own random out_head is not wte: the OpenAI format cannot hold it.
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "tf", "--to", "openai-tf", "--config", _hparams(tmp_path)),
        "separate lm_head",
    )
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "model.pth", "--to", "torch-reference", "--config", _hparams(tmp_path)),
        "the destination is the source",
    )
    (tmp_path / "afile").write_text("x")
    assert_user_error(
        cli("convert", tmp_path / "model.pth", tmp_path / "afile", "--to", "hf", "--config", _hparams(tmp_path)),
        "afile",
        "not a directory",
    )
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- generate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random model with GPT-2's vocabulary, in jaxft's format."""
    path = tmp_path_factory.mktemp("text_model") / "model"
    params = random_params(TEXT_MODEL, seed=5)
    jaxft.export(TEXT_MODEL, params, path, "jaxft")
    return path, params


def _greedy_ids(config: GPTConfig, params, prompt: list[int], max_new_tokens: int, eos: int = 50256) -> list[int]:
    """The reference's greedy loop (with its eos stop) over jaxft.logits, uncached. Trailing filler
    does not change earlier positions (causal mask), so every step runs at one shape."""
    buffer = np.zeros((1, len(prompt) + max_new_tokens), dtype=np.int64)
    buffer[0, : len(prompt)] = prompt
    for step in range(len(prompt), len(prompt) + max_new_tokens):
        next_id = int(np.asarray(jaxft.logits(config, params, buffer))[0, step - 1].argmax())
        if next_id == eos:
            return buffer[0, :step].tolist()
        buffer[0, step] = next_id
    return buffer[0].tolist()


def test_generate_greedy(cli, text_model, tokenizer):
    path, params = text_model
    code, out, err = cli("generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert code == 0, err
    expected = _greedy_ids(TEXT_MODEL, params, tokenizer.encode(PROMPT), 12)
    assert len(expected) > len(tokenizer.encode(PROMPT))
    assert out == tokenizer.decode(expected) + "\n"


def test_generate_sampling_is_seeded(cli, text_model):
    path, _ = text_model
    args = ("generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", 12, "--temperature", 1.5, "--top-k", 50)
    first = cli(*args, "--seed", 1)
    assert first[0] == 0 and first[1].startswith(PROMPT)
    assert cli(*args, "--seed", 1) == first
    outputs = {cli(*args, "--seed", seed)[1] for seed in (2, 3, 4)}
    assert len(outputs | {first[1]}) > 1  # the seed matters


def test_generate_says_when_it_crops_the_prompt(cli, text_model, tokenizer):
    path, params = text_model
    long_prompt = " ".join([PROMPT] * 20)  # far more tokens than the context length (64)
    ids = tokenizer.encode(long_prompt)
    keep = TEXT_MODEL.context_length - 12
    assert len(ids) > keep
    code, out, err = cli("generate", "--model", path, "--prompt", long_prompt, "--max-new-tokens", 12)
    assert code == 0, err
    assert err == (
        f"note: the prompt is {len(ids)} tokens; the model sees its last {keep} (context length 64 - 12 "
        f"new tokens), dropped the first {len(ids) - keep}\n"
    )
    # The continuation is that of the kept tokens; the whole prompt is still printed.
    new_ids = jaxft.generate.generate(TEXT_MODEL, params, [ids[-keep:]], max_new_tokens=12)[0]
    assert out == tokenizer.decode(ids + new_ids) + "\n"

    # A prompt that fits exactly: no note.
    code, _, err = cli("generate", "--model", path, "--prompt", tokenizer.decode(ids[:keep]), "--max-new-tokens", 12)
    assert code == 0 and err == ""


def test_generate_finds_the_vocabulary_beside_the_checkpoint(cli, text_model, shared_data, monkeypatch, tmp_path):
    path, _ = text_model
    monkeypatch.setenv("JAXFT_GPT2_VOCAB", str(tmp_path / "no-vocab-here"))
    assert_user_error(cli("generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", 3), "no-vocab-here")

    with_vocab = tmp_path / "model"
    shutil.copytree(path, with_vocab)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_data / "gpt2_vocab" / name, with_vocab / name)
    code, out, _ = cli("generate", "--model", with_vocab, "--prompt", PROMPT, "--max-new-tokens", 3)
    assert code == 0 and out.startswith(PROMPT)
    code, out, _ = cli("generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", 3, "--vocab-dir", shared_data / "gpt2_vocab")
    assert code == 0 and out.startswith(PROMPT)


def test_generate_user_errors(cli, text_model, tmp_path):
    path, _ = text_model
    classifier = TINY.replace(num_classes=2, tie_embeddings=False)
    jaxft.export(classifier, random_params(classifier), tmp_path / "cls", "jaxft")
    assert_user_error(cli("generate", "--model", tmp_path / "cls", "--prompt", PROMPT), "cls", "classifier")
    jaxft.export(TINY, random_params(TINY), tmp_path / "tiny", "jaxft")
    assert_user_error(cli("generate", "--model", tmp_path / "tiny", "--prompt", PROMPT), "vocabulary has 101 tokens")
    assert_user_error(cli("generate", "--model", path, "--prompt", ""), "--prompt is empty")
    assert_user_error(cli("generate", "--model", path, "--prompt", PROMPT, "--max-new-tokens", 64), "context length")
    assert_user_error(cli("generate", "--model", path, "--prompt", PROMPT, "--temperature", -1), "temperature")
    assert_user_error(cli("generate", "--model", tmp_path / "missing", "--prompt", PROMPT), "missing")


# --- the full CLI -------------------------------------------------------------------------------


def test_full_cli_has_convert_and_generate(tmp_path, capsys):
    """With every command module present, `jaxft convert` works through the unpatched CLI."""
    for name in jaxft.cli.app.COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            pytest.skip(f"command module {name} is not available yet ({exc})")
    jaxft.export(TINY, random_params(TINY), tmp_path / "a", "jaxft")
    assert jaxft.cli.main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf"]) == 0
    assert "wrote hf" in capsys.readouterr().out
    with pytest.raises(SystemExit) as excinfo:
        jaxft.cli.main(["generate", "--help"])
    assert excinfo.value.code == 0
    assert "--max-new-tokens" in capsys.readouterr().out
