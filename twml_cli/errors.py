"""The one exception type the CLI turns into a one-line message and exit code 2, and how to
tell a Ctrl-C that a library turned into an error of its own."""


class TwmlError(ValueError):
    """Bad input from the user: an unknown name, a value out of range, a missing run,
    a file of the wrong kind. The message names the value and what is allowed."""


def interrupted(err: BaseException) -> bool:
    """Whether `err` is a Ctrl-C (KeyboardInterrupt) or an error raised while one unwound:
    interrupted inside its commit, SQLAlchemy fails an assertion of its own, which MLflow's
    store raises as an MlflowException. Either way the user asked to stop."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
