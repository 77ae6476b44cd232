"""One exception type for every failure the user can act on.

The CLI prints ``str(error)`` as a single line and exits with ``error.code``;
library users catch :class:`TapsError` like any other exception.
"""


class TapsError(Exception):
    """A failure with a one-line explanation and its fix (exit code 1)."""

    code = 1


class UsageError(TapsError):
    """Bad names, options or paths given by the user (exit code 2)."""

    code = 2


def choose(kind: str, value: str, valid) -> None:
    """Raise a UsageError listing the valid choices when ``value`` is not one of them."""
    valid = list(valid)
    if value not in valid:
        raise UsageError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
