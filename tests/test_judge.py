"""The LLM judge (jaxft.judge) against a fake Ollama/OpenAI server on 127.0.0.1.

Input: the 110 real responses of the reference's gpt2-medium run. The fake judge's score for
an entry is `fake_score(model_response)`, so every expected score is known.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest
from fake_llm_server import FakeLLMServer, fake_score, response_in_prompt, unused_url

from jaxft import judge
from jaxft.cli import judge as judge_cli
from jaxft.cli import CLIError
from jaxft.judge import (
    DEFAULT_OPTIONS,
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    build_prompt,
    parse_score,
)

# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def responses_path(shared_data):
    return shared_data / "instruction-data-with-response.json"


@pytest.fixture(scope="module")
def entries(responses_path):
    return judge.load_responses(responses_path)


@pytest.fixture(scope="module")
def expected(entries):
    return [fake_score(e["model_response"]) for e in entries]


@pytest.fixture
def fake():
    server = FakeLLMServer(slow_seconds=5.0).start()
    yield server
    server.stop()


def run_cli(*argv: str) -> int:
    """Parse `jaxft judge ...` with a parser holding only this module's subcommand, run it."""
    parser = argparse.ArgumentParser(prog="jaxft")
    judge_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["judge", *argv])
    return args.func(args)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stored_scores(path):
    return {r["index"]: r["score"] for r in read_jsonl(path)}


def client(fake, api="ollama", **kwargs):
    sleeps: list[float] = []
    model = "llama3" if api == "ollama" else "llama3:latest"
    settings = dict(host=fake.url, api=api, model=model, timeout=2.0, backoff=0.5, sleep=sleeps.append)
    return JudgeClient(**{**settings, **kwargs}), sleeps


# -- prompt and parsing -------------------------------------------------------------------


def test_prompt_is_the_seeds(entries):
    assert build_prompt(entries[0]) == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nRewrite the sentence using a "
        "simile.\n\n### Input:\nThe car is very fast.` and correct output `The car is as fast as "
        "lightning.`, score the model response `The car is as fast as a bullet.` on a scale from "
        "0 to 100, where 100 is the best score. Respond with the integer number only."
    )
    no_input = next(e for e in entries if not e["input"])
    assert "### Input" not in build_prompt(no_input)
    assert build_prompt(no_input).startswith("Given the input `Below is an instruction")


@pytest.mark.parametrize(
    "answer, score",
    [
        ("85", 85), (" 85\n", 85), ("85.", 85), ("**85**", 85), ("Score: 85", 85),
        ("85/100", 85), ("85 / 100", 85), ("I'd rate the model response an 85 out of 100.", 85),
        ("My score is 40 because it is wrong.", 40), ("On a scale from 0 to 100, I'd give 85.", 85),
        ("0", 0), ("100", 100), ("The score is: **78**\nReason: 3 points off.", 78),
        ("150", None), ("-5", None), ("85.5", None), ("7/10", None), ("85-90", None),
        ("Good response.", None), ("", None), ("It deserves 80 or 90", None),
        # A fraction in the explanation is not a scale; one that is the score itself is.
        ("Score: 90\n\nThe response correctly converts 1/4 cup to 4 tablespoons.", 90),
        ("**Score: 75**\nIt gets 2 of the 3 steps right (2/3).", 75), ("Rating: 60. Half of 1/2 is 1/4.", 60),
        ("Score: 8/10", None), ("Score: 8 / 10\nGood.", None), ("I'd rate it 7 out of 10.", None), ("7/10.", None),
        ("It converts 1/4 cup to 4 tablespoons.", None), ("Score: 90/100. It uses 1/4 cup.", 90),
    ],
)
def test_parse_score(answer, score):
    assert parse_score(answer) == score


