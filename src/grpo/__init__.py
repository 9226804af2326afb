"""grpo: Group Relative Policy Optimization for language models."""

from grpo.advantages import group_advantages
from grpo.config import GRPOConfig
from grpo.losses import policy_loss

__all__ = ["GRPOConfig", "group_advantages", "policy_loss"]
__version__ = "0.1.0"
