"""The gate every request passes before a handler: draining, API key, body size.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed
responses and hide the client's disconnect from the handlers.
"""

import hashlib
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, AuthenticationError, HeadersTooLargeError, RequestTooLargeError, \
    ServiceUnavailableError

# Probes and scrapers must reach these without a key, and /health must answer while draining.
OPEN_PATHS = frozenset({"/health", "/metrics"})
# Header fields in one request, as h11 and Apache allow.
MAX_HEADER_COUNT = 100
# The request line and headers together; nginx allows 32 KiB by default, h11 16 KiB.
MAX_HEAD_BYTES = 64 * 1024


class RequestGate:
    def __init__(self, app: ASGIApp, serving):
        self.app = app
        self.serving = serving
        # Digest of each accepted `Authorization` value -> the tenant its key belongs to (None:
        # the server's own --api-key, which names no tenant).
        keys = {serving.settings.api_key: None} if serving.settings.api_key else {}
        keys.update(serving.settings.tenants.by_api_key())
        self._key_digests = {_digest(f"Bearer {key}".encode()): tenant for key, tenant in keys.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = _head_too_large(scope)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        error = self._refuse(scope)
        if error is None:
            body, error = await self._read_body(scope, receive)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _refuse(self, scope: Scope) -> APIError | None:
        if self.serving.engine.draining:
            return ServiceUnavailableError("the server is shutting down", code="draining")
        if self._key_digests:
            given = _digest(dict(scope["headers"]).get(b"authorization", b""))
            # Digests of equal length, each compared in constant time and all of them always:
            # neither a key, nor its length, nor which one matched leaks through timing.
            matches = [tenant for digest, tenant in self._key_digests.items() if hmac.compare_digest(given, digest)]
            if not matches:
                return AuthenticationError("a valid API key is required: Authorization: Bearer <key>")
            scope.setdefault("state", {})["tenant"] = matches[0]
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, APIError | None]:
        limit = self.serving.settings.max_body_bytes
        too_large = RequestTooLargeError(f"the request body is larger than {limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None  # disconnected before the body arrived: the handler finds out
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _head_too_large(scope: Scope) -> APIError | None:
    # A head that arrives in pieces is bounded by the protocol already (server/runner.py);
    # one that arrives whole is parsed at any size, so its size is checked here.
    headers = scope["headers"]
    if len(headers) > MAX_HEADER_COUNT:
        return HeadersTooLargeError(f"the request has {len(headers)} header fields; at most {MAX_HEADER_COUNT} "
                                    "are allowed")
    num_bytes = sum(len(name) + len(value) + 4 for name, value in headers)
    if num_bytes > MAX_HEAD_BYTES:
        return HeadersTooLargeError(f"the request's headers are larger than {MAX_HEAD_BYTES} bytes")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the already-read body to the app once, then pass through (to see the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