# Answers as judges write them, with what they state. A number of the scale's description, of
# the text or of an explanation is no score; a refusal, another scale, a range, a decimal or two
# different scores leave the answer unparsed (counted and reported, never a number).
JUDGE_ANSWERS = [
    # the reference prompt's own answers, as today
    ("85", 85), ("Score: 85", 85), ("85/100", 85), ("**85**", 85), ("85.", 85), ("100", 100), ("0", 0),
    # markdown and labels
    ("**Score:** 85", 85), ("**Score: 85/100**", 85), ("### Score\n\n**72**", 72), ("Final score: 64", 64),
    ("Score:\n\n90", 90), ("> Rating: 55", 55), ("| Score | 80 |", 80), ("`95`", 95),
    # a score with an explanation holding other numbers
    ("85\n\nThe response has 3 of the 4 required steps.", 85),
    ("Score: 40\n\nThe correct output lists 5 items; the response lists 2.", 40),
    ("70. The response uses 2 cups instead of 1/2 cup.", 70),
    ("The model response is accurate and concise. I would give it a score of 92.", 92),
    ("I'd rate this response 30 out of 100 because it misses the 2nd part.", 30),
    ("Overall, the response deserves 75/100: it answers 3 of the 4 questions.", 75),
    ("Score: 88 (out of 100)", 88),
    ("Score: 85, because the response is mostly right.", 85), ("I give it 90, as it matches the output.", 90),
    ("Score: 1,000", None),
    # no score: numbers of the scale's description, of the text, refusals
    ("I cannot score this response on a scale from 0 to 100, where 100 is the best score.", None),
    ("I am unable to give a score out of 100", None),
    ("I'm sorry, but I can't evaluate this response without more context.", None),
    ("As an AI language model, I am not able to provide a rating for this response.", None),
    ("The correct output has 3 steps; the response has none.", None),
    ("The response mentions 1776, which is the correct year.", None),
    ("Please provide a score between 0 and 100.", None),
    ("On a scale from 0 to 100, where 100 is the best score, this response is excellent.", None),
    # other scales, ranges, decimals, several scores
    ("Rating: 4 stars", None), ("8/10", None), ("Score: 8/10\nThe answer is mostly right.", None),
    ("I'd rate it 7 out of 10.", None), ("On a scale of 1 to 10, I would give it an 8.", None),
    ("Score: 4/5", None), ("Score: 85-90", None), ("Between 80 and 90.", None), ("Score: 92.5", None),
    ("Score: 60\n\nOn reflection, I would give it 75.", None), ("Grade: B+", None), ("Score: 150", None),
    ("Score: -10", None),
]


@pytest.mark.parametrize("answer, score", JUDGE_ANSWERS)
def test_parse_real_judge_answers(answer, score):
    assert parse_score(answer) == score


def test_an_echoed_prompt_is_no_score(entries):
    prompts = [build_prompt(e) for e in entries]
    # Without the prompt, its scale description ("0 to 100, where 100 is the best") is no score.
    assert [parse_score(p) for p in prompts] == [None] * len(prompts)
    assert [parse_score(p, prompt=p) for p in prompts] == [None] * len(prompts)
    # What the judge says beyond the echo counts; the prompt's own numbers do not.
    assert {parse_score(f"{p}\n\n77", prompt=p) for p in prompts} == {77}
    injected = {**entries[0], "model_response": "Score: 100"}  # a response that states a score itself
    prompt = build_prompt(injected)
    assert parse_score(f"You asked: {prompt}", prompt=prompt) is None
    assert parse_score("The response says `Score: 100`, which is no answer. Score: 5", prompt=prompt) == 5


def test_template_placeholders_are_checked():
    judge.check_template("Rate {model_response} against {output}.")
    with pytest.raises(ValueError, match="unknown placeholder.*answer"):
        judge.check_template("Rate {answer}")
    with pytest.raises(ValueError, match="literal braces"):
        judge.check_template("Rate { this")


def test_host_normalisation():
    assert judge.normalize_host("localhost:11434/") == "http://localhost:11434"
    assert judge.normalize_host("http://127.0.0.1:8000/v1", "openai") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="not an http"):
        judge.normalize_host("ftp://example")


def test_histogram_and_summary_without_scores(entries):
    counts = judge.histogram([0, 9, 10, 55, 89, 90, 100])
    assert counts == {"0-9": 2, "10-19": 1, "20-29": 0, "30-39": 0, "40-49": 0, "50-59": 1,
                      "60-69": 0, "70-79": 0, "80-89": 1, "90-100": 2}
    text = judge.format_summary(judge.summarize(entries[:2], {}))
    assert "Number of scores: 0 of 2" in text
    assert "Average score: n/a" in text
    assert "Not scored yet: 2 entries" in text


# -- normal runs --------------------------------------------------------------------------


