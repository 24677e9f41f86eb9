"""Errors every layer may raise. The command line turns `UsageError` into one line and exit code 2;
the library never prints or exits on its own."""


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a model directory): one line, exit code 2."""
