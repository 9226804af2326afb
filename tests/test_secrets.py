"""No secret reaches a file or a printed line: a judge reward's API key, given in a YAML file, through every
command that takes reward functions (`grpo train`, `eval`, `pipeline`, `compare`), on the tiny model against
a local judge server; and through a run that fails with a server that echoes the key back. The redaction
itself (grpo.config.loading.without_secrets, scrub_secrets) is checked on its own first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from grpo.cli.main import app, quiet_libraries
from grpo.config.grpo import GRPOConfig
from grpo.config.loading import load_config, scrub_secrets, to_dict, without_secrets
from grpo.errors import ConfigError

quiet_libraries()  # as the `grpo` command does before it runs

SECRET = "sk-SECRET123"


class Judge(ThreadingHTTPServer):
    """A chat-completions server that scores every completion 5 and records the Authorization headers it
    receives; with ``failing``, it answers 500 with the request's Authorization header in the body, as a
    careless server does."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.authorizations: list[str | None] = []
        self.failing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class JudgeHandler(BaseHTTPRequestHandler):
    server: Judge

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        authorization = self.headers.get("Authorization")
        self.server.authorizations.append(authorization)
        if self.server.failing:
            status, payload = 500, {"error": {"message": f"overloaded; you sent {authorization}"}}
        else:
            status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": "Score: 5"}}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[Judge]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send even a local request through a proxy
    for name in ("GRPO_JUDGE_API_KEY", "OPENAI_API_KEY"):  # the key must come from the file alone
        monkeypatch.delenv(name, raising=False)
    server = Judge()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def judge_entry(server: Judge) -> dict[str, Any]:
    return {
        "name": "judge",
        "base_url": server.url,
        "api_model": "judge-7b",
        "api_key": SECRET,
        "max_retries": 0,
    }


TINY_TRAIN = {
    "num_generations": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 4,
    "max_steps": 1,
    "eval_max_samples": 2,
    "eval_steps": 0,
}


def prompts_file(directory: Path) -> Path:
    path = directory / "sums.jsonl"
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def files_holding_the_secret(directory: Path) -> list[str]:
    return [
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and SECRET.encode() in path.read_bytes()
    ]


def train_args(config: Path, tiny_model: Path, data: Path, output: Path) -> list[str]:
    """`grpo train` with ``config`` on ``data``, its held-out rows the same file."""
    return [
        "train",
        *("--config", str(config), "--model", str(tiny_model), "--output-dir", str(output)),
        *("--dataset", str(data), "--eval-dataset", str(data)),
    ]


