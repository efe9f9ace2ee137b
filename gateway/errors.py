"""One exception hierarchy for every error a client can see, rendered once (in middleware).

Each error carries its HTTP status, OpenAI `type` and `code`; `openai_body`,
`anthropic_body` and `ollama_body` shape it for the route family that is answering.
"""

from __future__ import annotations

from typing import Any

# The request key a route sets when its errors take another family's shape than its path says
# (POST /api/pull with Ollama's body): read by app.error_middleware.
ERROR_SHAPE = "mlxgw.error_shape"


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        kinds = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            503: "overloaded_error",
        }
        return {"type": "error", "error": {"type": kinds.get(self.status, "api_error"),
                                           "message": self.message}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class TooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class InsufficientStorage(GatewayError):
    status = 507
    code = "insufficient_storage"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalError(GatewayError):
    status = 500
    code = "internal_error"


class WorkerDied(GatewayError):
    status = 502
    code = "worker_died"


class Unavailable(GatewayError):
    status = 503
    code = "unavailable"


class LoadFailed(Unavailable):
    code = "model_load_failed"


class TimedOut(Unavailable):
    code = "timeout"


class ClientTooSlow(GatewayError):
    """The request's reader fell too far behind its worker's output (a stalled client)."""
    status = 408
    type = "timeout_error"
    code = "client_too_slow"


# Worker protocol error codes -> the error class the client sees.
WORKER_ERRORS: dict[str, type[GatewayError]] = {
    "invalid_request": BadRequest,
    "unsupported": BadRequest,
    "context_length_exceeded": ContextLengthExceeded,
    "not_found": NotFound,
    "conflict": Conflict,
    "overloaded": QueueFull,
    "load_failed": LoadFailed,
    "internal": InternalError,
    "client_too_slow": ClientTooSlow,  # set by the gateway's WorkerHandle, not the worker
}


def from_worker(code: str, message: str) -> GatewayError:
    cls = WORKER_ERRORS.get(code, InternalError)
    return cls(message, code=code if cls is BadRequest else None)
