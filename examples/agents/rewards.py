"""Rewards for the examples. A reward function gets TRL's arguments; in a run with tools or an environment,
``completions`` are each trajectory's messages after the prompt and ``environments`` the trajectories'
environment instances, so a reward can read where an episode ended."""


def found_it(prompts, completions, environments, **columns):
    """1 for finding the number, less the more guesses it took; 0 for not finding it."""
    return [max(0.1, 1.0 - 0.1 * (env.guesses - 1)) if env.solved else 0.0 for env in environments]


def used_a_tool(prompts, completions, **columns):
    """1 when the trajectory called a tool at least once."""
    return [float(any(message["role"] == "tool" for message in messages)) for messages in completions]
