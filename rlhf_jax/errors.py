"""The error a user can fix: bad config, bad data, stages run out of order.

``UserError`` marks a mistake in what the user gave (a config field, a data file, a checkpoint
directory, the order of commands), as opposed to a bug in the library. Its message is complete on
its own: it names the field, file or stage, what was expected, and how to fix it. The CLI prints it
as one line, without a traceback (``--verbose`` shows the traceback too).
"""


class UserError(Exception):
    """A mistake in the user's input; the message names it and says how to fix it."""


class ConfigError(UserError, ValueError):
    """An invalid config field, or an override that names no field."""


class StageError(UserError):
    """A stage that must run first has not run or not finished, or a stage's inputs disagree."""
