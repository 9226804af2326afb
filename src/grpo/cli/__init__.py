"""The `grpo` command and the recipes behind it."""
