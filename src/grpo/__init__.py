"""grpo: Group Relative Policy Optimization for language models."""

from grpo.algo.advantages import group_advantages
from grpo.algo.losses import policy_loss
from grpo.config.grpo import GRPOConfig

__all__ = ["GRPOConfig", "group_advantages", "policy_loss"]
__version__ = "0.1.0"
