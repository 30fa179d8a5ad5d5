"""The one error type users see: a one-line message, printed by the CLI with a non-zero exit."""


class MoecError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class Unsupported(MoecError):
    """A model whose kind moec cannot compile yet. `reason` is one of REASONS, a code that stays the
    same when a transformers release changes what the message says:

        cache      the model caches something beyond keys, values and one conv and recurrent state
        attention  its attention computes a rule moec has no exportable form of
        experts    its experts compute something moec's experts op does not express
        export     torch.onnx cannot export its code
    """

    REASONS = ("cache", "attention", "experts", "export")

    def __init__(self, model_type: str, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{model_type}: {message}")
        self.model_type, self.reason = model_type, reason


def error_chain(error: BaseException):
    """The error, then what caused it, and so on (libraries such as torch.onnx wrap what they call)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
