"""Prompt datasets, built-in tasks, SFT rows, preference pairs, and the data shipped with grpo."""
