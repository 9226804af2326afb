"""Errors caused by the user's input. The CLI prints them as one line and exits with code 2."""


class GRPOError(Exception):
    """Bad input: a config value, a dataset row, a model directory, a reward function's output."""


class ConfigError(GRPOError):
    """A setting that cannot work, named with where it came from."""


class DataError(GRPOError):
    """A dataset file or row that cannot be used, named with its file and row number."""


class ModelError(GRPOError):
    """A model or tokenizer that cannot be loaded or used."""


class RewardError(GRPOError):
    """A reward function that failed or returned something unusable."""
