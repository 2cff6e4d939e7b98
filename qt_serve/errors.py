"""The one exception type a user sees: it says what was wrong and what to do.

CLIs catch `QtError` and print its message (no traceback); library callers can
catch it to tell user mistakes apart from bugs.
"""


class QtError(Exception):
    """A problem with the user's input (a path, a file, a flag), not a bug in qt."""


def read_json(path, missing=None):
    """The JSON in `path`; `missing` when there is no such file; a QtError when it is not valid JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return missing
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
