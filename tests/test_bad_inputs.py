"""Bad inputs across every command: each is refused with its exit status (2: a user mistake;
1: the work failed, e.g. a write), one line on stderr without a traceback, and nothing
created or changed where the output would go.

Most cases run in-process through `jaxft.cli.main` and fail before any model is built; a
write fault during a run (a full disk at metrics.json) runs a tiny training in a subprocess.
Signals (SIGINT/SIGTERM/SIGKILL during training) are covered by tests/test_resume.py and
tests/test_interrupts.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxft.cli import main

TINY = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
RUNNER = "import sys; from jaxft.cli import main; sys.exit(main(sys.argv[1:]))"

LABELED_OK = "Label,Text\n" + "ham,hello there\nspam,win money now\n" * 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input file the cases name, good and bad, in one directory."""
    from jaxft.config import from_hparams
    from jaxft.model import init_params
    from jaxft.classifier import Classifier
    from jaxft.recipes.classify import with_classifier_head
    from jaxft.weights import export

    d = tmp_path_factory.mktemp("inputs")
    (d / "hparams.json").write_text(json.dumps(TINY))
    (d / "hparams-malformed.json").write_text('{"n_vocab": 50257, "n_ctx": 64,')
    (d / "hparams-types.json").write_text(json.dumps({**TINY, "n_embd": "wide"}))
    (d / "hparams-list.json").write_text("[1, 2, 3]")
    (d / "hparams-vocab300.json").write_text(json.dumps({**TINY, "n_vocab": 300}))  # fewer ids than GPT-2's tokenizer
    config = from_hparams(TINY)
    params = init_params(config, jax.random.PRNGKey(0))
    export(config, params, d / "lm", "jaxft")
    cconfig, cparams = with_classifier_head(config, params, 2, jax.random.PRNGKey(1))
    Classifier(cconfig, cparams, ["ham", "spam"], 16).save(d / "clf")
    nan_params = jax.tree_util.tree_map(lambda x: x, params)
    nan_params["h_1"]["mlp"]["c_fc"]["kernel"] = nan_params["h_1"]["mlp"]["c_fc"]["kernel"].at[3, 5].set(float("nan"))
    export(config, nan_params, d / "lm-nan", "jaxft")  # a diverged run's weights
    nan_head = {**cparams, "cls_head": {**cparams["cls_head"], "bias": cparams["cls_head"]["bias"].at[1].set(float("inf"))}}
    Classifier(cconfig, nan_head, ["ham", "spam"], 16).save(d / "clf-nan")
    huge_head = {**cparams, "cls_head": {**cparams["cls_head"], "kernel": jax.numpy.sign(cparams["cls_head"]["kernel"]) * 3e38}}
    Classifier(cconfig, huge_head, ["ham", "spam"], 16).save(d / "clf-overflow")  # finite weights, infinite logits
    (d / "empty-dir").mkdir()
    (d / "corrupt-model").mkdir()
    (d / "corrupt-model" / "config.json").write_text("{ not json")
    (d / "corrupt-model" / "params.safetensors").write_bytes(b"\0" * 64)
    blob = (d / "lm" / "params.safetensors").read_bytes()
    (d / "truncated").mkdir()
    (d / "truncated" / "config.json").write_bytes((d / "lm" / "config.json").read_bytes())
    (d / "truncated" / "params.safetensors").write_bytes(blob[: len(blob) // 2])
    (d / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (d / "not-a-state-dict.pth").write_bytes(b"this is no pickle, no zip: just text\n")
    # classification data
    (d / "empty.tsv").write_text("")
    (d / "one-class.tsv").write_text("ham\thello\nham\tsee you\n")
    (d / "header-line.tsv").write_text("Label\tText\n" + "ham\thello\nspam\twin now\n" * 60)  # a header read as data
    (d / "latin1.tsv").write_bytes("ham\tcaf\xe9 au lait\nspam\twin\n".encode("latin-1"))
    (d / "train.csv").write_text(LABELED_OK)
    (d / "unclosed.csv").write_text('Label,Text\nham,"hello there\nspam,win\n')
    (d / "case-labels.csv").write_text(LABELED_OK + "Ham,hi again\n")
    (d / "unseen.csv").write_text("Label,Text\nham,hello\neggs,spam and eggs\n")
    (d / "wrong-columns.csv").write_text("Kind,Message\nham,hello\nspam,win\n")
    (d / "texts-latin1.txt").write_bytes("first text\ncaf\xe9\n".encode("latin-1"))
    (d / "blank.txt").write_text("\n  \n")
    # instruction data
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    (d / "instruct-ok.json").write_text(json.dumps([entry] * 40))
    (d / "malformed.json").write_text('[{"instruction": "Say hi.", "input": ""')
    (d / "empty.json").write_text("")
    (d / "not-a-list.json").write_text(json.dumps(entry))
    (d / "wrong-types.json").write_text(json.dumps([entry, {**entry, "instruction": 5}]))
    (d / "missing-output.json").write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))
    (d / "latin1.json").write_bytes(json.dumps([{**entry, "output": "caf\xe9"}], ensure_ascii=False).encode("latin-1"))
    # preference data
    pair = {**entry, "chosen": "Hi there.", "rejected": "Go away."}
    (d / "preference-ok.json").write_text(json.dumps([pair] * 40))
    (d / "preference-no-rejected.json").write_text(json.dumps([pair, {**entry, "chosen": "Hi."}]))
    (d / "preference-long-prompt.json").write_text(json.dumps([pair] * 3 + [{**pair, "instruction": "word " * 80}] + [pair] * 36))
    (d / "preference-wrong-types.json").write_text(json.dumps([pair, {**pair, "chosen": ["Hi."]}]))
    # judge
    (d / "responses-no-key.json").write_text(json.dumps([entry]))
    (d / "responses.json").write_text(json.dumps([{**entry, "model_response": "Hi."}]))
    (d / "no-entries.json").write_text("[]")
    (d / "template-unknown.txt").write_text("Score {output} against {nonsense}.")
    (d / "a-file").write_text("a file where a directory should be\n")
    return d


# What each case's out location needs before the command runs.
SETUPS = {
    "file": lambda out: out.write_text("i am a file\n"),
    "unrelated": lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine\n")),
    "dir": lambda out: out.mkdir(),
    "dangling": lambda out: out.symlink_to(out.parent / "gone"),
    "not-responses": lambda out: out.write_text(json.dumps({"notes": "mine"})),
}

SW = ["sweep-classifier", "--init", "random", "--model", "{in}/hparams.json", "--out", "{out}", "--max-length", "16"]
FC = ["finetune-classifier", "--init", "random", "--model", "{in}/hparams.json", "--out", "{out}", "--max-length", "16"]
FI = ["finetune-instruct", "--init", "random", "--model", "{in}/hparams.json", "--out", "{out}", "--limit", "40", "--no-responses",
      "--data", "{in}/instruct-ok.json"]
FP = ["finetune-preference", "--init", "random", "--model", "{in}/hparams.json", "--out", "{out}", "--no-responses",
      "--data", "{in}/preference-ok.json"]
RESPOND = ["respond", "--model", "{in}/lm", "--data", "{in}/instruct-ok.json", "--out", "{out}"]
CSVS = ["--train", "{in}/train.csv", "--validation", "{in}/train.csv", "--test", "{in}/train.csv"]  # short texts: no truncation notes
UNDER_FILE = "{in}/a-file/sub/out"  # a path component that is a file

# (id, argv, exit status, what the line says, setup of the out location)
CASES = [
    # ---- finetune-classifier: settings' ranges and choices
    ("fc-lr-inf", [*FC, "--lr", "inf"], 2, "lr must be finite", None),
    ("fc-lr-nan", [*FC, "--lr", "nan"], 2, "lr must be finite", None),
    ("fc-weight-decay-negative", [*FC, "--weight-decay", "-5"], 2, "weight-decay must be", None),
    ("fc-batch-size-0", [*FC, "--batch-size", "0"], 2, "batch-size must be >= 1", None),
    ("fc-batch-size-not-a-number", [*FC, "--batch-size", "eight"], 2, "invalid int value", None),
    ("fc-epochs-0", [*FC, "--epochs", "0"], 2, "epochs must be >= 1", None),
    ("fc-max-length-0", [*FC, "--max-length", "0"], 2, "max-length must be >= 1", None),
    ("fc-drop-rate-1", [*FC, "--drop-rate", "1"], 2, "drop-rate must be in", None),
    ("fc-unknown-trainable", [*FC, "--trainable", "middle-blocks"], 2, "middle-blocks", None),
    ("fc-seed-beyond-32-bits", [*FC, "--seed", "4294967296"], 2, "seed must be 0 to 2**32 - 1, got 4294967296", None),
    ("sweep-seed-negative", [*SW, "--sweep", "seed=1,-2", "--model", "{in}/lm", "--init", "pretrained"], 2, "seed must be 0 to 2**32 - 1, got -2", None),
    ("fc-last-pooling-bucket-padding", [*FC, "--padding", "bucket"], 2, "use --pooling last-non-pad", None),
    ("fc-lora-without-rank", [*FC, "--trainable", "lora"], 2, "--lora-rank R", None),
    ("fc-more-blocks-than-the-model", [*FC, "--trainable", "last-5-blocks"], 2, "N must be 1 to 2", None),
    ("fc-unknown-pooling", [*FC, "--pooling", "median"], 2, "invalid choice: 'median'", None),
    ("fc-unknown-flag", [*FC, "--learning-rate", "1"], 2, "unrecognized arguments", None),
    ("fc-batch-larger-than-data", [*FC, "--train", "{in}/train.csv", "--validation", "{in}/train.csv", "--test", "{in}/train.csv",
                                   "--batch-size", "64"], 2, "larger than the 16 training examples", None),
    # ---- sweep-classifier: the sweep itself (every finetune-classifier flag is shared, above)
    ("sweep-no-values", [*SW, "--sweep", "lr="], 2, "--sweep 'lr=': no values", None),
    ("sweep-unknown-name", [*SW, "--sweep", "momentum=0.1,0.2"], 2, "NAME one of lr, weight-decay, seed", None),
    ("sweep-not-floats", [*SW, "--sweep", "lr=a,b"], 2, "values of lr must be floats", None),
    ("sweep-lr-inf", [*SW, "--sweep", "lr=1e-3,inf"], 2, "lr must be finite", None),
    ("sweep-seed-with-random-init", [*SW, "--sweep", "seed=1,2"], 2, "cannot sweep seed with --init random", None),
    ("sweep-with-mesh", [*SW, "--sweep", "lr=1e-3", "--mesh", "data=1"], 2, "drop --mesh and --dtype", None),
    # ---- finetune-classifier: conflicting flags, the run directory
    ("fc-data-with-download", [*FC, "--data", "{in}/empty.tsv", "--download"], 2, "give one or the other", None),
    ("fc-train-without-test", [*FC, "--train", "{in}/train.csv", "--validation", "{in}/train.csv"], 2, "go together", None),
    ("fc-resume-on-nothing", [*FC, "--resume"], 2, "holds no run", None),
    ("fc-resume-with-overwrite", [*FC, "--resume", "--overwrite"], 2, "exclude each other", None),
    ("fc-out-is-a-file", FC, 2, "exists and is not a directory", "file"),
    ("fc-out-holds-other-files", FC, 2, "not empty (notes.txt)", "unrelated"),
    ("fc-overwrite-other-files", [*FC, "--overwrite"], 2, "refusing to delete them", "unrelated"),
    ("fc-out-under-a-file", [*FC[:-3], UNDER_FILE, "--max-length", "16"], 1, "a-file is not a directory", None),
    ("fc-out-dangling-symlink", FC, 1, "out: cannot write: a dangling symbolic link (to ", "dangling"),
    ("fc-export-pth-without-torch", [*FC, "--export-pth"], 2, "needs PyTorch", "no-torch"),
    # ---- finetune-classifier: data files
    ("fc-data-missing", [*FC, "--data", "{in}/nothing.tsv"], 2, "nothing.tsv", None),
    ("fc-data-empty", [*FC, "--data", "{in}/empty.tsv"], 2, "empty.tsv", None),
    ("fc-data-one-class", [*FC, "--data", "{in}/one-class.tsv"], 2, "one class only ('ham')", None),
    ("fc-data-not-utf8", [*FC, "--data", "{in}/latin1.tsv"], 2, "latin1.tsv: line 1: undecodable bytes", None),
    ("fc-csv-unclosed-quote", [*FC, "--train", "{in}/unclosed.csv", "--validation", "{in}/train.csv", "--test", "{in}/train.csv"], 2,
     "unclosed.csv", None),
    ("fc-csv-case-variant-labels", [*FC, "--train", "{in}/case-labels.csv", "--validation", "{in}/train.csv", "--test", "{in}/train.csv"], 2,
     "--normalize-labels", None),
    ("fc-csv-unseen-label", [*FC, "--train", "{in}/train.csv", "--validation", "{in}/unseen.csv", "--test", "{in}/train.csv"], 2,
     "eggs", None),
    ("fc-csv-wrong-columns", [*FC, "--train", "{in}/wrong-columns.csv", "--validation", "{in}/train.csv", "--test", "{in}/train.csv"], 2,
     "wrong-columns.csv", None),
    # ---- finetune-classifier: the model
    ("fc-model-missing", [*FC[:4], "{in}/no-such-model", *FC[5:]], 2, "no-such-model: neither a GPT-2 size name", None),
    ("fc-model-unknown-size", ["finetune-classifier", "--model", "gpt2-huge", "--out", "{out}"], 2, "gpt2-huge: no such checkpoint", None),
    ("fc-hparams-alone-pretrained", ["finetune-classifier", "--model", "{in}/hparams.json", "--out", "{out}"], 2, "--init random", None),
    ("fc-hparams-malformed", [*FC[:4], "{in}/hparams-malformed.json", *FC[5:]], 2, "hparams-malformed.json", None),
    ("fc-hparams-wrong-types", [*FC[:4], "{in}/hparams-types.json", *FC[5:]], 2, "hparams-types.json", None),
    ("fc-hparams-not-an-object", [*FC[:4], "{in}/hparams-list.json", *FC[5:]], 2, "hparams-list.json", None),
    ("fc-model-corrupt-dir", ["finetune-classifier", "--model", "{in}/corrupt-model", "--out", "{out}"], 2, "corrupt-model", None),
    ("fc-model-nan-weights", ["finetune-classifier", "--model", "{in}/lm-nan", "--out", "{out}"], 2,
     "lm-nan: tensor h_1/mlp/c_fc/kernel holds 1 non-finite value(s) (NaN or inf)", None),
    ("fc-vocab-too-small", [*FC[:4], "{in}/hparams-vocab300.json", *FC[5:], *CSVS], 2,
     "hparams-vocab300.json: the model's vocabulary has 300 tokens, too few for the GPT-2 tokenizer", None),
    ("sweep-vocab-too-small", [*SW[:4], "{in}/hparams-vocab300.json", *SW[5:], *CSVS, "--sweep", "lr=1e-3,1e-4"], 2,
     "hparams-vocab300.json: the model's vocabulary has 300 tokens, too few for the GPT-2 tokenizer", None),
    ("fc-model-truncated-safetensors", ["finetune-classifier", "--model", "{in}/truncated", "--out", "{out}"], 2, "params.safetensors",
     None),
    # ---- finetune-instruct
    ("fi-lr-inf", [*FI, "--lr", "inf"], 2, "lr must be finite", None),
    ("fi-limit-0", [*FI, "--limit", "0"], 2, "limit must be >= 1", None),
    ("fi-head-vocab-multiple-0", [*FI, "--head-vocab-multiple", "0"], 2, "head-vocab-multiple must be >= 1", None),
    ("fi-unknown-style", [*FI, "--style", "chatml"], 2, "invalid choice: 'chatml'", None),
    ("fi-data-with-download", [*FI, "--download"], 2, "give one or the other", None),
    ("fi-data-malformed-json", [*FI, "--data", "{in}/malformed.json"], 2, "malformed.json", None),
    ("fi-data-empty", [*FI, "--data", "{in}/empty.json"], 2, "empty.json", None),
    ("fi-data-not-a-list", [*FI, "--data", "{in}/not-a-list.json"], 2, "not-a-list.json", None),
    ("fi-data-wrong-types", [*FI, "--data", "{in}/wrong-types.json"], 2, "entry 1", None),
    ("fi-data-not-utf8", [*FI, "--data", "{in}/latin1.json"], 2, "latin1.json", None),
    ("fi-data-missing", [*FI, "--data", "{in}/nothing.json"], 2, "nothing.json", None),
    ("fi-max-new-tokens-context", [*FI[:-3], "--max-new-tokens", "64", "--data", "{in}/instruct-ok.json"], 2,
     "smaller than the context length (64)", None),
    ("fi-resume-on-nothing", [*FI, "--resume"], 2, "holds no run", None),
    ("fi-out-under-a-file", [*FI[:6], UNDER_FILE, *FI[7:]], 1, "a-file is not a directory", None),
    ("fi-export-pth-without-torch", [*FI, "--export-pth"], 2, "needs PyTorch", "no-torch"),
    ("fi-vocab-too-small", [*FI[:4], "{in}/hparams-vocab300.json", *FI[5:]], 2,
     "hparams-vocab300.json: the model's vocabulary has 300 tokens, too few for the GPT-2 tokenizer", None),
    ("fi-seed-beyond-64-bits", [*FI, "--seed", "99999999999999999999"], 2, "seed must be 0 to 2**32 - 1", None),
    ("fi-seed-negative", [*FI, "--seed", "-1"], 2, "seed must be 0 to 2**32 - 1, got -1", None),
    ("fi-more-blocks-than-the-model", [*FI, "--trainable", "last-3-blocks"], 2, "N must be 1 to 2", None),
    # ---- finetune-preference
    ("fp-beta-0", [*FP, "--beta", "0"], 2, "beta must be finite and > 0", None),
    ("fp-beta-nan", [*FP, "--beta", "nan"], 2, "beta must be finite and > 0", None),
    ("fp-label-smoothing-half", [*FP, "--label-smoothing", "0.5"], 2, "label-smoothing must be in [0, 0.5)", None),
    ("fp-label-smoothing-with-ipo", [*FP, "--loss", "ipo", "--label-smoothing", "0.1"], 2, "for the sigmoid loss", None),
    ("fp-unknown-loss", [*FP, "--loss", "kto"], 2, "invalid choice: 'kto'", None),
    ("fp-unknown-logprob", [*FP, "--logprob", "max"], 2, "invalid choice: 'max'", None),
    ("fp-unknown-reference-logprobs", [*FP, "--reference-logprobs", "cached"], 2, "invalid choice: 'cached'", None),
    ("fp-lr-inf", [*FP, "--lr", "inf"], 2, "lr must be finite", None),
    ("fp-limit-0", [*FP, "--limit", "0"], 2, "limit must be >= 1", None),
    ("fp-data-missing", [*FP, "--data", "{in}/nothing.json"], 2, "nothing.json", None),
    ("fp-data-malformed-json", [*FP, "--data", "{in}/malformed.json"], 2, "malformed.json", None),
    ("fp-data-no-rejected", [*FP, "--data", "{in}/preference-no-rejected.json"], 2, "entry 1: missing required field 'rejected'", None),
    ("fp-data-wrong-types", [*FP, "--data", "{in}/preference-wrong-types.json"], 2, "entry 1: field 'chosen' must be a string", None),
    ("fp-prompt-beyond-context", [*FP, "--data", "{in}/preference-long-prompt.json"], 2,
     "entry 3: the chosen text (", None),
    ("fp-data-few-entries", [*FP, "--limit", "5"], 2, "5 entries leave the test split empty", None),
    ("fp-batch-size-above-train", [*FP, "--batch-size", "64"], 2, "larger than the 34 training entries", None),
    ("fp-classifier-model", [*FP[:2], "pretrained", "--model", "{in}/clf", *FP[5:]], 2, "a classification model", None),
    ("fp-vocab-too-small", [*FP[:4], "{in}/hparams-vocab300.json", *FP[5:]], 2, "too few for the GPT-2 tokenizer", None),
    ("fp-resume-on-nothing", [*FP, "--resume"], 2, "holds no run", None),
    ("fp-out-under-a-file", [*FP[:6], UNDER_FILE, *FP[7:]], 1, "a-file is not a directory", None),
    ("fp-lora-without-rank", [*FP, "--trainable", "lora"], 2, "--lora-rank R", None),
    # ---- classify
    ("classify-file-missing", ["classify", "--model", "{in}/clf", "--file", "{in}/texts.txt"], 2, "texts.txt: no such file", None),
    ("classify-file-not-utf8", ["classify", "--model", "{in}/clf", "--file", "{in}/texts-latin1.txt"], 2,
     "texts-latin1.txt: line 2: undecodable bytes", None),
    ("classify-file-blank", ["classify", "--model", "{in}/clf", "--file", "{in}/blank.txt"], 2, "blank.txt holds no text", None),
    ("classify-empty-text", ["classify", "--model", "{in}/clf", "fine", " "], 2, "text 2 is empty", None),
    ("classify-nothing-to-classify", ["classify", "--model", "{in}/clf"], 2, "give text to classify", None),
    ("classify-model-missing", ["classify", "--model", "{in}/no-such-model", "some text"], 2, "no-such-model", None),
    ("classify-model-empty-dir", ["classify", "--model", "{in}/empty-dir", "some text"], 2, "empty-dir", None),
    ("classify-model-nan-weights", ["classify", "--model", "{in}/clf-nan", "some text"], 2,
     "clf-nan: tensor cls_head/bias holds 1 non-finite value(s) (NaN or inf)", None),
    ("classify-probabilities-not-finite", ["classify", "--model", "{in}/clf-overflow", "fine", "win now"], 2,
     "text 1 (and 1 more): the classifier's probabilities are not finite (NaN or inf), so it has no answer", None),
    ("classify-model-is-a-language-model", ["classify", "--model", "{in}/lm", "some text"], 2, "not a classification model", None),
    # ---- respond
    ("respond-data-malformed", [*RESPOND[:4], "{in}/malformed.json", *RESPOND[5:]], 2, "malformed.json", None),
    ("respond-data-wrong-types", [*RESPOND[:4], "{in}/wrong-types.json", *RESPOND[5:]], 2, "entry 1", None),
    ("respond-out-is-a-directory", RESPOND, 2, "is a directory", "dir"),
    ("respond-out-under-a-file", [*RESPOND[:6], UNDER_FILE], 1, "a-file is not a directory", None),
    ("respond-out-dangling-symlink", RESPOND, 1, "out: cannot write: a dangling symbolic link (to ", "dangling"),
    ("respond-out-not-responses", RESPOND, 2, "out: exists and is not a responses file (a JSON list of entries with 'model_response'); "
     "pass --overwrite", "not-responses"),
    ("respond-max-new-tokens-context", [*RESPOND, "--max-new-tokens", "64"], 2, "smaller than the context length (64)", None),
    ("respond-batch-size-0", [*RESPOND, "--batch-size", "0"], 2, "--batch-size must be >= 1", None),
    ("respond-model-classifier", [*RESPOND[:2], "{in}/clf", *RESPOND[3:]], 2, "a classification model", None),
    ("respond-model-truncated", [*RESPOND[:2], "{in}/truncated.safetensors", *RESPOND[3:]], 2, "truncated.safetensors", None),
    ("respond-model-not-a-state-dict", [*RESPOND[:2], "{in}/not-a-state-dict.pth", *RESPOND[3:]], 2, "not-a-state-dict.pth", None),
    # ---- generate
    ("generate-max-new-tokens-context", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--max-new-tokens", "64"], 2,
     "smaller than the context length (64)", None),
    ("generate-temperature-negative", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--temperature", "-1"], 2,
     "--temperature must be >= 0", None),
    ("generate-temperature-nan", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--temperature", "nan"], 2,
     "--temperature must be >= 0 and finite, got nan", None),
    ("generate-temperature-inf", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--temperature", "inf"], 2,
     "--temperature must be >= 0 and finite, got inf", None),
    ("generate-top-p-nan", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--temperature", "1", "--top-p", "nan"], 2,
     "--top-p must be in (0, 1], got nan", None),
    ("generate-top-p-inf-greedy", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--top-p", "inf"], 2,
     "--top-p must be in (0, 1], got inf", None),
    ("generate-seed-beyond-64-bits", ["generate", "--model", "{in}/lm", "--prompt", "Hi", "--temperature", "1", "--seed",
                                      "99999999999999999999"], 2, "--seed must be a signed 64-bit integer", None),
    ("generate-empty-prompt", ["generate", "--model", "{in}/lm", "--prompt", ""], 2, "--prompt is empty", None),
    ("generate-model-corrupt", ["generate", "--model", "{in}/corrupt-model", "--prompt", "Hi"], 2, "corrupt-model", None),
    ("generate-config-malformed", ["generate", "--model", "{in}/truncated.safetensors", "--config", "{in}/hparams-malformed.json",
                                   "--prompt", "Hi"], 2, "hparams-malformed.json", None),
    ("generate-model-nan-weights", ["generate", "--model", "{in}/lm-nan", "--prompt", "Hi"], 2, "h_1/mlp/c_fc/kernel holds 1 non-finite", None),
    ("generate-classifier", ["generate", "--model", "{in}/clf", "--prompt", "Hi"], 2, "cannot generate text", None),
    # ---- convert
    ("convert-src-missing", ["convert", "{in}/no-such-model", "{out}", "--to", "jaxft"], 2, "no-such-model", None),
    ("convert-dst-is-a-file", ["convert", "{in}/lm", "{out}", "--to", "hf"], 2, "exists and is not a directory", "file"),
    ("convert-unknown-format", ["convert", "{in}/lm", "{out}", "--to", "onnx"], 2, "invalid choice: 'onnx'", None),
    ("convert-dst-under-a-file", ["convert", "{in}/lm", UNDER_FILE, "--to", "hf"], 1, "a-file is not a directory", None),
    ("convert-pth-without-torch", ["convert", "{in}/lm", "{out}.pth", "--to", "torch-reference"], 2, "PyTorch", "no-torch"),
    # ---- download
    ("download-unknown-size", ["download", "99M", "--dir", "{out}"], 2, "99M", None),
    # ---- judge
    ("judge-responses-malformed", ["judge", "{in}/malformed.json", "--metrics-only"], 2, "malformed.json", None),
    ("judge-responses-missing", ["judge", "{in}/nothing.json", "--metrics-only"], 2, "nothing.json", None),
    ("judge-responses-without-key", ["judge", "{in}/responses-no-key.json", "--metrics-only"], 2, "model_response", None),
    ("judge-template-unknown-field", ["judge", "{in}/responses.json", "--template", "{in}/template-unknown.txt", "--out", "{out}"], 2,
     "nonsense", None),
    ("judge-option-not-key-value", ["judge", "{in}/responses.json", "--option", "seed"], 2, "expected KEY=VALUE", None),
    ("judge-out-under-a-file", ["judge", "{in}/responses.json", "--out", UNDER_FILE], 1, "a-file is not a directory", None),
    ("judge-json-under-a-file", ["judge", "{in}/responses.json", "--metrics-only", "--json", UNDER_FILE], 1, "a-file is not a directory",
     None),
    ("judge-no-entries", ["judge", "{in}/no-entries.json", "--host", "http://127.0.0.1:9", "--out", "{out}"], 1, "holds no entries",
     None),
    ("judge-server-refused", ["judge", "{in}/responses.json", "--host", "http://127.0.0.1:9", "--retries", "0", "--out", "{out}"], 2,
     "127.0.0.1:9", None),
    ("judge-no-responses-named", ["judge", "--host", "http://127.0.0.1:9"], 2, "name the responses file", None),
    ("judge-compare-other-entries", ["judge", "--compare", "{in}/responses.json", "{in}/no-entries.json", "--host", "http://127.0.0.1:9"], 2,
     "not responses to the same entries", None),
    ("judge-compare-with-one-out", ["judge", "--compare", "{in}/responses.json", "{in}/responses.json", "--out", "{out}"], 2,
     "with --compare use --compare-out", None),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`: a file's bytes, None for a directory, a symbolic link's target."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, code, message, setup", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(argv, code, message, setup, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default outputs (judge's score file) land here
    out = work / "out"
    if setup == "no-torch":
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as where it is not installed
    elif setup:
        SETUPS[setup](out)
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]
    before, inputs_before = snapshot(tmp_path), snapshot(inputs)
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse
        got = exc.code
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert got == code, line
    assert message in line, line
    assert snapshot(tmp_path) == before, "the command created or changed something"
    assert snapshot(inputs) == inputs_before


def test_a_data_warning_is_one_line_before_the_error(inputs, tmp_path, capsys):
    """jaxft's own warnings print as `jaxft COMMAND: warning: ...`, one line, no file:line."""
    argv = [*FC, "--data", "{in}/header-line.tsv"]
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "jaxft finetune-classifier: warning: class 'Label' has only 1 row(s): balancing keeps 1 of every class (3 of 121 rows)",
        f"jaxft finetune-classifier: error: {inputs / 'header-line.tsv'}: the validation split is empty (3 rows after balancing, "
        "fractions (0.7, 0.1, 0.2); the smallest class, 'Label', has 1 row(s))",
    ]
    assert not (tmp_path / "out").exists()


def test_the_matrix_covers_every_command():
    from jaxft.cli.app import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {argv[0] for _, argv, *_ in CASES} == commands
    assert len(CASES) >= 40


# --------------------------------------------------------------------------- faults in subprocesses


FAULT_RUNNER = """
import errno, os, sys
from pathlib import Path
import jaxft.fileio as fileio
real = fileio.os.replace
def replace(src, dst, *a, **k):
    if Path(dst).name == sys.argv[1]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(src, dst, *a, **k)
fileio.os.replace = replace
from jaxft.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_at_metrics_exits_1_naming_the_file_and_keeps_the_rest(inputs, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", FAULT_RUNNER, "metrics.json", "finetune-classifier", "--init", "random", "--model",
            str(inputs / "hparams.json"), "--out", str(out), "--train", str(inputs / "train.csv"), "--validation", str(inputs / "train.csv"),
            "--test", str(inputs / "train.csv"), "--max-length", "8", "--epochs", "1", "--batch-size", "8", "--eval-iter", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    line = one_line(result.stderr)
    assert result.returncode == 1, result.stderr
    assert f"{out / 'metrics.json'}: cannot write: No space left on device" in line
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"
    from jaxft.checkpoint import complete_steps

    assert complete_steps(out / "checkpoints"), "the last good checkpoint is gone"
    assert (out / "model" / "config.json").is_file()  # the outputs written before the failure
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "metrics.json" in record["reason"]


def test_judge_disk_full_at_the_summary_exits_1_naming_it(inputs, tmp_path):
    summary = tmp_path / "summary.json"
    argv = [sys.executable, "-c", FAULT_RUNNER, "summary.json", "judge", str(inputs / "responses.json"), "--metrics-only",
            "--json", str(summary)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == f"jaxft judge: error: {summary}: cannot write: No space left on device"
    assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"


def test_export_pth_refused_up_front_where_torch_cannot_import(inputs, tmp_path):
    """As a user without PyTorch meets it: a fresh process where `import torch` fails."""
    out = tmp_path / "run"
    runner = "import sys; sys.modules['torch'] = None; from jaxft.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", runner, "finetune-classifier", "--init", "random", "--model", str(inputs / "hparams.json"),
            "--out", str(out), "--export-pth"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "needs PyTorch" in one_line(result.stderr)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("command", ["finetune-classifier", "respond"])
def test_unwritable_location_refused_up_front(command, inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "out"
        base = FC if command == "finetune-classifier" else RESPOND
        argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in base]
        assert main(argv) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{out}: cannot write: {locked}: permission denied" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_generate_crops_a_long_prompt_with_a_one_line_note(inputs, capsys):
    """Not an error: the note says what the model sees, on one line of stderr."""
    assert main(["generate", "--model", str(inputs / "lm"), "--prompt", "word" + " word" * 79, "--max-new-tokens", "4"]) == 0
    line = one_line(capsys.readouterr().err)
    assert line.startswith("note: the prompt is 80 tokens; the model sees its last 60") and "dropped the first 20" in line

