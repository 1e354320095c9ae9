"""Errors a user can cause and fix. The CLI prints their message, never a traceback."""


class MixLLMError(Exception):
    """Base class for errors whose message tells the user what was wrong and what to do."""


class AssetError(MixLLMError):
    """A packaged asset could not be fetched, verified or found."""


class DataError(MixLLMError):
    """Input data (a user's dataset, a request) is malformed; the message names file, column, row or field."""