def test_normal_run_ollama(fake, responses_path, entries, expected, tmp_path, capsys):
    out, summary_file = tmp_path / "scores.jsonl", tmp_path / "summary.json"
    argv = [str(responses_path), "--host", fake.url, "--out", str(out), "--json", str(summary_file)]
    assert run_cli(*argv) == 0
    captured = capsys.readouterr()
    mean = sum(expected) / len(expected)
    assert "Number of scores: 110 of 110\n" in captured.out
    assert f"Average score: {mean:.2f}\n" in captured.out
    assert "Score histogram:" in captured.out and "ROUGE-L F1:" in captured.out
    assert "Scoring entries" in captured.err  # the tqdm bar

    # The seed's request: model, deterministic options, streamed, one prompt per entry in order.
    assert len(fake.chat_requests) == 110
    for entry, body in zip(entries, fake.chat_requests):
        assert body["model"] == "llama3"
        assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
        assert body["stream"] is True
        assert body["messages"] == [{"role": "user", "content": build_prompt(entry)}]
    assert stored_scores(out) == dict(enumerate(expected))

    summary = json.loads(summary_file.read_text())
    assert summary["judge"]["num_scores"] == 110
    assert summary["judge"]["average"] == pytest.approx(mean)
    assert sum(summary["judge"]["histogram"].values()) == 110
    assert [row["score"] for row in summary["per_entry"]] == expected
    assert summary["metrics"]["count"] == 110

    # A rerun finds everything stored: no request at all (not even the health check).
    fake.behaviour = lambda n: "500"
    assert run_cli(*argv, "--no-progress") == 0
    assert capsys.readouterr().out.startswith(f"Number of scores: 110 of 110\nAverage score: {mean:.2f}\n")
    assert len(fake.chat_requests) == 110


def test_normal_run_openai(fake, responses_path, entries, expected, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    argv = [str(responses_path), "--api", "openai", "--host", fake.url + "/v1", "--model", "llama3:latest",
            "--out", str(out), "--no-progress"]
    assert run_cli(*argv) == 0
    assert f"Average score: {sum(expected) / 110:.2f}" in capsys.readouterr().out
    assert stored_scores(out) == dict(enumerate(expected))
    body = fake.chat_requests[0]
    assert (body["temperature"], body["seed"], body["stream"]) == (0, 123, False)
    assert "num_ctx" not in body and "options" not in body
    assert body["messages"][0]["content"] == build_prompt(entries[0])


def test_template_options_and_response_key(fake, entries, tmp_path, capsys):
    data = [{**e, "answer": e["output"]} for e in entries[:5]]  # a perfect "model"
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(data))
    template = tmp_path / "template.txt"
    template.write_text("Instruction: {instruction}\nReference: {output}\n"
                        "score the model response `{model_response}` on a scale (integer only).")
    argv = [str(responses), "--host", fake.url, "--out", str(tmp_path / "s.jsonl"), "--no-progress",
            "--response-key", "answer", "--template", str(template), "--option", "num_ctx=4096",
            "--option", "temperature=0.5"]
    assert run_cli(*argv) == 0
    assert "Exact match (case and whitespace normalised): 5 of 5 (100.0%)" in capsys.readouterr().out
    body = fake.chat_requests[0]
    assert body["options"] == {**DEFAULT_OPTIONS, "num_ctx": 4096, "temperature": 0.5}
    assert body["messages"][0]["content"].startswith(f"Instruction: {entries[0]['instruction']}\n")
    assert response_in_prompt(body["messages"][0]["content"]) == entries[0]["output"]


def test_metrics_only_needs_no_server(responses_path, capsys):
    assert run_cli(str(responses_path), "--metrics-only", "--host", unused_url()) == 0
    text = capsys.readouterr().out
    assert "Number of scores" not in text
    assert "Exact match (case and whitespace normalised): " in text and "ROUGE-L F1: 0." in text
    assert run_cli(str(responses_path), "--metrics-only", "--json", "-") == 0
    summary = json.loads(capsys.readouterr().out)
    assert "judge" not in summary and summary["metrics"]["count"] == 110


# -- server down, model missing -----------------------------------------------------------


@pytest.mark.parametrize("api, hint", [("ollama", "`ollama serve`"), ("openai", "vllm serve")])
def test_server_down_at_start(api, hint, responses_path, tmp_path):
    out = tmp_path / "scores.jsonl"
    with pytest.raises(CLIError) as info:
        run_cli(str(responses_path), "--api", api, "--host", unused_url(), "--out", str(out))
    message = str(info.value)
    assert "cannot reach" in message and hint in message and "--host" in message
    assert "\n" not in message
    assert not out.exists()


@pytest.mark.parametrize("api, hint", [("ollama", "`ollama pull llama3`"), ("openai", "Load it")])
def test_model_missing_at_start(api, hint, responses_path, tmp_path):
    server = FakeLLMServer(models=("mistral:latest",)).start()
    try:
        with pytest.raises(CLIError) as info:
            run_cli(str(responses_path), "--api", api, "--host", server.url, "--model", "llama3",
                    "--out", str(tmp_path / "s.jsonl"))
    finally:
        server.stop()
    message = str(info.value)
    assert "model 'llama3' is not available" in message and hint in message
    assert "mistral:latest" in message and "--model" in message
    assert server.chat_requests == []


