"""The one exception type the command line turns into a single line on stderr and exit status 2."""


class UsageError(Exception):
    """Bad input from the user: a missing file, a wrong schema, an unknown name, a trace too short.

    Raise it with a message that says what is wrong and, where possible, what to do instead.
    """
