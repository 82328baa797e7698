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
