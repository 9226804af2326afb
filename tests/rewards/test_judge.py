"""LLM-as-judge: the API back end against a real local HTTP server that can be told to fail, and the local
back end with conftest's tiny random model."""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from grpo.errors import ConfigError
from grpo.rewards import core
from grpo.rewards.judge import (
    DEFAULT_RUBRIC,
    JudgeError,
    LocalJudge,
    expected_scores,
    make_judge,
    parse_score,
    score_tokens,
)

KEY = "sk-test-0123456789abcdef"
SLOW = 1.0  # seconds a "slow" answer takes; the tests that use it time out well before


@dataclass
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class JudgeServer(ThreadingHTTPServer):
    """An OpenAI-compatible /v1/chat/completions that records each request, counts the requests in flight,
    and fails as told: the first requests (``failures``: "500", "429", "400", "slow", "garbage", "not-json",
    "echo"), and every request for a completion that contains a key of ``failing_completions``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self.failures: list[str] = []
        self.failing_completions: dict[str, str] = {}
        self.delay = 0.0
        self.in_flight = 0
        self.most_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def reply_with_the_completions_number(body: dict[str, Any]) -> str:
    """The reply "Score: N" to a request for the completion "answer-N": each reply traces to its request."""
    found = re.search(r"answer-(\d+)", body["messages"][-1]["content"])
    return f"Score: {found.group(1) if found else 5}"


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(Seen(time.monotonic(), self.path, dict(self.headers), body))
            failure = server.failures.pop(0) if server.failures else None
            for text, failing in server.failing_completions.items():
                if text in body["messages"][-1]["content"]:
                    failure = failing
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            time.sleep(server.delay)
            self.answer(failure, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped waiting (the timeout test)
        finally:
            with server.lock:
                server.in_flight -= 1

    def answer(self, failure: str | None, body: dict[str, Any]) -> None:
        if self.path != "/v1/chat/completions":
            self.send(404, {"error": {"message": f"no route {self.path}"}})
        elif failure == "500":  # a careless server that echoes the request's credentials
            self.send(500, {"error": {"message": f"overloaded; you sent {self.headers['Authorization']}"}})
        elif failure == "429":
            self.send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        elif failure == "400":
            self.send(400, {"error": {"message": "unknown model"}})
        elif failure == "slow":
            time.sleep(SLOW)
            self.send(200, completion("Score: 1"))
        elif failure == "garbage":
            self.send(200, completion("I would rather not say."))
        elif failure == "not-json":
            self.send(200, "<html>gateway</html>")
        elif failure == "echo":  # a reply without a score that repeats the request's credentials
            # (inside <think>: the digits of the key are no score)
            reply = f"<think>you sent {self.headers['Authorization']}</think> cannot score"
            self.send(200, completion(reply))
        else:
            self.send(200, completion(reply_with_the_completions_number(body)))

    def send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def completion(content: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[JudgeServer]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send even a local request through a proxy
    server = JudgeServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def api_judge(server: JudgeServer, **options: Any) -> Any:
    options = {"base_url": server.url, "api_key": KEY, "api_model": "judge-7b", "backoff": 0.05, **options}
    return make_judge(**options)


def ask(judge: Any, *completions: str) -> list[float]:
    return judge(["What is 3 + 4?"] * len(completions), list(completions))


# --- the API back end ------------------------------------------------------------------------------------
def test_scores_are_parsed_and_normalised(server):
    judge = api_judge(server, max_score=20, temperature=0.3, max_new_tokens=8)
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}]] * 4
    completions = [[{"role": "assistant", "content": f"answer-{n}"}] for n in (0, 7, 20, 35)]
    assert judge(prompts, completions) == [0.0, 0.35, 1.0, 1.0]  # 35 is clamped to max_score
    assert len(server.requests) == 4
    seen = server.requests[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert {k: seen.body[k] for k in ("model", "temperature", "max_tokens")} == {
        "model": "judge-7b",
        "temperature": 0.3,
        "max_tokens": 8,
    }
    system, user = seen.body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert DEFAULT_RUBRIC in system["content"] and "0 (worst) to 20" in system["content"]
    assert "Conversation:\n[user]\nWhat is 3 + 4?\n\nResponse to judge:\nanswer-" in user["content"]


def test_the_rubric_and_string_prompts_reach_the_judge(server):
    judge = api_judge(server, rubric="Reward brevity.")
    assert ask(judge, "answer-3") == [0.3]
    system, user = server.requests[0].body["messages"]
    assert "Reward brevity." in system["content"]
    assert "Conversation:\nWhat is 3 + 4?\n\nResponse to judge:\nanswer-3" in user["content"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("7", 7.0),
        ("Score: 7/10", 7.0),
        ("8.5 out of 10", 8.5),
        ("<think>maybe 2, maybe 3</think>\n9", 9.0),
        ("-3", 0.0),
        ("11", 10.0),
        ("no idea", None),
        ("<think>4</think> none", None),
    ],
)
def test_parse_score(reply, expected):
    assert parse_score(reply, 10.0) == expected


def test_the_url_and_key_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # the judge's own variables come first
    monkeypatch.setenv("GRPO_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert ask(make_judge(api_model="m"), "answer-4") == [0.4]
    assert server.requests[-1].headers["Authorization"] == f"Bearer {KEY}"

    monkeypatch.delenv("GRPO_JUDGE_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    monkeypatch.setenv("GRPO_JUDGE_API_KEY", "sk-judge")
    assert ask(make_judge(api_model="m"), "answer-6") == [0.6]
    assert server.requests[-1].headers["Authorization"] == "Bearer sk-judge"

    monkeypatch.delenv("GRPO_JUDGE_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ask(make_judge(api_model="m"), "answer-1") == [0.1]
    assert "Authorization" not in server.requests[-1].headers  # local servers need no key


def test_the_key_comes_from_the_variable_that_api_key_env_names(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    monkeypatch.setenv("GRPO_JUDGE_API_KEY", "sk-the-default-variable")  # api_key_env comes first
    judge = make_judge(base_url=server.url, api_model="m", api_key_env="MY_JUDGE_KEY")
    assert ask(judge, "answer-5") == [0.5]
    assert server.requests[-1].headers["Authorization"] == f"Bearer {KEY}"


def test_an_unset_api_key_env_stops_the_run_at_start_naming_the_variable_and_the_reward(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    entry = {"name": "judge", "base_url": "http://127.0.0.1:9/v1", "api_model": "m"}
    with pytest.raises(ConfigError) as caught:
        core.build_rewards([{**entry, "api_key_env": "NO_SUCH_JUDGE_KEY"}])
    assert str(caught.value) == (
        "reward 'judge': api_key_env names NO_SUCH_JUDGE_KEY, which is not set in the environment; set it to "
        "the judge's API key"
    )


def test_a_key_pasted_into_api_key_env_is_refused_without_being_shown():
    entry = {"name": "judge", "base_url": "http://127.0.0.1:9/v1", "api_model": "m"}
    with pytest.raises(ConfigError, match="must be the name of an environment variable") as caught:
        core.build_rewards([{**entry, "api_key_env": KEY}])
    assert KEY not in str(caught.value)
    with pytest.raises(core.RewardError, match="give api_key or api_key_env, not both"):
        core.build_rewards([{**entry, "api_key": KEY, "api_key_env": "MY_JUDGE_KEY"}])
    # A token that happens to look like a name (hf_…, hex) is not set as a variable: it is not shown either.
    for pasted in ("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345", "f3a9c27e55d1b0c4"):
        with pytest.raises(ConfigError, match="api_key_env names a variable that is not set") as caught:
            core.build_rewards([{**entry, "api_key_env": pasted}])
        assert pasted not in str(caught.value)


def test_a_reply_without_a_score_that_repeats_the_key_never_shows_it(server):
    server.failing_completions = {"answer-1": "echo"}
    with pytest.raises(
        JudgeError, match=r"holds no score: '<think>you sent Bearer \*\*\*</think> cannot score'"
    ) as caught:
        ask(api_judge(server), "answer-1")
    assert KEY not in str(caught.value)


def test_server_errors_are_retried_with_growing_backoff(server):
    server.failures = ["500", "500", "500"]
    started = time.monotonic()
    assert ask(api_judge(server, backoff=0.1, max_retries=3), "answer-8") == [0.8]
    assert len(server.requests) == 4
    gaps = [b.at - a.at for a, b in zip(server.requests, server.requests[1:])]
    # Each wait is backoff * 2**attempt times a jitter in [0.5, 1]: never shorter than half of it.
    for attempt, gap in enumerate(gaps):
        assert gap >= 0.1 * 2**attempt * 0.5
    assert time.monotonic() - started < 0.1 * (1 + 2 + 4) + 2


def test_a_429_waits_as_long_as_retry_after_says(server):
    server.failures = ["429", "429"]
    started = time.monotonic()
    assert ask(api_judge(server, backoff=30), "answer-2") == [0.2]  # Retry-After: 0 overrides the backoff
    assert len(server.requests) == 3
    assert time.monotonic() - started < 5


def test_a_request_that_times_out_is_retried(server):
    server.failures = ["slow"]
    started = time.monotonic()
    assert ask(api_judge(server, timeout=0.3), "answer-9") == [0.9]
    assert len(server.requests) == 2
    assert 0.3 <= time.monotonic() - started < SLOW + 0.5


def test_a_client_error_is_not_retried(server):
    server.failures = ["400"]
    with pytest.raises(JudgeError, match=r"refused the request for completion 0 \(HTTP 400: .*unknown model"):
        ask(api_judge(server), "answer-1")
    assert len(server.requests) == 1


def test_giving_up_after_the_retries_never_shows_the_key(server):
    server.failures = ["500"] * 10
    with pytest.raises(JudgeError) as caught:
        ask(api_judge(server, max_retries=2), "answer-1")
    message = str(caught.value)
    assert "no answer for completion 0 after 3 attempts" in message
    assert "HTTP 500" in message and "you sent Bearer ***" in message  # the server's echo, redacted
    assert KEY not in "".join(traceback.format_exception(caught.value))
    assert len(server.requests) == 3


def test_an_unreachable_server_is_retried_then_named(server):
    url = server.url
    server.shutdown()
    server.server_close()  # the port is now closed: connections are refused
    with pytest.raises(JudgeError, match=r"no answer for completion 0 after 2 attempts \(last: URLError"):
        ask(make_judge(base_url=url, api_model="m", max_retries=1, backoff=0.01), "answer-1")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("garbage", r"reply for completion 1 holds no score: 'I would rather not say\.'"),
        ("not-json", r"answered the request for completion 1 with something other than JSON: '<html>"),
    ],
)
def test_an_unusable_reply_names_the_completion(server, failure, message):
    server.failing_completions = {"answer-1": failure}
    with pytest.raises(JudgeError, match=message):
        ask(api_judge(server), "answer-0", "answer-1", "answer-2")


def test_concurrency_never_exceeds_max_concurrency(server):
    server.delay = 0.05
    scores = ask(api_judge(server, max_concurrency=3), *(f"answer-{n % 11}" for n in range(12)))
    assert scores == pytest.approx([(n % 11) / 10 for n in range(12)])  # in the completions' order
    assert len(server.requests) == 12
    assert 2 <= server.most_in_flight <= 3


def test_a_failing_judge_goes_through_the_runs_failure_policy(server, monkeypatch):
    monkeypatch.setitem(core.BUILTIN_KINDS, "judge", "grpo.rewards.judge:make_judge")
    entry = {"name": "judge", "base_url": server.url, "api_model": "m", "weight": 2.0}
    (reward,) = core.build_rewards([entry])
    assert (reward.name, reward.weight) == ("judge", 2.0)
    prompts, completions = ["q", "q"], ["answer-3", "answer-7"]
    assert core.score([reward], prompts, completions, {}).values[:, 0].tolist() == pytest.approx([0.3, 0.7])
    server.failures = ["garbage"]
    scores = core.score([reward], prompts, completions, {}, on_failure="zero")
    assert scores.values[:, 0].tolist() == [0.0, 0.0] and scores.failures == {"judge": 2}
    server.failures = ["garbage"]
    with pytest.raises(core.RewardError, match=r"'judge' raised JudgeError: .*holds no score"):
        core.score([reward], prompts, completions, {})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs a model: model .* or base_url"),
        ({"base_url": "http://x/v1"}, "needs api_model"),
        ({"base_url": "localhost:8000", "api_model": "m"}, "must start with http"),
        ({"base_url": "http://x/v1", "model": "dir", "api_model": "m"}, "not both"),
        ({"base_url": "http://x/v1", "api_model": "m", "max_concurrency": 0}, "max_concurrency >= 1"),
        ({"model": "dir", "max_score": 7.5}, "whole number up to 100"),
        ({"base_url": "http://x/v1", "api_model": "m", "max_score": 0}, "positive"),
        ({"model": "dir", "api_key": "k"}, "api_key and api_key_env are for a judge behind an API"),
        ({"model": "dir", "api_key_env": "K"}, "api_key and api_key_env are for a judge behind an API"),
    ],
)
def test_bad_options_are_refused(monkeypatch, options, message):
    for name in ("GRPO_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        make_judge(**options)


# --- the local back end ----------------------------------------------------------------------------------
def test_expected_scores_walks_the_tokens_of_multi_token_scores():
    """Scores 1 (" 1"), 10 (" 1" "0") and 7 (" 7") after prefixes ending in token 0; token 4 is a word."""
    tails = {(1,): 1, (1, 3): 10, (2,): 7}
    forwarded: list[list[list[int]]] = []

    def next_token_probs(sequences: list[list[int]]) -> torch.Tensor:
        forwarded.append(sequences)
        table = {0: [0, 0.4, 0.4, 0, 0.2], 1: [0, 0, 0, 0.25, 0.75], 5: [0, 0, 0, 0, 1.0]}
        return torch.tensor([table[s[-1]] for s in sequences])

    expected = expected_scores(next_token_probs, [[9, 0], [5]], tails)
    # 1 keeps 0.4 * 0.75, 10 gets 0.4 * 0.25, 7 gets 0.4; the word's 0.2 is left out.
    assert expected[0].item() == pytest.approx((0.3 * 1 + 0.1 * 10 + 0.4 * 7) / 0.8)
    assert torch.isnan(expected[1])  # no probability on any score
    assert forwarded == [[[9, 0], [5]], [[9, 0, 1], [5, 1]]]  # the leaves " 7" and " 1" "0" need no pass


def test_score_tokens_finds_each_scores_tokens(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prefix, tails = score_tokens(tokenizer, 30)
    assert tokenizer.decode(prefix) == "Score:"
    assert sorted(tails.values()) == list(range(31))
    assert {tokenizer.decode(list(tail)) for tail in tails} == {f" {n}" for n in range(31)}
    assert max(map(len, tails)) == 2  # the tiny tokenizer has " 20" but not " 21": a two-level walk


@pytest.mark.parametrize("max_score", [10, 30])
def test_the_local_judge_gives_deterministic_scores_in_the_unit_interval(tiny_model, max_score):
    judge = make_judge(model=str(tiny_model), max_score=max_score, device="cpu")
    assert isinstance(judge, LocalJudge)
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    prompts = [chat, chat, chat, "What is 2 + 2?"]
    completions = [[{"role": "assistant", "content": c}] for c in ("7", "<answer>7</answer>", "12 13")]
    completions.append("4")
    scores = judge(prompts, completions)
    assert len(scores) == 4 and all(isinstance(s, float) and 0 <= s <= 1 for s in scores)
    assert len(set(scores)) > 1
    assert judge(prompts, completions) == scores
    one_at_a_time = make_judge(model=str(tiny_model), max_score=max_score, batch_size=1, device="cpu")
    assert one_at_a_time.model is judge.model  # loaded once
    assert one_at_a_time(prompts, completions) == pytest.approx(scores, abs=1e-5)  # padding changes nothing
