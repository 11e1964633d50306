"""The one exception type a user can cause and must read."""


class StudioError(Exception):
    """A problem the user can fix, described in one sentence: what is wrong and what to do.

    The UI shows ``str(error)`` as it is and the CLI prints it without a traceback, so the
    message must stand on its own.
    """
