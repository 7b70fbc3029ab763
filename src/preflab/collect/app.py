"""The app factory: `create_app(project)` builds the FastAPI app of one collection project.

Beyond the routers it adds what every request needs: a body-size limit (413), JSON errors for every failure
(a 4xx names what was wrong; an unexpected error is a JSON 500 that logs its traceback) and security headers
(no framing, a content-security policy allowing only this server's scripts), in one plain ASGI middleware.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from preflab.collect.db import open_database
from preflab.collect.project import Project
from preflab.collect.routes import admin, authored, lesson, pages, pairs, votes

HERE = Path(__file__).parent
MAX_BODY = 64 * 1024  # bytes: a vote or an authored comparison is far smaller
# A request's dependencies and its handler run in separate worker-thread calls, and a SQLite transaction holds
# the process's writer lock from its begin to its commit. With no free worker thread, a request holding the lock
# could never reach its commit (found by bench/collect_soak.py: 50 clients against 40 threads stalled). So the
# pool is larger than the server's concurrency limit (`preflab collect serve` passes MAX_CONCURRENT to uvicorn,
# which answers 503 beyond it): a lock holder always finds a thread.
MAX_CONCURRENT = 200
WORKER_THREADS = MAX_CONCURRENT + 56
log = logging.getLogger("preflab.collect")


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
CSP = (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'")


class Guard:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 (by Content-Length up front, or while
    a chunked body is read), and add security headers to every response (FastAPI's own /docs pages load
    their scripts from elsewhere, so they get no content-security policy)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        try:
            too_big = length is not None and int(length) > self.limit
        except ValueError:
            too_big = True
        if too_big:
            return await _too_large(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a chunked body with no Content-Length: stop reading it
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        headers = SECURITY_HEADERS + ([] if scope["path"] in ("/docs", "/redoc") else [CSP])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + headers}
            await send(message)

        await self.app(scope, limited, send_with_headers)


async def _too_large(send, limit: int) -> None:
    body = f'{{"detail":"request body over {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield


def create_app(project: Project, sessions=None) -> FastAPI:
    """The app for `project`; `sessions` (a sessionmaker) defaults to the project's database, migrated."""
    app = FastAPI(
        title="preflab collect",
        version="1",
        lifespan=lifespan,
        description="Pairwise comparisons: GET /api/next, POST /api/votes, GET /api/votes, GET /api/stats. "
        "Authenticate with `Authorization: Bearer TOKEN` (from `preflab collect annotator`).",
    )
    if sessions is None:
        _, sessions = open_database(project.db_url)
    app.state.project, app.state.sessions = project, sessions
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape is on for .html
    text = project.guidelines.read_text() if project.guidelines.is_file() else ""
    app.state.guidelines_html = MarkdownIt("commonmark", {"html": False}).render(text)  # raw HTML is escaped
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for module in (pairs, votes, authored, admin, pages):
        app.include_router(module.router)
    lesson.install(app)  # the lesson's demo (`preflab collect demo`); 404 in other projects

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/api") or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        page = app.state.templates.get_template("error.html").render(status=exc.status_code, detail=exc.detail)
        return HTMLResponse(page, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def database_busy(request: Request, exc: Exception):
        # the database refused a connection (e.g. PostgreSQL's max_connections reached by other clients) or the
        # pool had none free: nothing was stored, so say so and let the client retry (its client_id keeps a
        # retried vote single)
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the database is busy or unreachable: nothing was stored, retry shortly"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (see the server log)"}, status_code=500)

    app.add_middleware(Guard)
    return app
