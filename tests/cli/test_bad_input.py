"""Every bad input tried, and the one line the user sees: through the real CLI, exit code 2, no traceback,
nothing written that a later run would trip over. docs/reliability.md shows this table; a test keeps the
two identical. Regenerate the table after changing a case with:

    .venv/bin/python tests/cli/test_bad_input.py --write-docs
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_model import ADD_TOOL
from typer.testing import CliRunner

from grpo.cli.main import app, quiet_libraries

quiet_libraries()  # as the `grpo` command does before it runs
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-input table: begin -->", "<!-- bad-input table: end -->"


@dataclass
class Case:
    area: str
    what: str
    build: Callable[[Path, Path], list[str]]  # (tmp directory, tiny model) -> the command's arguments
    says: str  # the line on stderr; {tmp} stands for the test's temporary directory


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


SUMS = "".join(
    json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)}) + "\n"
    for a in range(4)
)


def train(tmp: Path, model: Path, *flags: str, dataset: str | None = None) -> list[str]:
    """A small, valid `grpo train` command with ``flags`` added (later flags win)."""
    data = dataset or str(write(tmp / "sums.jsonl", SUMS))
    return [
        "train",
        "--model",
        str(model),
        "--dataset",
        data,
        "--output-dir",
        str(tmp / "out"),
        "--num-generations",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "1",
        "--max-completion-length",
        "4",
        "--max-steps",
        "1",
        "--no-eval-on-start",
        *flags,
    ]


def empty_directory(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def config_file(text: str | bytes) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: train(tmp, model, "--config", str(write(tmp / "run.yaml", text)))


def dataset(name: str, content: str | bytes) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: train(tmp, model, dataset=str(write(tmp / name, content)))


def flags(*given: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: train(tmp, model, *given)


def reward(body: str) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, model: Path) -> list[str]:
        path = write(tmp / "rewards.py", body)
        return train(tmp, model, "--reward-funcs", f"{path}:score")

    return build


def model_dir(change: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """The tiny model copied and then damaged by ``change``."""

    def build(tmp: Path, model: Path) -> list[str]:
        copy = tmp / "model"
        shutil.copytree(model, copy)
        change(copy)
        return train(tmp, copy)

    return build


def pickled_only(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def without_pad_and_eos(directory: Path) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        config.pop(key, None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("special_tokens_map.json",):
        (directory / name).unlink(missing_ok=True)


def without_chat_template(directory: Path) -> None:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


TOOL = (
    ADD_TOOL
    + '''

def untyped(a, b):
    """Add.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)


def undocumented(a: int) -> str:
    return str(a)
'''
)
ENVIRONMENTS = '''
class NoReset:
    def step(self, text):
        return None


class NeedsArguments:
    def __init__(self, size):
        self.size = size

    def reset(self, **row):
        return None


class Clashing:
    def reset(self, **row):
        return None

    def add(self, a: int) -> str:
        """Also add.

        Args:
            a: A number.
        """
        return str(a)
