"""Errors as JSON ``{code, message}`` with the status ``errors.WIRE_ERRORS`` gives."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..artifacts import ArtifactError
from ..errors import QuotaError, RequestError, StockadeError, to_wire


class TooLarge(RequestError):
    pass


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    async def stockade_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StockadeError)
        if isinstance(exc, TooLarge):
            return error_response(413, "too_large", str(exc))
        status, body = to_wire(exc)
        if isinstance(exc, ArtifactError):
            status, body = 404, {"code": "artifact_error", "message": str(exc)}
        headers = {"Retry-After": str(math.ceil(exc.retry_after))} if isinstance(exc, QuotaError) and exc.retry_after \
            else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}" if where else
                      str(first.get("msg", "invalid request")))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail),
                      dict(exc.headers) if exc.headers else None)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("stockade.server").exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal", "internal server error (logged on the server)")

    app.add_exception_handler(StockadeError, stockade_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
