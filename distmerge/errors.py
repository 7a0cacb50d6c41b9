"""The one exception type for problems a user can fix (bad recipe, bad input, bad output dir)."""


class MergeError(Exception):
    """A problem with the user's input or environment: the CLI prints it without a traceback
    (``error: <message>``, exit 2). Any other exception is a bug: ``cli.main`` prints one
    ``internal error`` line, keeps the traceback in a log file and exits 3.

    The message is one line that says what is wrong, where (file, key, line), and how to fix it.
    """


class Stopped(Exception):
    """The run was stopped by Ctrl-C or a signal (SIGTERM: what Slurm sends at the time
    limit). The message says what was kept and how to resume; ``exit_code`` is 128 + the
    signal's number, as a shell reports a process killed by it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
