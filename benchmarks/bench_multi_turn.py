"""Generated tokens per second: multi-turn episodes against single-turn sampling, same model and prompts.

Three ways to sample a step's 4 prompts × 8 trajectories from SmolLM2-135M-Instruct (the default model, fused
decoder as in training):

- ``single``: one assistant turn per trajectory, the default backend as `grpo train` runs it;
- ``multi``: episodes of up to ``--turns`` turns through grpo.agents (an environment that answers every turn
  with a short user message), decoded as one batch that keeps each trajectory's cache across turns;
- ``turn-by-turn``: the same episodes sampled as a loop over turns would, each turn a fresh call whose
  prompts are the trajectories so far (prefilled again every turn), for comparison.

Each is timed ``--repeats`` times after a warm-up; the figures are generated (sampled) tokens per second,
medians with their spread. Usage: ``.venv/bin/python benchmarks/bench_multi_turn.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from grpo.accel.fused import fused_decoding
from grpo.agents.rollout import Agent
from grpo.data.tasks import arithmetic
from grpo.models.loading import load_causal_lm, load_tokenizer, resolve_model
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.generate import generate, stop_token_ids, tokenize_prompts


class GoOn:
    """Answers every assistant turn with a short user message: episodes last until max_turns."""

    def reset(self, **row):
        return None

    def step(self, text):
        return "Check it once more and answer again."


def timed(run, repeats: int) -> tuple[list[float], int]:
    run()  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - started)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160, help="a trajectory's whole length")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_causal_lm(path, torch.float32).eval(), load_tokenizer(path)
    backend = DefaultBackend(model, decoder=fused_decoding(model))
    rows = arithmetic("test")[: args.prompts]
    stops = stop_token_ids(model, tokenizer)
    seeds = list(range(args.prompts))
    g = args.generations
    agent = Agent([], GoOn, tokenizer, max_turns=args.turns, tool_timeout=None)  # its step answers

    def single() -> int:
        prompts = [agent.prompt_text(row) for row in rows]
        rollout = generate(model, tokenizer, prompts, num_generations=g,
                           max_completion_length=args.max_tokens, seeds=seeds, backend=backend)  # fmt: skip
        return int(rollout.loss_mask.sum())

    def multi() -> int:
        rollout = agent.sample(backend, rows, num_generations=g, max_completion_length=args.max_tokens,
                               max_prompt_length=10**9, stop_ids=stops, seeds=seeds)  # fmt: skip
        return int(rollout.loss_mask.sum())

    def turn_by_turn() -> int:
        # Each trajectory's text so far is the next turn's prompt, prefilled from scratch.
        texts = [agent.prompt_text(row) for row in rows for _ in range(g)]
        left = [args.max_tokens] * len(texts)
        running, generated = list(range(len(texts))), 0
        answer = agent.continuations.after_turn([{"role": "user", "content": GoOn().step("")}], "<|im_end|>")
        for turn in range(args.turns):
            rollout = generate(model, tokenizer, [texts[i] for i in running], num_generations=1,
                               max_completion_length=max(left[i] for i in running), seeds=running,
                               backend=backend)  # fmt: skip
            ids = tokenize_prompts(tokenizer, [answer], 10**9)[0][0].tolist()
            still = []
            for row, completion, mask, cut in zip(
                running, rollout.completion_ids, rollout.completion_mask, rollout.truncated
            ):
                tokens = completion[mask.bool()].tolist()[: left[row]]
                generated += len(tokens)
                left[row] -= len(tokens) + len(ids)
                texts[row] += tokenizer.decode(tokens) + answer
                if not cut and left[row] > 0 and turn + 1 < args.turns:
                    still.append(row)
            running = still
            if not running:
                break
        return generated

    results = {}
    for name, run in (("single", single), ("multi", multi), ("turn-by-turn", turn_by_turn)):
        times, tokens = timed(run, args.repeats)
        rates = [tokens / t for t in times]
        results[name] = {
            "generated_tokens": tokens,
            "seconds": times,
            "tokens_per_second_median": statistics.median(rates),
            "tokens_per_second_spread": [min(rates), max(rates)],
        }
        print(f"{name:13s} {tokens:5d} tokens  {statistics.median(rates):7.1f} tokens/s  "
              f"(spread {min(rates):.1f}–{max(rates):.1f}; {statistics.median(times):.2f} s)")  # fmt: skip
    single_rate = results["single"]["tokens_per_second_median"]
    for name in ("multi", "turn-by-turn"):
        results[name]["vs_single"] = results[name]["tokens_per_second_median"] / single_rate
        print(f"{name} / single: {results[name]['vs_single']:.2f}×")
    results["settings"] = vars(args) | {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
