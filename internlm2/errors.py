"""The project's one rule for telling a user's mistake from a bug.

A `UserError` is a problem with what the user gave: a config key, a parallel layout, a missing or corrupt
file, a malformed data record. Its message names the problem and where it is (key, file, line), and the
CLI prints it as one line, `internlm2 <command>: error: <message>`, and exits with status 2. Anything else
that escapes a command is a bug and keeps its traceback. Each area has its own subclass, so callers can
catch what they handle; all of them are also `ValueError`s, as Python code expects of bad arguments.
"""


class UserError(ValueError):
    """Bad input from the user; the message says what and where."""


class ConfigError(UserError):
    """A configuration problem; the message starts with the dotted key or the file it concerns."""


class CheckpointError(UserError):
    """A checkpoint (training or HF) that is missing, incomplete, corrupt or does not fit the model."""
