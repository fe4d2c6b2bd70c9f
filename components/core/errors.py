"""The user-facing error type: every step raises it for problems with input or setup."""


class ZhclipError(Exception):
    """A problem with the user's input or setup; the CLI prints it without a traceback."""