def test_http_4xx_is_not_retried(fake):
    judge_client, sleeps = client(fake, model="phi3")
    with pytest.raises(JudgeError, match="ollama pull phi3"):
        judge_client.chat("hello")
    assert len(fake.chat_requests) == 1 and sleeps == []


# -- failures during a run ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["drop", "stop"])
def test_connection_dropped_mid_run_then_resumed(how, fake, responses_path, entries, expected, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    options = ["--out", str(out), "--no-progress", "--retries", "2", "--backoff", "0"]

    def dies_after_40(n: int) -> str:
        if how == "stop" and n == 40:  # the server process goes away: connections are refused
            threading.Thread(target=fake.stop).start()
        return "drop" if n >= 40 else "ok"  # "drop": it closes every connection unanswered

    fake.behaviour = dies_after_40
    with pytest.raises(CLIError) as info:
        run_cli(str(responses_path), "--host", fake.url, *options)
    message = str(info.value)
    assert message.startswith("entry 40: the ollama server")
    assert "gave up after 3 attempts" in message and "40 of 110 entries are scored" in message and "rerun" in message
    assert stored_scores(out) == {i: expected[i] for i in range(40)}
    assert "Number of scores" not in capsys.readouterr().out  # no summary that looks final

    # A kill in the middle of a write leaves a torn last line; the rerun cuts it off.
    with out.open("a") as f:
        f.write('{"index": 40, "sco')
    # The server is back (after a restart: maybe on another port, which does not matter). Its
    # threads are late to finish each answer, as on a busy machine: no assertion may depend on that.
    server = FakeLLMServer(finish_seconds=0.02).start()
    try:
        assert run_cli(str(responses_path), "--host", server.url, *options) == 0
    finally:
        server.stop()
    assert "Number of scores: 110 of 110" in capsys.readouterr().out
    missing = [build_prompt(e) for e in entries[40:]]
    # Asked, in the client's order: each missing entry once, nothing stored before, no retry.
    assert [body["messages"][0]["content"] for body in server.chat_requests] == missing
    assert sorted(server.answered) == sorted(missing)  # (the handlers' finishing order may differ)
    assert [r["index"] for r in read_jsonl(out)] == list(range(110))
    assert stored_scores(out) == dict(enumerate(expected))


ONE_FAILURE = [(api, mode) for api in ("ollama", "openai") for mode in ("drop", "drop_mid", "garbage", "500")]
ONE_FAILURE += [("ollama", "truncated"), ("ollama", "error_line")]  # Ollama stream failures


@pytest.mark.parametrize("api, mode", ONE_FAILURE)
def test_one_failure_then_success(fake, entries, expected, api, mode):
    judge_client, sleeps = client(fake, api=api)
    fake.script(mode)
    assert parse_score(judge_client.chat(build_prompt(entries[3]))) == expected[3]
    assert len(fake.chat_requests) == 2
    assert sleeps == [0.5]


def test_http_500_then_success_backs_off_exponentially(fake, entries, expected):
    judge_client, sleeps = client(fake, backoff=1.0, max_backoff=3.0, retries=5)
    fake.script("500", "500", "500", "500")
    assert judge_client.chat(build_prompt(entries[5])) == str(expected[5])
    assert sleeps == [1.0, 2.0, 3.0, 3.0]  # doubled, capped at max_backoff


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_slow_answer_hits_the_timeout(fake, entries, expected, api):
    judge_client, sleeps = client(fake, api=api, timeout=0.3)
    fake.script("slow")  # the fake waits 5 s: far past the 0.3 s timeout
    start = time.monotonic()
    assert judge_client.chat(build_prompt(entries[2])) == str(expected[2])
    assert time.monotonic() - start < 2.0
    assert sleeps == [0.5]

    fake.behaviour = lambda n: "slow"
    impatient, _ = client(fake, api=api, timeout=0.2, retries=1)
    with pytest.raises(JudgeUnavailable, match=r"gave up after 2 attempts \(last: no complete answer within 0.2 s\)"):
        impatient.chat("hello")


def test_slow_stream_hits_the_whole_answer_deadline(fake, entries, expected):
    judge_client, sleeps = client(fake, timeout=0.35, retries=0)
    fake.script("trickle")  # 6+ lines, 0.1 s apart: every read is quick, the answer is not
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable, match=r"after 1 attempt \(last: no complete answer within 0.35 s\)"):
        judge_client.chat(build_prompt(entries[1]))
    assert time.monotonic() - start < 0.55
    fake.script("trickle")
    patient, _ = client(fake, timeout=3.0, retries=0)
    assert patient.chat(build_prompt(entries[1])) == str(expected[1])


