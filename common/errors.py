"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a setting): say what and how to fix it."""