'''


def tools(entry: str, *more: str) -> Callable[[Path, Path], list[str]]:
    """`grpo train --tools ENTRY` with {file} standing for a file of tools (and no model to load: the
    entry must be refused before one is)."""

    def build(tmp: Path, model: Path) -> list[str]:
        path = write(tmp / "my_tools.py", TOOL)
        return train(tmp, tmp / "no-model-here", "--tools", entry.format(file=path, tmp=tmp), *more)

    return build


def environment(entry: str, *more: str) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, model: Path) -> list[str]:
        path = write(tmp / "envs.py", ENVIRONMENTS)
        tool = write(tmp / "my_tools.py", TOOL)
        given = [arg.format(tools=tool) for arg in more]
        return train(tmp, tmp / "no-model-here", "--environment", entry.format(file=path), *given)

    return build


def string_prompt_with_tools(tmp: Path, model: Path) -> list[str]:
    plain = write(tmp / "plain.jsonl", '{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    return train(tmp, model, "--tools", f"{write(tmp / 'my_tools.py', TOOL)}:add", dataset=str(plain))


def a_finished_run(*changed: str) -> Callable[[Path, Path], list[str]]:
    """A run of one step in {tmp}/out, then the same command with ``changed`` flags."""

    def build(tmp: Path, model: Path) -> list[str]:
        result = CliRunner().invoke(app, train(tmp, model, "--reward-funcs", "format"))
        assert result.exit_code == 0, result.output
        return train(tmp, model, "--reward-funcs", "format", *changed)

    return build


def damaged_checkpoint(name: str, content: bytes) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, model: Path) -> list[str]:
        args = a_finished_run()(tmp, model)
        checkpoint = tmp / "out" / "checkpoint-1"
        if name == "adapter_model.bin":
            (checkpoint / "adapter_model.safetensors").unlink()
        write(checkpoint / name, content)
        return [*args, "--resume", str(tmp / "out"), "--max-steps", "2"]

    return build


CASES = [
    # --- the config: a YAML file and flags -----------------------------------------------------------------
    Case(
        "config",
        "unknown setting in a config file",
        config_file("learning_rat: 0.001\n"),
        "{tmp}/run.yaml: unknown setting 'learning_rat'; did you mean 'learning_rate'?",
    ),
    Case(
        "config",
        "unknown setting with nothing close",
        config_file("colour: blue\n"),
        "{tmp}/run.yaml: unknown setting 'colour'",
    ),
    Case(
        "config",
        "wrong type in a config file",
        config_file("max_steps: many\n"),
        "{tmp}/run.yaml: max_steps must be an integer, got 'many'",
    ),
    Case(
        "config",
        "wrong type on the command line",
        flags("--learning-rate", "fast"),
        "command line: learning_rate must be a number, got 'fast'",
    ),
    Case(
        "config",
        "a fraction for a whole number",
        flags("--max-steps", "2.5"),
        "command line: max_steps must be an integer, got '2.5'",
    ),
    Case(
        "config",
        "a list where one value is expected",
        config_file("seed: [1, 2]\n"),
        "{tmp}/run.yaml: seed must be an integer, got [1, 2]",
    ),
    Case(
        "config",
        "null for a setting that needs a value",
        config_file("max_steps: null\n"),
        "{tmp}/run.yaml: max_steps must not be empty",
    ),
    Case(
        "config",
        "a group of one",
        flags("--num-generations", "1"),
        "num_generations must be at least 2 (a group needs others to compare with), got 1",
    ),
    Case(
        "config",
        "a batch that does not divide into groups",
        flags("--per-device-train-batch-size", "3"),
        "per_device_train_batch_size × gradient_accumulation_steps = 3 completions do not divide into groups "
        "of num_generations = 2",
    ),
    Case(
        "config",
        "a negative clip range",
        flags("--epsilon", "-0.1"),
        "epsilon must not be negative, got -0.1",
    ),
    Case(
        "config",
        "a setting the chosen algorithm would ignore",
        flags("--algorithm", "softmax_weighted", "--epsilon", "0.1"),
        "epsilon = 0.1 would be ignored: algorithm 'softmax_weighted' does not clip the ratio πθ/πθ_old "
        "(grpo, rloo and ppo do)",
    ),
    Case(
        "config",
        "a clip range with one update per batch",
        flags("--epsilon-high", "0.28"),
        "epsilon_high = 0.28 would be ignored: with num_iterations 1 each batch gets one update, from the "
        "policy that sampled it, so the clip has no change of policy to bound",
    ),
    Case(
        "config",
        "an output directory that is a file",
        lambda tmp, model: train(tmp, model, "--output-dir", str(write(tmp / "out", "notes"))),
        "output_dir {tmp}/out: it is a file, not a directory; choose another",
    ),
    Case("config", "NaN for a number", flags("--beta", "nan"), "beta must be a finite number, got nan"),
    Case(
        "config",
        "a value outside its choices",
        flags("--loss-type", "ppo"),
        "loss_type must be one of grpo, bnpo, dr_grpo, dapo; got 'ppo'",
    ),
    Case("config", "top_p of 0", flags("--top-p", "0"), "top_p must be in (0, 1], got 0.0"),
    Case(
        "config",
        "zero completion tokens",
        flags("--max-completion-length", "0"),
        "max_completion_length must be at least 1, got 0",
    ),
    Case(
        "config",
        "more weights than reward functions",
        flags("--reward-weights", "1,2,3"),
        "reward_weights has 3 values for 2 reward_funcs",
    ),
    Case(
        "config",
        "a config file that is not YAML",
        config_file("max_steps: [1\n"),
        "{tmp}/run.yaml (line 2): not valid YAML",
    ),
    Case(
        "config",
        "a config file that is a list",
        config_file("- max_steps: 1\n"),
        "{tmp}/run.yaml: a config file must be a mapping of setting: value",
    ),
    Case(
        "config",
        "a config file that is not UTF-8",
        config_file(b"seed: \xff\n"),
        "{tmp}/run.yaml: not valid YAML",
    ),
    Case(
        "config",
        "a config file that does not exist",
        lambda tmp, model: train(tmp, model, "--config", str(tmp / "missing.yaml")),
        "{tmp}/missing.yaml: config file not found",
    ),
    # --- the dataset ---------------------------------------------------------------------------------------
    Case(
        "dataset",
        "a dataset file that does not exist",
        lambda tmp, model: train(tmp, model, dataset=str(tmp / "missing.jsonl")),
        "{tmp}/missing.jsonl: dataset file not found",
    ),
    Case(
        "dataset", "an empty file", dataset("empty.jsonl", ""), "{tmp}/empty.jsonl: the dataset has no rows"
    ),
    Case(
        "dataset",
        "a CSV file with only its header",
        dataset("head.csv", "prompt,answer\n"),
        "{tmp}/head.csv: the dataset has no rows",
    ),
    Case(
        "dataset",
        "a line that is not JSON",
        dataset("bad.jsonl", SUMS + "{oops\n"),
        "{tmp}/bad.jsonl: line 5: not valid JSON (Expecting property name enclosed in double quotes)",
    ),
    Case(
        "dataset",
        "a row that is not an object",
        dataset("list.jsonl", '["What is 1 + 1?"]\n'),
        "{tmp}/list.jsonl: line 1: a row must be a JSON object",
    ),
    Case(
        "dataset",
        "a .json file that is not a list",
        dataset("one.json", '{"prompt": "hi"}'),
        "{tmp}/one.json: a .json dataset must be a list of objects",
    ),
    Case(
        "dataset",
        "a row without a prompt",
        dataset("noprompt.jsonl", SUMS + '{"question": "2 + 2?"}\n'),
        "{tmp}/noprompt.jsonl: row 5: missing field 'prompt'",
    ),
    Case(
        "dataset",
        "a CSV file without a prompt column",
        dataset("q.csv", "question,answer\n1 + 1?,2\n"),
        "{tmp}/q.csv: row 1: missing field 'prompt'",
    ),
    Case(
        "dataset",
        "a CSV row with more cells than the header has columns",
        dataset("wide.csv", "prompt,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4,extra\n"),
        "{tmp}/wide.csv: line 3: 3 cells for 2 columns",
    ),
    Case(
        "dataset",
        "an empty prompt",
        dataset("blank.jsonl", '{"prompt": "  ", "answer": "1"}\n'),
        "{tmp}/blank.jsonl: row 1: field 'prompt' is empty",
    ),
    Case(
        "dataset",
        "a prompt that is a number",
        dataset("num.jsonl", '{"prompt": 7, "answer": "1"}\n'),
        "{tmp}/num.jsonl: row 1: field 'prompt' must be a string or a list of chat messages",
    ),
    Case(
        "dataset",
        "a chat message without a role",
        dataset("chat.jsonl", '{"prompt": [{"content": "hi"}], "answer": "1"}\n'),
        '{tmp}/chat.jsonl: row 1: field \'prompt\' message 0 must be {"role": str, "content": str}',
    ),
    Case(
        "dataset",
        "bytes that are not UTF-8",
        dataset("latin1.jsonl", SUMS.encode() + b'{"prompt": "caf\xe9"}\n'),
        "{tmp}/latin1.jsonl: line 5: not valid UTF-8",
    ),
    Case(
        "dataset",
        "rows without the answer the accuracy reward needs",
        dataset("noanswer.jsonl", '{"prompt": "What is 1 + 1?"}\n'),
        "{tmp}/noanswer.jsonl: row 1: missing field 'answer' (the accuracy reward needs it)",
    ),
    Case(
        "dataset",
        "a prompt longer than max_prompt_length",
        flags("--max-prompt-length", "5"),
        "{tmp}/sums.jsonl: row 1: the prompt has 25 tokens, more than max_prompt_length = 5",
    ),
    # --- the model -----------------------------------------------------------------------------------------
    Case(
        "rewards",
        "a judge's key named by an environment variable that is not set",
        config_file(
            "reward_funcs:\n  - {name: judge, base_url: 'http://127.0.0.1:9', api_model: m, "
            "api_key_env: GRPO_TEST_UNSET_KEY}\n"
        ),
        "reward 'judge': api_key_env names GRPO_TEST_UNSET_KEY, which is not set in the environment; set it "
        "to the judge's API key",
    ),
    Case(
        "model",
        "a model directory that does not exist",
        lambda tmp, model: train(tmp, tmp / "no-such-model"),
        "{tmp}/no-such-model: model directory not found",
    ),
    Case(
        "model",
        "a directory that is not a model",
        lambda tmp, model: train(tmp, tmp),
        "{tmp}: not a model directory (no config.json)",
    ),
    Case(
        "model",
        "a GGUF file that does not exist",
        lambda tmp, model: train(tmp, tmp / "model.gguf"),
        "{tmp}/model.gguf: GGUF file not found",
    ),
    Case(
        "model",
        "weights only as a pickle (pytorch_model.bin)",
        model_dir(pickled_only),
        "{tmp}/model: has its weights only as pickles (pytorch_model.bin); grpo loads safetensors only, "
        "since unpickling can run any code. If you trust the file, convert it once with transformers' "
        "save_pretrained(..., safe_serialization=True)",
    ),
    Case(
        "model",
        "a tokenizer with neither a pad nor an end-of-sequence token",
        model_dir(without_pad_and_eos),
        "{tmp}/model: the tokenizer has neither a pad token nor an end-of-sequence token",
    ),
    Case(
        "model",
        "chat prompts for a tokenizer without a chat template",
        model_dir(without_chat_template),
        "{tmp}/sums.jsonl: row 1: the prompt is chat messages but the tokenizer has no chat template "
        "({tmp}/model)",
    ),
    # --- reward functions ----------------------------------------------------------------------------------
    Case(
        "rewards",
        "an unknown reward name",
        flags("--reward-funcs", "acuracy"),
        "unknown reward function 'acuracy': use a built-in (accuracy, format, language_consistency, "
        "overlong, code, reward_model, judge), 'module:function' or 'path/to/file.py:function'",
    ),
    Case(
        "rewards",
        "a reward file that does not exist",
        flags("--reward-funcs", "nowhere.py:score"),
        "reward function 'nowhere.py:score': file nowhere.py not found",
    ),
    Case(
        "rewards",
        "a reward file without the function",
        reward("def other(prompts, completions, **kw):\n    pass\n"),
        "reward function '{tmp}/rewards.py:score': {tmp}/rewards.py has no function 'score'",
    ),
    Case(
        "rewards",
        "a reward file that fails to import",
        reward("def score(:\n"),
        "reward function '{tmp}/rewards.py:score': importing {tmp}/rewards.py failed: invalid syntax "
        "(rewards.py, line 1)",
    ),
    Case(
        "rewards",
        "a reward function that raises",
        reward("def score(prompts, completions, **kw):\n    raise KeyError('label')\n"),
        "step 1: reward function 'score' raised KeyError: 'label'",
    ),
    Case(
        "rewards",
        "a reward function returning too few values",
        reward("def score(prompts, completions, **kw):\n    return [1.0]\n"),
        "step 1: reward function 'score' returned 1 values for 2 completions",
    ),
    Case(
        "rewards",
        "a reward function returning NaN",
        reward("def score(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"),
        "step 1: reward function 'score' returned nan for completion 0",
    ),
    Case(
        "rewards",
        "a reward function returning text",
        reward("def score(prompts, completions, **kw):\n    return ['good'] * len(completions)\n"),
        "step 1: reward function 'score' returned 'good' for completion 0",
    ),
    Case(
        "rewards",
        "a reward function returning a number, not a list",
        reward("def score(prompts, completions, **kw):\n    return 1.0\n"),
        "step 1: reward function 'score' returned float, not a list",
    ),
    Case(
        "rewards",
        "reward weights that are not numbers",
        flags("--reward-weights", "a,b"),
        "command line: reward_weights must be a list of numbers, got 'a,b'",
    ),
    # --- checkpoints and resuming --------------------------------------------------------------------------
    Case(
        "resume",
        "--resume of a directory that is neither a run nor a checkpoint",
        lambda tmp, model: train(tmp, model, "--resume", str(tmp)),
        "{tmp}: resume_from_checkpoint: neither a run directory (no config.yaml) nor a checkpoint",
    ),
    Case(
        "resume",
        "another run's checkpoint in the output directory",
        a_finished_run("--learning-rate", "0.5"),
        "{tmp}/out: holds checkpoint-1 of a run with other settings (learning_rate: 0.0002 there, 0.5 now); "
        "continue it with --resume {tmp}/out (its settings, yours on top) or choose another --output-dir",
    ),
    Case(
        "resume",
        "a checkpoint whose optimizer file is damaged",
        damaged_checkpoint("optimizer.safetensors", b"\x00garbage"),
        "{tmp}/out/checkpoint-1/optimizer.safetensors: damaged safetensors file (Error while deserializing "
        "header: header too large)",
    ),
    Case(
        "resume",
        "a checkpoint whose state file is damaged",
        damaged_checkpoint("trainer_state.json", b"{ half"),
        "{tmp}/out/checkpoint-1/trainer_state.json: damaged (not valid JSON)",
    ),
    Case(
        "resume",
        "a checkpoint with pickled weights",
        damaged_checkpoint("adapter_model.bin", b"\x80\x04pickle"),
        "{tmp}/out/checkpoint-1: holds pickled weights (adapter_model.bin); grpo reads only safetensors and "
        "JSON from a run directory and never unpickles it",
    ),
    # --- grpo eval -----------------------------------------------------------------------------------------
    Case(
        "eval",
        "`grpo eval` of a model that does not exist",
        lambda tmp, model: ["eval", "--model", str(tmp / "gone")],
        "{tmp}/gone: model directory not found",
    ),
    Case(
        "eval",
        "`grpo eval` with zero samples",
        lambda tmp, model: ["eval", "--model", str(model), "--num-samples", "0"],
        "num_samples must be at least 1, got 0",
    ),
    Case(
        "eval",
        "`grpo eval` with a k above the samples drawn",
        lambda tmp, model: ["eval", "--model", str(model), "--num-samples", "4", "--k", "2,8"],
        "--k 8: each k must be from 1 to --num-samples (4), the samples drawn per row",
    ),
    Case(
        "eval",
        "`grpo eval` writing results to neither .jsonl nor .json",
        lambda tmp, model: ["eval", "--model", str(model), "--output", str(tmp / "results.txt")],
        "--output {tmp}/results.txt: must end in .jsonl (a line per row, with a .summary.json beside it) or "
        ".json (one file)",
    ),
    Case(
        "eval",
        "`grpo eval` of a split the built-in task lacks",
        lambda tmp, model: ["eval", "--model", str(model), "--dataset", "gsm8k", "--split", "validation"],
        "gsm8k: no split 'validation' (train, test)",
    ),
    Case(
        "eval",
        "`grpo eval` of a directory that holds no model, run or checkpoint",
        lambda tmp, model: ["eval", "--model", str(empty_directory(tmp / "empty"))],
        "{tmp}/empty: not a model, run or checkpoint directory (no config.json, adapter_config.json, "
        "final_model/ or checkpoint-N/)",
    ),
    Case(
        "agents",
        "a tools entry whose file is missing",
        tools("{tmp}/gone.py:add"),
        "tools entry '{tmp}/gone.py:add': file {tmp}/gone.py not found",
    ),
    Case(
        "agents",
        "a tools entry naming a function the file lacks",
        tools("{file}:subtract"),
        "tools entry '{tmp}/my_tools.py:subtract': {tmp}/my_tools.py has no function 'subtract'",
    ),
    Case(
        "agents",
        "a tools entry naming a module that is not installed",
        tools("no_such_module:add"),
        "tools entry 'no_such_module:add': cannot import no_such_module (No module named 'no_such_module')",
    ),
    Case(
        "agents",
        "a tool without type hints",
        tools("{file}:untyped"),
        "tools entry '{tmp}/my_tools.py:untyped': Argument a is missing a type hint in "
        "function untyped (a tool needs a type hint on every argument and a Google-style "
        "docstring describing each)",
    ),
    Case(
        "agents",
        "a tool without a docstring",
        tools("{file}:undocumented"),
        "tools entry '{tmp}/my_tools.py:undocumented': Cannot generate JSON schema for "
        "undocumented because it has no docstring! (a tool needs a type hint on every "
        "argument and a Google-style docstring describing each)",
    ),
    Case(
        "agents",
        "an environment class the file lacks",
        environment("{file}:Missing"),
        "environment '{tmp}/envs.py:Missing': {tmp}/envs.py has no class 'Missing'",
    ),
    Case(
        "agents",
        "an environment without reset",
        environment("{file}:NoReset"),
        "environment '{tmp}/envs.py:NoReset': NoReset has no reset method (reset(self, **row))",
    ),
    Case(
        "agents",
        "an environment whose constructor needs arguments",
        environment("{file}:NeedsArguments"),
        "environment '{tmp}/envs.py:NeedsArguments': NeedsArguments() needs size; each "
        "trajectory's instance is made with no arguments",
    ),
    Case(
        "agents",
        "an environment method named as one of the tools",
        environment("{file}:Clashing", "--tools", "{tools}:add"),
        "tools entry 'Clashing.add': a tool named 'add' comes from "
        "'{tmp}/my_tools.py:add' too; tool names must differ",
    ),
    Case(
        "agents",
        "a string prompt in a run with tools",
        string_prompt_with_tools,
        "{tmp}/plain.jsonl: row 1: field 'prompt' must be chat messages for a run with "
        "tools or an environment (tool results are chat messages too)",
    ),
    Case(
        "agents",
        "max_turns without tools or an environment",
        flags("--max-turns", "3"),
        "max_turns = 3 would be ignored: there are no tools and no environment, so each "
        "completion is one assistant turn",
    ),
    Case(
        "agents",
        "tools with the paged backend",
        tools("{file}:add", "--generation-backend", "paged"),
        "tools and environment run multi-turn episodes, which generation_backend 'paged' cannot",
    ),
]


def case_id(case: Case) -> str:
    return f"{case.area}: {case.what}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_gives_one_line_exit_code_2_and_no_run_files(case, tmp_path, tiny_model):
    args = case.build(tmp_path, tiny_model)
    checkpoints_before = sorted((tmp_path / "out").glob("checkpoint-*"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    # A run that got as far as loading the model has printed its progress first; the error is the last line.
    lines = result.stderr.strip().splitlines()
    expected = "error: " + case.says.replace("{tmp}", str(tmp_path))
    assert [line for line in lines if line.startswith("error")] == [expected]
    assert lines[-1] == expected
    assert "Traceback" not in result.output
    # Nothing a later run would trip over: no new checkpoint, no half-written file.
    assert sorted((tmp_path / "out").glob("checkpoint-*")) == checkpoints_before
    assert not list(tmp_path.rglob(".tmp-*"))


def markdown_table() -> str:
    rows = ["| | bad input | what the user sees (stderr; exit code 2) |", "|---|---|---|"]
    for case in CASES:
        says = "error: " + case.says.replace("{tmp}", "DIR").replace("|", "\\|")
        rows.append(f"| {case.area} | {case.what} | `{says}` |")
    return "\n".join(rows)


def test_docs_show_every_case():
    text = DOC.read_text(encoding="utf-8")
    table = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.DOTALL)
    assert table is not None, f"{DOC} lacks the table markers"
    assert table.group(1) == markdown_table(), "regenerate: python tests/cli/test_bad_input.py --write-docs"


if __name__ == "__main__" and sys.argv[1:] == ["--write-docs"]:
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + markdown_table() + "\n" + text[end:], encoding="utf-8")
