"""Exceptions for mistakes a user can fix; `main` prints their message as one line, no traceback.

They subclass ValueError so that callers catching ValueError (tests, notebooks, older code)
keep working.
"""


class UserError(ValueError):
    """A bad input the user must change; the message is one sentence naming it and the fix."""


class ConfigError(UserError):
    """A config value a user must change; the message names the field and the fix."""


class BadFileError(UserError):
    """A file that cannot be used as given; the message names the file (and key or record)."""
