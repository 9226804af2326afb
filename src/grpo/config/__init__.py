"""The settings of every stage, one documented dataclass each; reading YAML and flags; validation.

``grpo`` (`grpo train`) and ``stages`` (sft, reward-model, dpo) declare the settings, built from the shared
field groups of ``groups``; ``values`` says how pydantic reads a value; ``loading`` merges the defaults, a
YAML file and flags; ``checks`` holds the checks every ``validate`` makes. Nothing here needs more of grpo
than its errors.
"""
