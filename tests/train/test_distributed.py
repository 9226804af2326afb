"""Data parallelism: two processes over gloo compute what one process computes with the same global batch.

The runs go through ``torchrun`` and ``python -m grpo`` as a user launches them, on the tiny model, and are
compared on the losses they log and the weights they write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agent_model import write_tool
from safetensors.torch import load_file

from grpo.train.distributed import Ranks, group_seeds

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


# --- the pieces ------------------------------------------------------------------------------------------
def test_each_rank_takes_an_equal_contiguous_share_of_the_groups():
    rows = list("abcdef")
    shares = [Ranks(rank, 3).share(rows) for rank in range(3)]
    assert shares == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [Ranks(rank, 3).first_index(6) for rank in range(3)] == [0, 2, 4]
    assert Ranks().share(rows) == rows


def test_a_groups_seed_depends_on_its_place_in_the_step_not_on_the_split():
    whole = group_seeds(7, step=3, draw=0, first=0, count=4)
    halves = group_seeds(7, 3, 0, first=0, count=2) + group_seeds(7, 3, 0, first=2, count=2)
    assert whole == halves
    assert len(set(whole)) == 4
    assert group_seeds(7, 4, 0, 0, 4) != whole  # another step
    assert group_seeds(7, 3, 1, 0, 4) != whole  # dynamic sampling's next draw
    assert group_seeds(8, 3, 0, 0, 4) != whole  # another run seed


# --- whole runs ------------------------------------------------------------------------------------------
def launch(processes: int, output: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``grpo train`` in ``processes`` processes over gloo (plain ``python -m grpo`` for one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":  # gloo over the loopback device, whether or not the host name resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    runner = [sys.executable, "-m", "grpo"]
    if processes > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        runner += [f"--nproc-per-node={processes}", "-m", "grpo"]
    command = [*runner, "train", *args, "--output-dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    model = run / "final_model"
    files = sorted(model.glob("*.safetensors"))
    assert files, f"no weights in {model}"
    return {name: t for f in files for name, t in load_file(f).items()}


def assert_same_training(one: Path, two: Path, steps: int) -> None:
    a, b = logged(one), logged(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for m1, m2 in zip(a, b):
        # The same completions (each group's own seed), so the same rewards; the same update.
        assert m1["reward"] == pytest.approx(m2["reward"], abs=1e-6)
        assert m1["completions/mean_length"] == m2["completions/mean_length"]
        for key in ("loss", "grad_norm", "kl"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture()
def run_args(tiny_model: Path, tiny_dataset: Path, reward_file: Path) -> list[str]:
    return [
        "--model",
        str(tiny_model),
        "--dataset",
        str(tiny_dataset),
        "--seed",
        "7",
        "--num-generations",
        "4",
        "--per-device-train-batch-size",
        "4",
        "--max-completion-length",
        "10",
        "--learning-rate",
        "1e-2",
        "--beta",
        "0.04",
        "--logging-steps",
        "1",
        "--reward-funcs",
        f"format,{reward_file}:length_reward",
    ]


# Batch settings are per process, as in TRL: 4 prompts × 4 completions per step is 4 micro-batches of 4 in
# one process, 2 per rank in two.
ONE_PROCESS, PER_RANK_OF_TWO = ["--gradient-accumulation-steps", "4"], ["--gradient-accumulation-steps", "2"]


def test_two_processes_train_as_one_and_resume_in_one(tmp_path: Path, run_args: list[str]):
    """LoRA, "grpo" loss: 2 steps on 2 processes, then a 3rd resumed in 1 process, equal a 3-step run in 1."""
    one = tmp_path / "one"
    launch(1, one, [*run_args, *ONE_PROCESS, "--max-steps", "3"])
    two = tmp_path / "two"
    result = launch(2, two, [*run_args, *PER_RANK_OF_TWO, "--max-steps", "2"])
    assert "2 processes × 2 prompts per step = 4 prompts × 4 completions" in result.stdout + result.stderr
    assert result.stdout.count('"final_model"') == 1  # one rank reports and writes
    # The same global batch in one process: its settings, ours on top.
    launch(1, two, ["--resume", str(two), *ONE_PROCESS, "--max-steps", "3"])
    assert_same_training(one, two, steps=3)
    assert (two / "checkpoint-3").is_dir()


def test_two_processes_count_every_ranks_tokens_for_dapo(tmp_path: Path, run_args: list[str]):
    """Full fine-tuning with the "dapo" loss, whose normaliser is the whole batch's token count."""
    args = [*run_args, "--no-use-lora", "--loss-type", "dapo", "--max-steps", "2"]
    launch(1, tmp_path / "one", [*args, *ONE_PROCESS])
    launch(2, tmp_path / "two", [*args, *PER_RANK_OF_TWO])
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=2)


