"""An environment for `grpo train --environment examples/agents/guess_number.py:GuessNumber`: the model guesses
a secret number from 1 to 100 and hears "higher" or "lower" after each guess.

grpo makes one instance per trajectory, without arguments. ``reset`` gets the dataset row's columns (here
``secret``) and returns the first observation; ``step`` answers every assistant turn that calls no tool,
and None ends the episode. Public methods (``hint``) are tools the model may call.
"""

from __future__ import annotations

import re


class GuessNumber:
    def reset(self, secret: int, **row) -> str:
        self.secret, self.guesses, self.solved = int(secret), 0, False
        return "I am thinking of a number from 1 to 100. Answer with one number."

    def step(self, text: str) -> str | None:
        numbers = re.findall(r"-?\d+", text)
        if not numbers:
            return "Answer with one number."
        self.guesses += 1
        guess = int(numbers[-1])
        if guess == self.secret:
            self.solved = True
            return None
        return "Higher." if guess < self.secret else "Lower."

    def hint(self) -> str:
        """Whether the secret number is even."""
        return "even" if self.secret % 2 == 0 else "odd"
