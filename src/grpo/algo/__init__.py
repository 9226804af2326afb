"""The algorithm's math: advantages, losses, token log-probs. Pure torch; imports nothing else of grpo."""