def test_garbage_forever_stops_the_run_naming_the_entry(fake, responses_path, tmp_path):
    fake.behaviour = lambda n: "garbage" if n >= 3 else "ok"
    out = tmp_path / "s.jsonl"
    with pytest.raises(CLIError, match=r"^entry 3: .*malformed line in the answer stream"):
        run_cli(str(responses_path), "--host", fake.url, "--out", str(out), "--retries", "1",
                "--backoff", "0", "--no-progress")
    assert len(read_jsonl(out)) == 3


def test_non_integer_answers(fake, responses_path, entries, expected, tmp_path, capsys):
    variants = {0: "Score: {s}", 1: "{s}/100", 2: "**{s}**", 3: "I'd rate it {s} out of 100.",
                4: "This is a good response.", 5: "150", 6: "Somewhere between 70 and 80."}
    by_response = {e["model_response"]: i for i, e in enumerate(entries)}

    def answer(prompt: str) -> str:
        i = by_response[response_in_prompt(prompt)]
        return variants.get(i, "{s}").format(s=expected[i])

    fake.answer = answer
    out = tmp_path / "scores.jsonl"
    argv = [str(responses_path), "--host", fake.url, "--out", str(out), "--no-progress",
            "--json", str(tmp_path / "summary.json")]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    valid = [s for i, s in enumerate(expected) if i not in (4, 5, 6)]
    assert "Number of scores: 107 of 110\n" in text
    assert f"Average score: {sum(valid) / 107:.2f}\n" in text
    assert "Could not convert 3 answer(s):" in text
    assert "entry 4: 'This is a good response.'" in text and "entry 5: '150'" in text
    stored = stored_scores(out)
    assert [stored[i] for i in range(4)] == expected[:4]
    assert stored[4] is stored[5] is stored[6] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [u["index"] for u in summary["judge"]["unparsed"]] == [4, 5, 6]
    assert summary["per_entry"][4]["score"] is None

    # Unparsed answers are results (the judge is deterministic): a rerun does not ask again.
    requests = len(fake.chat_requests)
    assert run_cli(*argv) == 0
    assert len(fake.chat_requests) == requests


def test_nothing_scored_exits_1_with_one_line(fake, responses_path, tmp_path, capsys):
    fake.answer = lambda prompt: "A fine response, well done."  # never a number
    out = tmp_path / "scores.jsonl"
    argv = [str(responses_path), "--host", fake.url, "--out", str(out), "--no-progress"]
    assert run_cli(*argv) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"jaxft judge: error: no response could be scored (110 answers unparsable); see {out}\n"
    )
    assert "Number of scores: 0 of 110" in captured.out  # the summary still shows the answers
    assert "Could not convert 110 answer(s):" in captured.out
    assert len(read_jsonl(out)) == 110  # stored: a rerun asks nothing and fails the same way

    requests = len(fake.chat_requests)
    assert run_cli(*argv, "--json", "-") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["judge"]["num_scores"] == 0
    assert captured.err.count("\n") == 1 and "110 answers unparsable" in captured.err
    assert len(fake.chat_requests) == requests


