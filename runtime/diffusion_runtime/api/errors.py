"""HTTP errors: `Rejected` (an answer other than success, with its status), the OpenAI error body,
and the mapping from the engine's refusals (`engine.errors`) to statuses."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from diffusion_runtime.api.protocol import ErrorDetail, ErrorResponse
from diffusion_runtime.engine.errors import EngineError, InvalidInput, QueueFull, Unavailable


class Rejected(Exception):
    """An answer other than success, decided before or instead of running: status + one-line reason."""

    def __init__(self, status: int, message: str, retry_after: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.param = param

    @classmethod
    def of(cls, e: EngineError) -> Rejected:
        """The answer to an engine refusal: 400 invalid input, 503 not accepting, 429 queue full."""
        if isinstance(e, InvalidInput):
            return cls(400, e.message, param=e.param)
        if isinstance(e, Unavailable):
            return cls(503, e.message, retry_after=e.retry_after)
        if isinstance(e, QueueFull):
            return cls(429, e.message, retry_after=e.retry_after)
        return cls(500, e.message)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.retry_after, self.param)


def error_detail(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorDetail:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return ErrorDetail(message=message, type=kind, param=param, code=code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=error_detail(status, message, param, code)).model_dump()


def error_response(
    status: int,
    message: str,
    retry_after: int | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """pydantic/FastAPI errors -> one line naming the fields, and the first field."""
    parts, first = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or (loc or None)
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body ({err.get('ctx', {}).get('error', 'invalid JSON')})")
        elif err.get("type") == "missing" and not loc:
            parts.append("request body is required (JSON object)")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first
