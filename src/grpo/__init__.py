"""grpo: Group Relative Policy Optimization for language models."""

import os

# Set before PyTorch's first CPU allocation, which this import may precede: PyTorch then backs every CPU
# tensor of 2 MB or more with transparent huge pages (see grpo.memory). A value already set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from grpo.advantages import group_advantages
from grpo.config import GRPOConfig
from grpo.losses import policy_loss

__all__ = ["GRPOConfig", "group_advantages", "policy_loss"]
__version__ = "0.1.0"