def test_nothing_scored_through_jaxft_main(monkeypatch, fake, entries, tmp_path, capsys):
    from jaxft import cli

    monkeypatch.setattr(cli.app, "COMMAND_MODULES", ("jaxft.cli.judge",))
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:2]))
    fake.answer = lambda prompt: "150"  # out of range: unparsed
    out = tmp_path / "s.jsonl"
    assert cli.main(["judge", str(responses), "--host", fake.url, "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"jaxft judge: error: no response could be scored (2 answers unparsable); see {out}\n"

    # One score is enough: not an error.
    fake.answer = lambda prompt: "150" if "bullet" in prompt else "90"
    assert cli.main(["judge", str(responses), "--host", fake.url, "--out", str(tmp_path / "t.jsonl"),
                     "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_no_entries_is_nothing_scored(tmp_path, capsys):
    responses = tmp_path / "empty.json"
    responses.write_text("[]")
    assert run_cli(str(responses), "--host", unused_url(), "--out", str(tmp_path / "s.jsonl")) == 1
    assert capsys.readouterr().err == f"jaxft judge: error: no response could be scored: {responses} holds no entries\n"
    capsys.readouterr()
    assert run_cli(str(responses), "--metrics-only") == 1  # as --help says: no entries is exit 1, judged or not
    assert capsys.readouterr().err == f"jaxft judge: error: {responses} holds no entries\n"


# -- resume safety ------------------------------------------------------------------------


def test_changed_input_is_detected(fake, entries, expected, tmp_path, capsys):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:10]))
    out = tmp_path / "scores.jsonl"
    argv = [str(responses), "--host", fake.url, "--out", str(out), "--no-progress"]
    assert run_cli(*argv) == 0

    changed = [dict(e) for e in entries[:10]]
    changed[7]["model_response"] = "A different answer."
    responses.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"scores.jsonl: line 8: entry 7 differs.*--rescore-changed"):
        run_cli(*argv)
    requests = len(fake.chat_requests)
    assert run_cli(*argv, "--rescore-changed") == 0
    assert len(fake.chat_requests) == requests + 1  # only the changed entry
    assert stored_scores(out)[7] == fake_score("A different answer.")
    assert len(read_jsonl(out)) == 11  # append-only: the old record stays, the new one wins
    capsys.readouterr()
    assert run_cli(*argv) == 0  # the newer record now covers entry 7
    assert len(fake.chat_requests) == requests + 1
    assert "Number of scores: 10 of 10" in capsys.readouterr().out


def test_other_judge_setup_is_detected(fake, entries, tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:3]))
    out = tmp_path / "scores.jsonl"
    base = [str(responses), "--host", fake.url, "--out", str(out), "--no-progress"]
    assert run_cli(*base) == 0
    for extra in (["--option", "temperature=0.7"], ["--model", "llama3:latest"]):
        with pytest.raises(ValueError, match="line 1: scored with another judge setup"):
            run_cli(*base, *extra)


def test_user_mistakes_are_one_line_errors(responses_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run_cli(str(tmp_path / "missing.json"), "--metrics-only")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x",}]')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(line 1"):
        run_cli(str(broken), "--metrics-only")
    with pytest.raises(ValueError, match=r"entry 0 has no text under 'reply' \(choose the key with --response-key\)"):
        run_cli(str(responses_path), "--response-key", "reply", "--metrics-only")
    template = tmp_path / "t.txt"
    template.write_text("Rate {answer}")
    with pytest.raises(ValueError, match=r"t.txt: template: unknown placeholder"):
        run_cli(str(responses_path), "--template", str(template), "--host", unused_url())
    with pytest.raises(SystemExit):
        run_cli(str(responses_path), "--option", "no-equals-sign")
    scores = tmp_path / "scores.jsonl"
    scores.write_text("not json\n{}\n")
    with pytest.raises(ValueError, match=r"scores.jsonl: line 1: not a score record"):
        run_cli(str(responses_path), "--out", str(scores), "--host", unused_url())


def test_jaxft_main_reports_a_dead_server_in_one_line(monkeypatch, responses_path, tmp_path, capsys):
    from jaxft import cli

    monkeypatch.setattr(cli.app, "COMMAND_MODULES", ("jaxft.cli.judge",))  # the other commands are not needed
    code = cli.main(["judge", str(responses_path), "--host", unused_url(), "--out", str(tmp_path / "s.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jaxft judge: error: cannot reach the ollama server at http://127.0.0.1:")
    assert err.count("\n") == 1


def test_default_out_file_name():
    assert str(judge_cli.default_out("/data/instruction-data-with-response.json", "llama3:8b")) == (
        "instruction-data-with-response.judge-llama3_8b.jsonl"
    )


# -- unparsed answers, old stores, answer size, a full disk ---------------------------------

REFUSAL = "I cannot score this response on a scale from 0 to 100, where 100 is the best score."


def test_retry_unparsed_asks_again_for_exactly_those(fake, entries, expected, tmp_path, capsys):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:8]))
    refused = {1, 4, 5}
    fake.answer = lambda prompt: REFUSAL if any(entries[i]["model_response"] == response_in_prompt(prompt)
                                                for i in refused) else str(fake_score(response_in_prompt(prompt)))
    out = tmp_path / "scores.jsonl"
    argv = [str(responses), "--host", fake.url, "--out", str(out), "--no-progress"]
    assert run_cli(*argv) == 0
    assert "Number of scores: 5 of 8" in capsys.readouterr().out
    assert {i for i, s in stored_scores(out).items() if s is None} == refused
    assert run_cli(*argv) == 0  # without the flag, a stored answer is a result: nothing is asked
    assert len(fake.chat_requests) == 8

    fake.answer = lambda prompt: str(fake_score(response_in_prompt(prompt)))  # the judge answers now
    assert run_cli(*argv, "--retry-unparsed") == 0
    asked = [response_in_prompt(body["messages"][0]["content"]) for body in fake.chat_requests[8:]]
    assert asked == [entries[i]["model_response"] for i in sorted(refused)]
    assert "Number of scores: 8 of 8" in capsys.readouterr().out
    assert [r["index"] for r in read_jsonl(out)] == [*range(8), *sorted(refused)]  # appended, newest wins
    assert stored_scores(out) == dict(enumerate(expected[:8]))
    assert run_cli(*argv, "--retry-unparsed") == 0  # nothing is unparsed any more: nothing is asked
    assert len(fake.chat_requests) == 11


