"""The one exception type the CLI turns into a one-line message and exit code 2."""


class TwmlError(ValueError):
    """Bad input from the user: an unknown name, a value out of range, a missing run,
    a file of the wrong kind. The message names the value and what is allowed."""
