"""The one error type users see: a one-line message, printed by the CLI with a non-zero exit."""


class MoecError(Exception):
    """A problem with the user's input or environment, stated in one line."""
