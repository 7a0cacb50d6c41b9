"""The one exception type for problems a user can fix (bad recipe, bad input, bad output dir)."""


class MergeError(Exception):
    """A problem with the user's input or environment: the CLI prints it without a traceback.

    The message says what is wrong, where, and how to fix it.
    """
