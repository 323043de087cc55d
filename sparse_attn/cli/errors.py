"""The one exception the jobs raise for a user's mistake: :func:`sparse_attn.cli.main.main`
prints its message as one line and exits non-zero, without a traceback."""


class CliError(Exception):
    """A problem with the user's input (a missing folder, a bad option, an unreadable file)."""