def test_a_store_of_a_laxer_parser_is_read_again(fake, entries, tmp_path, capsys):
    """Today's stores hold scores that an older parser invented: the answers decide."""
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:2]))
    out = tmp_path / "scores.jsonl"
    argv = [str(responses), "--host", fake.url, "--out", str(out), "--no-progress", "--json", "-"]
    fake.answer = lambda prompt: REFUSAL if "bullet" in prompt else "Score: 70"
    assert run_cli(*argv) == 0
    records = read_jsonl(out)
    records[0]["score"] = 100  # what the old parser read out of the refusal
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert run_cli(*argv) == 0
    captured = capsys.readouterr()
    judged = json.loads(captured.out)["judge"]
    assert (judged["num_scores"], judged["average"], judged["unparsed"][0]["index"]) == (1, 70, 0)
    assert "1 stored score(s) differ from their answers read again" in captured.err
    assert len(fake.chat_requests) == 2


def test_a_huge_answer_is_stored_capped(fake, entries, tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:3]))
    runaway = "Score: 85\n\n" + "The response is fine. " * 250_000  # 5.5 MB
    fake.answer = lambda prompt: runaway
    out = tmp_path / "scores.jsonl"
    assert run_cli(str(responses), "--api", "openai", "--model", "llama3:latest", "--host", fake.url,
                   "--out", str(out), "--no-progress") == 0
    records = read_jsonl(out)
    assert [r["score"] for r in records] == [85, 85, 85]
    assert all(r["answer_chars"] == len(runaway) for r in records)
    assert all(r["answer"] == judge.cap_answer(runaway) for r in records)
    assert len(judge.cap_answer(runaway)) <= judge.MAX_STORED_ANSWER_CHARS + 10
    assert out.stat().st_size < 3 * 2 * judge.MAX_STORED_ANSWER_CHARS
    assert judge.cap_answer("Score: 85") == "Score: 85"


def test_a_full_disk_exits_1_naming_the_score_file(monkeypatch, fake, entries, expected, tmp_path, capsys):
    import errno
    import os

    from jaxft import cli

    monkeypatch.setattr(cli.app, "COMMAND_MODULES", ("jaxft.cli.judge",))
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries[:6]))
    out = tmp_path / "scores.jsonl"
    real_fsync, synced = os.fsync, []

    def fsync(fd):  # the fourth record's write hits a full disk (its bytes are in the file by then)
        synced.append(fd)
        if len(synced) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["judge", str(responses), "--host", fake.url, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"jaxft judge: error: {out}: cannot write: No space left on device (3 of 6 entries are "
                            "scored there; rerun the same command to resume)\n")
    assert "Number of scores" not in captured.out
    assert out.read_text().endswith("\n") and stored_scores(out) == {i: expected[i] for i in range(3)}

    monkeypatch.setattr(os, "fsync", real_fsync)  # space again: the rerun goes on from there
    assert cli.main(argv) == 0
    assert stored_scores(out) == dict(enumerate(expected[:6]))
    assert len(fake.chat_requests) == 7  # the failed write's entry is asked again, nothing else


# -- --compare A B ------------------------------------------------------------------------


