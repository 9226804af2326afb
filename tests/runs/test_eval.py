"""The evaluator: pass@k and maj@k against hand-computed values, the summary of canned completions, and
`grpo eval` through the CLI on the tiny model — results files, a full fine-tuning checkpoint, a run that has
not finished, GSM8K. (A LoRA checkpoint: test_train_e2e.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from cli_args import base_args
from typer.testing import CliRunner, Result

import grpo.runs.eval
from grpo.cli.evaluate import load_for_eval
from grpo.cli.main import app, parse_ks
from grpo.errors import ConfigError
from grpo.rewards import build_rewards
from grpo.runs.eval import evaluate, maj_at_k, majority_vote, pass_at_k


# --- pass@k ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # the share of correct samples
        (5, 2, 2, 1 - 3 / 10),  # 1 − C(3,2)/C(5,2)
        (5, 0, 3, 0.0),  # nothing correct
        (5, 3, 3, 1.0),  # fewer wrong samples (2) than k (3): some draw is always right
        (10, 1, 5, 1 - 126 / 252),  # 1 − C(9,5)/C(10,5)
        (1, 1, 1, 1.0),  # greedy, right
        (1, 0, 1, 0.0),  # greedy, wrong
        (4, 4, 4, 1.0),  # all right
        (4, 1, 4, 1.0),  # k = n: right when any sample is
    ],
)
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


# --- majority vote and maj@k -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["7", "8", "7"], "7"),  # two votes against one
        (["8", "7", "7"], "7"),  # the majority wins wherever it comes
        (["5", "3", "3", "5"], "5"),  # a tie: the answer given first
        (["3", "5", "5", "3"], "3"),
        (["9", "5", "3"], "9"),  # all different: a three-way tie, the first
        (["4"], "4"),  # one sample
        ([None, "4", None], "4"),  # no answer abstains, however many
        ([None, None], None),  # nobody answered
        ([], None),
        (["12.0", "13", "12"], "12.0"),  # equal numbers vote together, spelled as first given
        (["1,200", "1200", "7", "7", "7"], "7"),  # 2 for 1200 against 3 for 7
        (["Paris", " paris ", "Rome"], "Paris"),  # words compare without case or spacing
    ],
)
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


@pytest.mark.parametrize(
    ("answers", "reference", "k", "expected"),
    [
        (["7", "8", "8"], "7", 1, 1 / 3),  # k = 1: the share of right answers
        (["8", "7", "7"], "7", 3, 1.0),  # k = n: the majority of all three
        (["8", "7", "7"], "7", 2, 0.0),  # one run of two (8, 7): a tie, won by the first given (8)
        (["7", "8", "8"], "7", 2, 1.0),  # the same tie won by the right answer
        (["5", "3", "3", "9"], "3", 2, 0.5),  # runs (5, 3) → 5 ✗ and (3, 9) → 3 ✓
        (["5", "3", "3", "9", "3"], "3", 2, 0.5),  # the same two runs; the fifth sample starts no run
        (["1", "2", "3", "4"], "10", 4, 0.0),  # all wrong
        (["1", "2", "3", "4"], "10", 1, 0.0),
        (["10", "10.0", "1e1", None], "10", 4, 1.0),  # right (1e1 is no answer the vote merges)
        (["10", "10.0", "10", "10"], "10", 1, 1.0),  # all right
        (["10", "10.0", "10", "10"], "10", 2, 1.0),
        ([None, None, None], "10", 3, 0.0),  # no answers at all
        (["72", "70"], "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1, 0.5),  # GSM8K's reference
        (["1,200", "5"], "1200", 2, 1.0),  # a tie won by 1,200, judged as the accuracy reward judges
    ],
)
def test_maj_at_k(answers, reference, k, expected):
    assert maj_at_k(answers, reference, k) == pytest.approx(expected)


@pytest.mark.parametrize("k", [0, 4])
def test_maj_at_k_needs_k_between_1_and_the_samples(k):
    with pytest.raises(ValueError, match="1 ≤ k ≤ 3"):
        maj_at_k(["1", "2", "3"], "1", k)


# --- evaluate() on canned completions --------------------------------------------------------------------
# Four rows, four samples each, scored with accuracy and format (solved = right answer in the tags and
# nothing after them). Hand-computed per row: c = solved samples; maj@k over the runs of k samples.
CANNED = [
    # answers 7, 8, 7, none: c = 2; maj@1 2/4; maj@2 (7, 8) tie → 7 ✓, (7, none) → 7 ✓: 1; maj@4 7 ✓
    ("7", ["<answer>7</answer>", "<answer>8</answer>", "so <answer>7</answer>", "seven"]),
    # answers 5, 3, 3, 9: c = 2; maj@1 2/4; maj@2 (5, 3) tie → 5 ✗, (3, 9) tie → 3 ✓: 1/2; maj@4 3 ✓
    ("3", ["<answer>5</answer>", "<answer>3</answer>", "<answer>3</answer>", "<answer>9</answer>"]),
    # all wrong: c = 0; maj 0
    ("10", ["<answer>1</answer>"] * 4),
    # right answers with text after the tags: never solved (format), but the vote is right: c = 0; maj 1
    ("2", ["<answer>2</answer> done"] * 4),
]


@pytest.fixture()
def canned_generate(monkeypatch):
    """generate() replaced by the CANNED completions, row by row, whatever the model."""

    def fake(model, tokenizer, prompts, *, num_generations, **_):
        texts = []
        for prompt in prompts:
            _, completions = CANNED[int(prompt.removeprefix("q"))]
            texts += completions[:num_generations]
        return SimpleNamespace(texts=texts)

    monkeypatch.setattr(grpo.runs.eval, "generate", fake)
    return [{"prompt": f"q{i}", "answer": answer} for i, (answer, _) in enumerate(CANNED)]


def test_summary_of_sampled_completions_matches_hand_values(canned_generate):
    rewards = build_rewards(["accuracy", "format"])
    summary, records = evaluate(
        None, None, canned_generate, rewards, max_completion_length=8, num_samples=4, ks=[2], batch_size=8
    )
    # pass@k per row: c = 2 of 4 gives 1/2, 1 − C(2,2)/C(4,2) = 5/6, 1; c = 0 gives 0.
    assert summary["pass@1"] == pytest.approx((0.5 + 0.5) / 4)
    assert summary["pass@2"] == pytest.approx((5 / 6 + 5 / 6) / 4)
    assert summary["pass@4"] == pytest.approx(2 / 4)
    assert summary["maj@1"] == pytest.approx((2 / 4 + 2 / 4 + 0 + 1) / 4)
    assert summary["maj@1"] == pytest.approx(summary["reward/accuracy"])  # one sample: its accuracy
    assert summary["maj@2"] == pytest.approx((1 + 1 / 2 + 0 + 1) / 4)
    assert summary["maj@4"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert summary["solved"] == pytest.approx(4 / 16)
    assert summary["reward/accuracy"] == pytest.approx((2 + 2 + 0 + 4) / 16)
    assert not {"pass@3", "maj@3"} & set(summary)
    assert records[0]["answers"] == ["7", "8", "7", None]
    assert records[0]["solved"] == [True, False, True, False]
    assert [r["voted"] for r in records] == ["7", "3", "1", "2"]
    assert [r["voted_right"] for r in records] == [True, True, False, True]
    assert records[1]["scores"]["accuracy"] == [0.0, 1.0, 1.0, 0.0]


def test_greedy_summary_has_pass_and_maj_at_1(canned_generate):
    rewards = build_rewards(["accuracy", "format"])
    summary, records = evaluate(None, None, canned_generate, rewards, max_completion_length=8)
    # the first completion of each row: solved, wrong, wrong, right but not in the format
    assert summary["solved"] == summary["pass@1"] == pytest.approx(1 / 4)
    assert summary["maj@1"] == pytest.approx(2 / 4)
    assert [r["voted"] for r in records] == ["7", "5", "1", "2"]


def test_rows_with_a_subset_are_also_scored_per_subset(canned_generate):
    names = ["seen", "unseen", "seen", "unseen"]
    rows = [{**row, "subset": name} for row, name in zip(canned_generate, names)]
    rewards = build_rewards(["accuracy", "format"])
    summary, records = evaluate(None, None, rows, rewards, max_completion_length=8)
    # greedy: "seen" rows solved, wrong; "unseen" rows wrong, right but not in the format
    assert summary["solved/seen"] == pytest.approx(1 / 2)
    assert summary["solved/unseen"] == pytest.approx(0.0)
    assert summary["solved"] == pytest.approx(1 / 4)
    assert summary["rows/seen"] == summary["rows/unseen"] == 2
    assert [r["subset"] for r in records] == ["seen", "unseen", "seen", "unseen"]
    levels = [{**row, "subset": level} for row, level in zip(canned_generate, [1, 1, None, 2])]
    summary, records = evaluate(None, None, levels, rewards, max_completion_length=8)
    assert (summary["rows/1"], summary["rows/2"]) == (2, 1) and "subset" not in records[2]
    plain, _ = evaluate(None, None, canned_generate, build_rewards(["accuracy"]), max_completion_length=8)
    assert not any(key.startswith("solved/") for key in plain)


def test_no_maj_at_k_without_answers(canned_generate):
    rows = [{"prompt": row["prompt"]} for row in canned_generate]
    summary, records = evaluate(
        None, None, rows, build_rewards(["format"]), max_completion_length=8, num_samples=2
    )
    assert {"pass@1", "pass@2"} <= set(summary) and not any(key.startswith("maj@") for key in summary)
    assert records[1]["voted"] == "5" and records[1]["voted_right"] is None


def test_evaluate_refuses_a_k_above_the_samples(canned_generate):
    with pytest.raises(ValueError, match="num_samples = 2"):
        evaluate(None, None, canned_generate, [], max_completion_length=8, num_samples=2, ks=[3])


# --- --k -------------------------------------------------------------------------------------------------
def test_parse_ks():
    assert parse_ks(None, 4) == []
    assert parse_ks("1,2,4", 4) == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"^--k 5: each k must be from 1 to --num-samples \(4\)"):
        parse_ks("2,5", 4)
    with pytest.raises(ConfigError, match=r"^--k takes whole numbers"):
        parse_ks("1,four", 4)


# --- through the CLI, on the tiny model ------------------------------------------------------------------
def invoke(*args: str) -> Result:
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == 0, result.output
    return result


def test_jsonl_output_has_a_line_per_row_and_a_summary_beside_it(tiny_model, tiny_dataset, tmp_path):
    output = tmp_path / "out" / "results.jsonl"
    common = ["eval", "--model", str(tiny_model), "--dataset", str(tiny_dataset), "--max-samples", "5"]
    result = invoke(
        *common,
        "--num-samples",
        "4",
        "--k",
        "2,3",
        "--top-p",
        "0.9",
        "--max-completion-length",
        "5",
        "--output",
        str(output),
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 5
    keys = {"prompt", "answer", "completions", "scores", "solved", "answers", "voted", "voted_right"}
    assert keys <= set(lines[0])
    assert len(lines[0]["completions"]) == len(lines[0]["solved"]) == len(lines[0]["scores"]["accuracy"]) == 4
    assert lines[0]["prompt"] == "What is 0 + 0?" and lines[0]["answer"] == "0"
    saved = json.loads((tmp_path / "out" / "results.summary.json").read_text())
    assert saved["summary"] == json.loads(result.stdout)
    assert {f"{metric}@{k}" for metric in ("pass", "maj") for k in (1, 2, 3, 4)} <= set(saved["summary"])
    assert saved["weights"] == str(tiny_model) and saved["rows_file"] == "results.jsonl"
    assert (saved["num_samples"], saved["top_p"], saved["greedy"]) == (4, 0.9, False)

    single = tmp_path / "results.json"  # the one-file format of a run's eval_*.json
    invoke(*common, "--max-completion-length", "5", "--output", str(single))
    saved = json.loads(single.read_text())
    assert len(saved["rows"]) == 5 and saved["summary"]["pass@1"] == saved["summary"]["solved"]
    assert not list(tmp_path.glob("*.summary.json"))


def test_full_fine_tuning_checkpoint_and_unfinished_run(tiny_model, tiny_dataset, tmp_path, reward_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    args = [*base_args(tiny_model, tiny_dataset, run, reward_file), "--max-steps", "2", "--no-eval-on-start"]
    invoke("train", *args, "--no-use-lora")
    checkpoint = run / "checkpoint-2"
    # The whole model without a tokenizer: that comes from the model the run started from.
    assert (checkpoint / "config.json").is_file() and not (checkpoint / "tokenizer_config.json").exists()
    output = tmp_path / "checkpoint.jsonl"
    invoke("eval", "--model", str(checkpoint), "--dataset", str(tiny_dataset), "--max-samples", "2",
           "--max-completion-length", "4", "--output", str(output))  # fmt: skip
    assert json.loads((tmp_path / "checkpoint.summary.json").read_text())["weights"] == str(checkpoint)

    model, tokenizer, _ = load_for_eval(str(checkpoint))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    loaded = model.state_dict()
    # The checkpoint of the last step holds the final model's weights, which the step changed.
    final = AutoModelForCausalLM.from_pretrained(run / "final_model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(loaded[name], final[name]) for name in final)
    assert any(not torch.equal(loaded[name], base[name]) for name in base)
    # A run without final_model (stopped before the end): its newest checkpoint.
    assert load_for_eval(str(run))[2] == str(run / "final_model")
    (run / "final_model").rename(tmp_path / "elsewhere")
    assert load_for_eval(str(run))[2] == str(checkpoint)


def test_gsm8k_through_eval_and_train(tiny_model, tmp_path):
    """The shipped GSM8K works offline: `grpo eval --dataset gsm8k` and `grpo train --dataset gsm8k`."""
    output = tmp_path / "gsm8k.jsonl"
    result = invoke(
        "eval",
        "--model",
        str(tiny_model),
        "--dataset",
        "gsm8k",
        "--max-samples",
        "2",
        "--max-completion-length",
        "3",
        "--output",
        str(output),
    )
    assert json.loads(result.stdout)["rows"] == 2
    first = json.loads(output.read_text().splitlines()[0])
    assert first["answer"] == "18" and first["prompt"].startswith("Janet’s ducks lay 16 eggs per day.")
    # The tiny tokenizer spells GSM8K prompts in more tokens than a real one: room for them.
    run = tmp_path / "run"
    invoke(
        "train",
        "--model",
        str(tiny_model),
        "--dataset",
        "gsm8k",
        "--output-dir",
        str(run),
        "--max-steps",
        "1",
        "--num-generations",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "1",
        "--max-completion-length",
        "3",
        "--max-prompt-length",
        "4096",
        "--no-eval-on-start",
        "--eval-max-samples",
        "1",
        "--reward-funcs",
        "accuracy",
    )
    assert json.loads((run / "eval_after.json").read_text())["summary"]["rows"] == 1
