"""The one exception type gazelle raises for problems a user can fix."""


class GazelleError(Exception):
    """A user-facing error: one line that names the field, row or file and says what to do.

    The CLI prints it as ``error: <message>`` without a traceback.
    """
