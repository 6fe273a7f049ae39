"""The one exception type the engine raises for bad input: its message is one line
that names the file, tensor or setting at fault, fit to show a user as it is."""


class EngineError(Exception):
    """A user-facing, one-line error."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
