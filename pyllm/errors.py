"""The one exception type for problems a user can cause.

Its message is a single line that names the problem; the CLI prints it without a
traceback and the server maps it to a 4xx response.
"""


class PyllmError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, context full."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
