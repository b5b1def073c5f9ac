"""User-facing errors.

Every error caused by bad input (config, data, CLI, checkpoint) is a `PolycomError`: its message is one
line that names the culprit and what would be valid. The CLI prints it as `error: <message>` and exits
with status 2; tracebacks are for bugs, not for users.
"""


class PolycomError(Exception):
    """Base class of errors caused by user input."""

    exit_status = 2  # what `polycom-lm` exits with after printing the message


class ConfigError(PolycomError, ValueError):
    """A config file, key, value or override is invalid."""


class DataError(PolycomError, ValueError):
    """A data source, tokenizer or shard folder is invalid."""


class CheckpointError(PolycomError, ValueError):
    """A checkpoint is missing, corrupt or incompatible."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name when it has none: what a
    one-line error quotes of a lower-level failure."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
