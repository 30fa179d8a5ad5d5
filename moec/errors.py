"""The one error type users see: a one-line message, printed by the CLI with a non-zero exit."""


class MoecError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def error_chain(error: BaseException):
    """The error, then what caused it, and so on (libraries such as torch.onnx wrap what they call)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
