"""The one exception type for problems a user can cause.

Its message is a single line that names the problem; the CLI prints it without a
traceback and the server maps it to a 4xx response.
"""


class PyllmError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, context full."""
