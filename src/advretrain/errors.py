"""User-facing errors: one line that names the culprit and the fix.

The CLI prints `error: <message>` and exits with status 2 for these; any other exception is a bug and keeps
its traceback.
"""


class AdvretrainError(Exception):
    """Bad input or environment that the user can fix; the message says what and how."""


class DataError(AdvretrainError):
    """A dataset is missing, malformed or inconsistent."""


class ConfigError(AdvretrainError):
    """A config key or value is invalid."""


class CheckpointError(AdvretrainError):
    """A checkpoint is missing, unreadable or does not fit the request."""


def printable(text: str) -> str:
    """`text` with control characters escaped (a newline as \\n): a name from a file or a folder can never split
    the one-line error it appears in."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
