"""Errors a user can cause and fix. The CLI prints their message, never a traceback."""


class MixLLMError(Exception):
    """Base class for errors whose message tells the user what was wrong and what to do."""


class AssetError(MixLLMError):
    """A packaged asset could not be fetched, verified or found."""


class DataError(MixLLMError):
    """Input data (a user's dataset, a request) is malformed; the message names file, column, row or field."""


class InputError(DataError):
    """One input of a request is wrong: the error names the ``field``, the ``value`` given and the ``limit``
    broken (when there is one), and carries the HTTP ``status`` a service answers with."""

    status = 422
    type = "invalid_value"

    def __init__(self, message: str, field: str | None = None, value=None, limit=None) -> None:
        super().__init__(message)
        self.field, self.value, self.limit = field, value, limit
