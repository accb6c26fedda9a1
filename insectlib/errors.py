"""The one exception type a user is meant to read."""


class InsectError(Exception):
    """A problem with the user's input or environment, worded so they can act on it.

    The CLI prints the message and exits non-zero without a traceback; anything else
    escaping is a bug in insect.
    """
