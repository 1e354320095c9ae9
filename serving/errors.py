"""Client mistakes as exceptions the routes map to status codes, each naming field, value and limit.

Services raise these (they import no FastAPI); ``serving.app`` turns each into its status code and a
JSON body ``{"error": {"type", "message", "field", "value", "limit"}}``. Anything else is a bug and
answers 500 without a stack trace.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """A request the service cannot serve as asked; ``status`` is the HTTP code."""

    status = 400
    type = "invalid_request"

    def __init__(self, message: str, field: str | None = None, value: Any = None, limit: Any = None) -> None:
        super().__init__(message)
        self.message, self.field, self.value, self.limit = message, field, value, limit

    def body(self) -> dict[str, Any]:
        return error_body(self)


def error_body(error: Exception) -> dict[str, Any]:
    """``{"error": {"type", "message", "field", "value", "limit"}}`` of a :class:`ClientError` or a
    :class:`mixllm.errors.InputError` (the library's twin: the same attributes), without the unset ones."""
    body = {"type": error.type, "message": str(error)}
    for key in ("field", "value", "limit"):
        if getattr(error, key, None) is not None:
            body[key] = getattr(error, key)
    return {"error": body}


class NotFound(ClientError):
    """An item, user or model id the service does not hold."""

    status = 404
    type = "not_found"


class Invalid(ClientError):
    """A well-formed request whose content breaks a rule (duplicates, sizes, widths)."""

    status = 422
    type = "invalid_value"


class NotReady(ClientError):
    """Models are still loading; retry shortly."""

    status = 503
    type = "not_ready"


class Unavailable(ClientError):
    """The route's model is not loaded in this service (a setting, not a moment: no Retry-After)."""

    status = 503
    type = "model_unavailable"
