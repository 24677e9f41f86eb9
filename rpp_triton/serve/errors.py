"""What can go wrong with a request, and the one table that turns each kind into an HTTP answer.

Code anywhere in the server raises `ServeError(message, Kind.X)` (or a subclass that fixes its
kind); only `error_response` looks up the status. A client always gets
`{"error": {"type": kind, "message": message}}`; 429 and 503 come with `Retry-After`. Messages
never carry exception text from inside the server: an unexpected failure is "internal error".
"""

from __future__ import annotations

from enum import Enum

from starlette.responses import JSONResponse


class Kind(str, Enum):
    MALFORMED_JSON = "malformed_json"
    NOT_FOUND = "not_found"
    ROUTE_NOT_SUPPORTED = "route_not_supported"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    READ_TIMEOUT = "read_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_INPUTS = "too_many_inputs"
    HEADERS_TOO_LARGE = "headers_too_large"
    INPUT_TOO_LONG = "input_too_long"
    INVALID_REQUEST = "invalid_request"
    EMPTY_INPUTS = "empty_inputs"
    EMPTY_INPUT = "empty_input"
    INVALID_TEXT = "invalid_text"
    OVERLOADED = "overloaded"
    CLIENT_CLOSED = "client_closed"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"


# The one table: error kind -> HTTP status.
STATUS = {
    Kind.MALFORMED_JSON: 400,
    Kind.NOT_FOUND: 404,
    Kind.ROUTE_NOT_SUPPORTED: 404,
    Kind.METHOD_NOT_ALLOWED: 405,
    Kind.READ_TIMEOUT: 408,
    Kind.PAYLOAD_TOO_LARGE: 413,
    Kind.TOO_MANY_INPUTS: 413,
    Kind.INPUT_TOO_LONG: 413,
    Kind.HEADERS_TOO_LARGE: 431,
    Kind.INVALID_REQUEST: 422,
    Kind.EMPTY_INPUTS: 422,
    Kind.EMPTY_INPUT: 422,
    Kind.INVALID_TEXT: 422,
    Kind.OVERLOADED: 429,
    Kind.CLIENT_CLOSED: 499,  # nobody reads it; it labels the request in /metrics
    Kind.INTERNAL: 500,
    Kind.UNAVAILABLE: 503,
    Kind.TIMEOUT: 503,
}
RETRY_AFTER_S = 1  # sent with 429 and 503: both pass by themselves


class ServeError(Exception):
    """A request failed for a reason the client is told about."""

    kind = Kind.INTERNAL

    def __init__(self, message: str, kind: Kind | None = None):
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


def error_response(kind: Kind, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON answer to an error of `kind` (with `headers` added, e.g. a 405's Allow)."""
    status = STATUS[kind]
    retry = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
    body = {"error": {"type": kind.value, "message": message}}
    return JSONResponse(body, status_code=status, headers={**retry, **(headers or {})})
