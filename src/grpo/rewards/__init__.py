"""The reward library: rule-based rewards, sandboxed code, learned reward models, LLM judges, step-level
(process) rewards, and users' own functions with TRL's signature. See :mod:`grpo.rewards.core` for how a
reward is named in a config, called and checked, and docs/rewards.md for every kind."""

from grpo.rewards.core import (
    BUILTIN_KINDS,
    FAILURE_POLICIES,
    Reward,
    RewardFunc,
    RewardSpec,
    Scores,
    build_rewards,
    call_reward,
    completion_text,
    load_reward_func,
    requires_columns,
    score,
    score_groups,
    weighted_sum,
)
from grpo.rewards.math_answers import answers_match, extract_answer
from grpo.rewards.rules import accuracy_reward, format_reward

__all__ = [
    "BUILTIN_KINDS",
    "FAILURE_POLICIES",
    "Reward",
    "RewardFunc",
    "RewardSpec",
    "Scores",
    "accuracy_reward",
    "answers_match",
    "build_rewards",
    "call_reward",
    "completion_text",
    "extract_answer",
    "format_reward",
    "load_reward_func",
    "requires_columns",
    "score",
    "score_groups",
    "weighted_sum",
]
