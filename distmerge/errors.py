"""The one exception type for problems a user can fix (bad recipe, bad input, bad output dir)."""


class MergeError(Exception):
    """A problem with the user's input or environment: the CLI prints it without a traceback
    (``error: <message>``, exit 2). Any other exception is a bug: ``cli.main`` prints one
    ``internal error`` line, keeps the traceback in a log file and exits 3.

    The message is one line that says what is wrong, where (file, key, line), and how to fix it.
    """