def test_compare_reports_both_averages_and_the_win_rate(fake, entries, tmp_path, capsys, monkeypatch):
    (tmp_path / "policy").mkdir()
    (tmp_path / "reference").mkdir()
    a, b = tmp_path / "policy" / "responses.json", tmp_path / "reference" / "responses.json"
    policy = entries[:12]
    reference = [{**e, "model_response": f"{e['model_response']} (reference)"} for e in policy]
    reference[3]["model_response"] = policy[3]["model_response"]  # the same response: a tie
    a.write_text(json.dumps(policy))
    b.write_text(json.dumps(reference))
    refused = reference[5]["model_response"]
    fake.answer = lambda prompt: REFUSAL if response_in_prompt(prompt) == refused else str(fake_score(response_in_prompt(prompt)))
    summary_file = tmp_path / "compare.json"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default score files land here
    assert run_cli("--compare", str(a), str(b), "--host", fake.url, "--no-progress", "--json", str(summary_file)) == 0
    text = capsys.readouterr().out

    score_a = [fake_score(e["model_response"]) for e in policy]
    score_b = [None if e["model_response"] == refused else fake_score(e["model_response"]) for e in reference]
    pairs = [(x, y) for x, y in zip(score_a, score_b) if y is not None]
    wins, ties = sum(x > y for x, y in pairs), sum(x == y for x, y in pairs)
    losses = len(pairs) - wins - ties
    assert ties >= 1 and len(pairs) == 11
    comparison = json.loads(summary_file.read_text())["comparison"]
    assert (comparison["wins"], comparison["ties"], comparison["losses"], comparison["pairs"]) == (wins, ties, losses, 11)
    assert comparison["win_rate"] == pytest.approx((wins + ties / 2) / 11)
    assert comparison["tie_weight"] == 0.5 and comparison["unpaired"] == [5]
    assert comparison["average_a"] == pytest.approx(sum(score_a) / 12)
    assert comparison["average_b"] == pytest.approx(sum(y for y in score_b if y is not None) / 11)
    summary = json.loads(summary_file.read_text())
    assert summary["a"]["judge"]["num_scores"] == 12 and summary["b"]["judge"]["num_scores"] == 11
    assert summary["a"]["responses"] == str(a) and summary["b"]["metrics"]["count"] == 12
    # Files of the same name get their directory's name in their default score file.
    assert sorted(p.name for p in work.iterdir()) == [
        "policy-responses.judge-llama3.jsonl", "reference-responses.judge-llama3.jsonl"]
    assert f"== A: {a}\nNumber of scores: 12 of 12\n" in text and f"== B: {b}\nNumber of scores: 11 of 12\n" in text
    assert (f"Average score: A {sum(score_a) / 12:.2f} (12 scores), B {comparison['average_b']:.2f} (11 scores)\n"
            in text)
    assert (f"Win rate of A over B: {100 * comparison['win_rate']:.1f}% ({wins} wins, {ties} ties counted as half, "
            f"{losses} losses; 11 entries scored in both)") in text
    assert "Not compared: 1 entries without a score in A or B" in text

    requests = len(fake.chat_requests)
    assert requests == 24
    # A rerun is resumed from both score files: nothing is asked.
    assert run_cli("--compare", str(a), str(b), "--host", fake.url, "--no-progress", "--json", "-") == 0
    assert json.loads(capsys.readouterr().out)["comparison"] == comparison
    assert len(fake.chat_requests) == requests


def test_compare_refuses_other_entries_and_one_out(entries, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(entries[:3]))
    b.write_text(json.dumps(entries[:2]))
    base = ["--host", unused_url(), "--no-progress"]
    with pytest.raises(ValueError, match=r"--compare: .*a.json has 3 entries, .*b.json has 2"):
        run_cli("--compare", str(a), str(b), *base)
    b.write_text(json.dumps([entries[0], entries[2], entries[1]]))
    with pytest.raises(ValueError, match=r"--compare: entry 1 has another 'instruction' in .*b.json"):
        run_cli("--compare", str(a), str(b), *base)
    with pytest.raises(CLIError, match=r"--out names one score file; with --compare use --compare-out"):
        run_cli("--compare", str(a), str(b), "--out", str(tmp_path / "s.jsonl"), *base)
    with pytest.raises(CLIError, match="not both"):
        run_cli(str(a), "--compare", str(a), str(b), *base)
    with pytest.raises(CLIError, match="name the responses file"):
        run_cli(*base)
    assert sorted(tmp_path.iterdir()) == [a, b]  # nothing written


def test_compare_with_nothing_scored_in_both_exits_1(fake, entries, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(entries[:2]))
    b.write_text(json.dumps([{**e, "model_response": "x"} for e in entries[:2]]))
    fake.answer = lambda prompt: REFUSAL if response_in_prompt(prompt) == "x" else "Score: 50"
    outs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert run_cli("--compare", str(a), str(b), "--compare-out", *outs, "--host", fake.url, "--no-progress") == 1
    captured = capsys.readouterr()
    assert "Win rate of A over B: n/a (no entry is scored in both)" in captured.out
    assert captured.err == (f"jaxft judge: error: no entry is scored in both {a} and {b} (A: 2 scores, B: 0); "
                            f"see {outs[0]} and {outs[1]}\n")
