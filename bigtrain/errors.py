"""Errors that reach the user as one clear paragraph instead of a traceback."""


class BigtrainError(Exception):
    """A problem the user can fix (bad config, missing file, unsupported combination).

    The launcher prints the message alone and exits with status 2.
    """


class ConfigError(BigtrainError):
    """An invalid configuration: the message names the key, the value and what is allowed."""


class DataError(BigtrainError):
    """Missing, empty or malformed training data."""


class CheckpointError(BigtrainError):
    """A checkpoint that cannot be read or does not match the run."""


class TrainingError(BigtrainError):
    """Training cannot go on (for example a non-finite loss)."""


class RunDirError(BigtrainError):
    """A run.dir that cannot be used: not writable, too long, a file, or held by another run."""


class UsageError(BigtrainError):
    """A command-line argument that cannot be used: the message names the option and what is allowed."""


class GenerationError(BigtrainError):
    """A generation request that cannot be served (a family without generation, contradictory decoding options,
    a prompt or output longer than the model's positions)."""
