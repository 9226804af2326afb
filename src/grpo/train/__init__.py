"""One trainer per stage: GRPO (grpo), PPO (ppo), SFT (sft), DPO (dpo), a reward model (reward_model).

GRPO and PPO are built from the same parts (parts): sampling and scoring a step's groups (rollouts), the
guarded optimizer update (update), the loop with its logs, checkpoints and signals (loop) and the step's
metrics (step_metrics); distributed and sharding run them on several processes.
"""
