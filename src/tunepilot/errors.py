"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """Bad user input (config, data, paths, impossible requests).

    The CLI prints ``error: <message>`` on one line per problem and exits with code 2, never a
    traceback. The message names the file and line or field, and says what to do.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def __reduce__(self) -> tuple:
        # rebuilt from every problem (a distributed run hands rank 0's errors to the others)
        return (type(self), tuple(self.problems))


class RunError(Exception):
    """Training started but cannot go on (a broken setup detected mid-run, unrecoverable
    numerics). The CLI prints ``error: <diagnosis>`` and exits with code 3."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written. ``exit_code`` is 143 or 130."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (planning, loading, evaluating): stop as Ctrl-C does.
    A KeyboardInterrupt so that no ``except Exception`` on the way swallows it."""