def invoke(*args: str) -> tuple[int, str]:
    """The command's exit code and everything it printed (stdout and stderr)."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout + result.stderr


# --- the redaction ----------------------------------------------------------------------------------------
def test_without_secrets_drops_every_secret_option_at_any_depth():
    data = {
        "reward_funcs": ["accuracy", {"name": "judge", "api_key": SECRET, "api_key_env": "K"}],
        "nested": [{"deeper": {"api_key": SECRET, "kept": 1}}],
    }
    assert without_secrets(data) == {
        "reward_funcs": ["accuracy", {"name": "judge", "api_key_env": "K"}],
        "nested": [{"deeper": {"kept": 1}}],
    }
    assert data["reward_funcs"][1]["api_key"] == SECRET, "the settings themselves keep it"
    assert scrub_secrets(f"got {data!r}", data) == f"got {data!r}".replace(SECRET, "***")


def test_the_settings_written_for_any_stage_hold_no_key():
    config = GRPOConfig(reward_funcs=[{"name": "judge", "base_url": "http://x/v1", "api_key": SECRET}])
    assert SECRET not in yaml.safe_dump(to_dict(config))
    assert to_dict(config)["reward_funcs"] == [{"name": "judge", "base_url": "http://x/v1"}]


def test_a_config_error_that_quotes_a_reward_entry_shows_no_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"reward_funcs": [{"api_key": SECRET, "base_url": "http://x/v1"}]}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "a mapping needs a 'name'" in str(caught.value) and "***" in str(caught.value)
    assert SECRET not in str(caught.value)


# --- through the commands ---------------------------------------------------------------------------------
def test_train_and_eval_use_the_key_and_write_or_print_it_nowhere(judge, tiny_model, tmp_path):
    data = prompts_file(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"reward_funcs": ["format", judge_entry(judge)], **TINY_TRAIN}))
    output = tmp_path / "run"
    code, printed = invoke(*train_args(config, tiny_model, data, output))
    assert code == 0, printed
    results = tmp_path / "results" / "scores.jsonl"
    code, printed_by_eval = invoke(
        "eval",
        *("--model", str(output), "--dataset", str(data), "--config", str(config)),
        *("--max-samples", "2", "--output", str(results)),
    )
    assert code == 0, printed_by_eval

    assert judge.authorizations and set(judge.authorizations) == {f"Bearer {SECRET}"}, "the key was used"
    assert (output / "report.html").is_file() and results.is_file()
    assert files_holding_the_secret(output) == [] and files_holding_the_secret(results.parent) == []
    assert SECRET not in printed and SECRET not in printed_by_eval


def test_pipeline_uses_the_key_and_writes_or_prints_it_nowhere(judge, tiny_model, tmp_path):
    output = tmp_path / "pipeline"
    data = str(prompts_file(tmp_path))
    grpo = {**TINY_TRAIN, "dataset": data, "eval_dataset": data, "reward_funcs": [judge_entry(judge)]}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output), "model": str(tiny_model), "grpo": grpo}))
    code, printed = invoke("pipeline", str(config))
    assert code == 0, printed
    code, printed_again = invoke("pipeline", str(config))  # finished: compared with its record, skipped
    assert code == 0 and "finished earlier" in printed_again, printed_again

    assert judge.authorizations and set(judge.authorizations) == {f"Bearer {SECRET}"}
    assert (output / "grpo" / "pipeline_stage.json").is_file()
    assert files_holding_the_secret(output) == []
    assert SECRET not in printed + printed_again


def test_compare_hands_the_key_to_its_runs_through_their_environment_only(judge, tiny_model, tmp_path):
    """Each run of a comparison is a `grpo` process reading a settings file: the key reaches the base
    model's held-out score (`grpo eval`) and the training run (`grpo train`) though no file holds it."""
    output = tmp_path / "compare"
    comparison = {
        "output_dir": str(output),
        "model": str(tiny_model),
        "dataset": "arithmetic",
        "max_steps": 1,
        "eval_max_samples": 2,
        "common": {**TINY_TRAIN, "reward_funcs": [judge_entry(judge)]},
        "methods": {"grpo": {}},
    }
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(comparison))
    code, printed = invoke("compare", str(config))
    assert code == 0, printed

    rewards = yaml.safe_load((output / "rewards.yaml").read_text())["reward_funcs"]
    assert rewards[0]["api_key_env"] == "GRPO_REWARD_1_API_KEY" and "api_key" not in rewards[0]
    # Both processes sent the key: the base model's score before training, and the run's own scoring.
    assert len(judge.authorizations) > 2 and set(judge.authorizations) == {f"Bearer {SECRET}"}
    assert files_holding_the_secret(output) == []
    assert SECRET not in printed


def test_a_run_that_fails_on_a_server_echoing_the_key_shows_it_nowhere(judge, tiny_model, tmp_path):
    judge.failing = True
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"reward_funcs": [judge_entry(judge)], **TINY_TRAIN}))
    output = tmp_path / "run"
    code, printed = invoke(*train_args(config, tiny_model, prompts_file(tmp_path), output))

    assert code == 2, printed
    error = printed.strip().splitlines()[-1]
    assert error.startswith("error: ") and "HTTP 500" in error, printed
    assert "you sent Bearer ***" in error, "the server's echo is shown, the key in it redacted"
    assert SECRET not in printed
    assert files_holding_the_secret(tmp_path) == ["run.yaml"], "only the user's own file holds it"


def test_a_comparison_that_fails_on_a_server_echoing_the_key_shows_it_nowhere(judge, tiny_model, tmp_path):
    judge.failing = True
    output = tmp_path / "compare"
    comparison = {
        "output_dir": str(output),
        "model": str(tiny_model),
        "eval_max_samples": 2,
        "common": {**TINY_TRAIN, "reward_funcs": [judge_entry(judge)]},
        "methods": {"grpo": {}},
    }
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(comparison))
    code, printed = invoke("compare", str(config))

    assert code == 1, printed  # (a run that failed: its line and where its whole output is)
    assert "you sent Bearer ***" in printed and set(judge.authorizations) == {f"Bearer {SECRET}"}
    assert SECRET not in printed
    assert files_holding_the_secret(output) == []
