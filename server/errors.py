"""One error envelope for every failure: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise an `APIError` subclass; one exception handler turns it into the
envelope. Pydantic's 422 becomes a 400 (OpenAI clients expect 400 for any bad
input), and an unknown route or method keeps its status but gets the envelope too.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler import InvalidRequestError

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code or self.status_code
        self.param = param
        self.code = code or self.default_code
        self.headers = headers

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status_code, headers=self.headers)


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = 404
    default_code = "model_not_found"


class RequestTooLargeError(APIError):
    status_code = 413
    default_code = "request_too_large"


class RequestTimeoutError(APIError):
    """The request's `timeout`, or the server's --queue-timeout, passed before it finished."""

    status_code = 408
    error_type = "timeout_error"
    default_code = "request_timeout"


class HeadersTooLargeError(APIError):
    status_code = 431
    default_code = "request_header_fields_too_large"


class QueueFullError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1, code: str | None = None):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, code=code)


class EngineError(APIError):
    """The engine failed this request (a model step raised, or the engine died mid-request)."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable_error"


def from_invalid_request(error: InvalidRequestError) -> BadRequestError:
    return BadRequestError(str(error), param=error.param, code=error.code)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_field(part) -> bool:
    # Pydantic names the member of a union that failed ("str", "list[int]", "function-after[...]")
    # in the location; a client wants the field's path, e.g. "messages.0.role".
    return isinstance(part, int) or (part != "body" and part not in _TYPE_TAGS and "[" not in part)


def _validation_error(error: RequestValidationError) -> BadRequestError:
    errors = error.errors()
    # A union reports every member that failed; one of our own checks (a value error)
    # says more than "Input should be a valid string" from a member the client never meant.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    param = ".".join(str(part) for part in first.get("loc", ()) if _is_field(part)) or None
    if first.get("type") == "json_invalid":
        return BadRequestError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                               code="invalid_json")
    message = first.get("msg", "invalid request")
    return BadRequestError(f"{param}: {message}" if param else message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(_: Request, error: InvalidRequestError) -> JSONResponse:
        return from_invalid_request(error).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = getattr(error, "headers", None)
        return APIError(str(error.detail), headers=headers, status_code=error.status_code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return EngineError(f"internal error: {type(error).__name__}", code="internal_error").response()
