"""Exceptions that mean "the user asked for something that cannot work".

The CLI turns every `VaelensError` into one message and exit status 2; any other
exception is a bug and keeps its traceback.
"""


class VaelensError(Exception):
    """A user-facing error: bad input, bad configuration, a missing or corrupt file."""


class ConfigError(VaelensError, ValueError):
    """A configuration value or file is invalid."""


class DataError(VaelensError, ValueError):
    """Input data is missing, malformed, or unsuitable for the model."""


class CheckpointError(VaelensError):
    """A run directory or one of its files is missing, corrupt or incompatible."""


class TrainingDiverged(VaelensError):
    """The loss or a gradient became non-finite during training."""


class OutputError(VaelensError):
    """An output file or folder cannot be written: it exists, or its place is read-only or not a folder."""
