"""The one exception type a user sees: it says what was wrong and what to do.

CLIs catch `QtError` and print its message (no traceback); library callers can
catch it to tell user mistakes apart from bugs.
"""


class QtError(Exception):
    """A problem with the user's input (a path, a file, a flag), not a bug in qt."""
