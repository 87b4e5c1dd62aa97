"""Errors a person can act on. Every layer raises these; the step runner turns them into a failed step with the
message as the last line of the task log (exit code 2), never a traceback."""


class StepError(RuntimeError):
    """A step failed for a reason a person can act on; the message says what and where."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""
