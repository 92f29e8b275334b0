"""The FastAPI application: one factory, so tests can hand it a fake store.

Every refusal, whatever raised it (the model's checks, the store's constraints,
pydantic's request parsing, the token check, a wait that timed out), is answered
with the same body, ``{"detail": {"field": ..., "reason": ...}}``, so the CLI and
scripts have one thing to read.

A 5xx answer never carries exception text (it could name files, addresses or
the store's internals): it says what failed in general terms and gives a request
id, which is logged with the traceback, so an operator can find the cause.
``/healthz`` and the OpenAPI document (``/openapi.json``, ``/docs``) need no token;
everything under ``/v1`` does (routes.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from portmesh.api.progress import AGENT_LEASE, AGENT_SILENCE
from portmesh.api.routes import router
from portmesh.api.service import Service, StoreAPI, WaitTimeout
from portmesh.model.errors import Conflict, InvalidInput, ModelError, NotFound

log = logging.getLogger(__name__)

STATUS_OF: dict[type[ModelError], int] = {InvalidInput: 422, NotFound: 404, Conflict: 409}


def error(code: int, field: str | None, reason: str, **extra: object) -> JSONResponse:
    """A refusal in the API's one error shape."""
    return JSONResponse(status_code=code, content={"detail": {"field": field, "reason": reason}, **extra})


def _loc_to_field(loc: tuple[int | str, ...] | list[int | str]) -> str:
    # ("body", "ports", 0, "port") -> "ports[0].port"; ("query", "wait") -> "wait"
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


async def _model_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelError)
    status = next((code for cls, code in STATUS_OF.items() if isinstance(exc, cls)), 422)
    return error(status, exc.field, exc.reason)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _loc_to_field(tuple(first.get("loc", ())))
    # Keep pydantic's full list too (without "input"/"ctx", which may echo secrets or be unserialisable).
    listing = [{"field": _loc_to_field(tuple(e.get("loc", ()))), "reason": str(e.get("msg", ""))} for e in errors]
    return error(422, field, str(first.get("msg", "invalid request")), errors=listing)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, dict) else {"field": None, "reason": str(exc.detail)}
    content = {"detail": detail}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return JSONResponse(status_code=exc.status_code, content=content, headers=headers)


async def _wait_timeout(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WaitTimeout)
    return error(504, "wait", str(exc), generation=exc.generation, status=exc.status.model_dump())


def request_id() -> str:
    """A short id naming one failed request in the answer and in the log."""
    return uuid.uuid4().hex[:16]


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id()
    log.warning("request %s %s %s: state store unavailable: %s", rid, request.method, request.url.path, exc)
    return error(503, "store", f"the state store is unavailable; retry later (request id {rid})", request_id=rid)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id()
    log.error("request %s %s %s failed", rid, request.method, request.url.path, exc_info=exc)
    return error(500, None, f"internal error (request id {rid}; the API's log has the details)", request_id=rid)


def create_app(
    store: StoreAPI,
    token: str,
    *,
    wait_timeout: float = 30.0,
    agent_silence: float = AGENT_SILENCE,
    agent_lease: float = AGENT_LEASE,
    unavailable: tuple[type[Exception], ...] = (),
    log_dirs: Sequence[str] = (),
) -> FastAPI:
    """The API over ``store``; mutating calls need ``Authorization: Bearer <token>``.

    ``unavailable`` lists the store's "could not reach it / commit timed out" errors,
    answered 503 (retry later) rather than 500; passed in so this module needs no store import.
    ``log_dirs`` adds directories (besides :data:`portmesh.api.logs.LOG_DIRS`) whose ``*.log``
    files the logs endpoint may read. ``agent_silence``: seconds an agent may stay behind without
    progress before it counts as down; ``agent_lease``: seconds without a heartbeat before an agent counts
    as dead, and an eBPF host as down (progress.py). The network config is the store's (``state.config``).
    """
    if not token:
        raise ValueError("an API token is required")
    service = Service(store, None, wait_timeout, agent_silence, agent_lease)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.attach(asyncio.get_running_loop())
        try:
            yield
        finally:
            service.detach()

    app = FastAPI(
        title="portmesh",
        version="1",
        summary="Standard ports on shared public IPs for containers: no NAT, no proxy.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.token = token
    app.state.log_dirs = tuple(log_dirs)
    app.include_router(router)

    @app.get("/healthz", tags=["status"])
    async def healthz() -> dict[str, str]:
        """Liveness for load balancers and supervisors: open, and says nothing about the state."""
        return {"status": "ok"}

    for cls in (ModelError, InvalidInput, NotFound, Conflict):
        app.add_exception_handler(cls, _model_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(WaitTimeout, _wait_timeout)
    for down in unavailable:
        app.add_exception_handler(down, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
    return app