# --- sharded (FSDP2) -------------------------------------------------------------------------------------
def test_sharded_training_equals_one_process_and_resumes(tmp_path: Path, run_args: list[str]):
    """LoRA under FSDP on 2 processes: the same 3 steps as one process, across a checkpoint (its files hold
    whole weights and optimizer state) and a resume with the model sharded again."""
    one = tmp_path / "one"
    launch(1, one, [*run_args, *ONE_PROCESS, "--max-steps", "3"])
    sharded = tmp_path / "sharded"
    launch(2, sharded, [*run_args, *PER_RANK_OF_TWO, "--fsdp", "--max-steps", "2"])
    launch(2, sharded, [*run_args, *PER_RANK_OF_TWO, "--fsdp", "--max-steps", "3"])
    assert_same_training(one, sharded, steps=3)


def test_sharded_full_fine_tuning_equals_one_process(tmp_path: Path, run_args: list[str]):
    """Full fine-tuning (a sharded reference copy too) with the "dapo" loss, whose gradients are sums."""
    args = [*run_args, "--no-use-lora", "--loss-type", "dapo", "--max-steps", "2"]
    launch(1, tmp_path / "one", [*args, *ONE_PROCESS])
    launch(2, tmp_path / "sharded", [*args, *PER_RANK_OF_TWO, "--fsdp"])
    assert_same_training(tmp_path / "one", tmp_path / "sharded", steps=2)


def test_fsdp_needs_several_processes(tmp_path: Path, run_args: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = tmp_path / "run"
    command = [sys.executable, "-m", "grpo", "train", *run_args, "--fsdp", "--output-dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: fsdp: shards the model across processes")
    assert not output.exists()


ECHO = '''
class Echo:
    """Answers an assistant turn once, then ends the episode; its shout() is a tool."""

    def reset(self, **row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return "Say it again." if self.turns == 1 else None

    def shout(self, text: str) -> str:
        """Shout.

        Args:
            text: What to shout.
        """
        return text.upper()
'''


def test_two_processes_train_multi_turn_episodes_as_one(
    tmp_path: Path, run_args: list[str], agent_model: Path
):
    """An environment that answers each episode's first turn, and tools: one process and two alike."""
    (tmp_path / "echo.py").write_text(ECHO)
    write_tool(tmp_path)
    model_at = run_args.index("--model") + 1
    agent_args = [*run_args[:model_at], str(agent_model), *run_args[model_at + 1 :]]
    agent_args += [
        "--environment",
        f"{tmp_path / 'echo.py'}:Echo",
        "--tools",
        f"{tmp_path / 'my_tools.py'}:add",
    ]
    agent_args += ["--max-completion-length", "48", "--max-turns", "3", "--max-prompt-length", "1024"]
    launch(1, tmp_path / "one", [*agent_args, *ONE_PROCESS, "--max-steps", "2"])
    launch(2, tmp_path / "two", [*agent_args, *PER_RANK_OF_TWO, "--max-steps", "2"])
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=2)
    for m1, m2 in zip(logged(tmp_path / "one"), logged(tmp_path / "two")):
        assert {k: v for k, v in m1.items() if k.startswith("episodes/")} == {
            k: v for k, v in m2.items() if k.startswith("episodes/")
        }
        assert m1["episodes/turns_max"] >= 2
