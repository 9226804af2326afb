"""Errors the CLI reports as one line instead of a traceback.

:class:`GRPOError` and its subclasses are caused by the user's input and exit with code 2; a run that stops
for another reason it can explain (divergence, a signal) has its own exit code.
"""

from __future__ import annotations


class GRPOError(Exception):
    """Bad input: a config value, a dataset row, a model directory, a reward function's output."""

    exit_code = 2


class ConfigError(GRPOError):
    """A setting that cannot work, named with where it came from."""


class DataError(GRPOError):
    """A dataset file or row that cannot be used, named with its file and row number."""


class ModelError(GRPOError):
    """A model or tokenizer that cannot be loaded or used."""


class RewardError(GRPOError):
    """A reward function that failed or returned something unusable."""


class CheckpointError(GRPOError):
    """A checkpoint that is missing, incomplete, damaged, pickled, or from a different kind of run."""


class RunFilesError(GRPOError):
    """A run directory that does not exist or holds none of a run's files (for `grpo report`)."""


class RunFailed(GRPOError):
    """A run that cannot go on for a reason it can explain: it diverged, or ran out of memory."""

    exit_code = 1


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal_number
