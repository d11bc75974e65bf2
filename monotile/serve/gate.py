"""The request gate of `monotile serve`: the key, the body limit, the time limits, the metrics,
and every error in OpenAI's shape.

    {"error": {"message", "type", "param", "code"}}

400 for bad parameters (never FastAPI's 422), 401 without the key, 404 for an unknown route or
model, 405 with Allow, 408 for a body that has not arrived within the request timeout, 413 for
a body over the limit, 415 for a file that is neither audio nor an image, 429 when the queue is
full (with Retry-After), 503 while the models load. A client's mistake is never a 5xx, and the
server keeps serving: a 500 (a bug, or a broken run) says `Connection: close`, so a client's
next request goes out on a fresh connection.

The gate reads each request's body whole (at most --max-body-mb, within --request-timeout)
before the app sees it; the HTTP protocol (timed_protocol) closes a connection whose request
headers have not arrived whole within the same timeout, and an idle one after KEEP_ALIVE s.
"""

from __future__ import annotations

import json
import logging
import time

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MonotileError

log = logging.getLogger("monotile.serve")


# ---- errors -----------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or KINDS.get(status, "invalid_request_error")


KINDS = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param=None, code=None, kind=None) -> dict:
    return {"error": {"message": message, "type": kind or KINDS.get(status,
                                                                    "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, **kw) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    if status in CLOSING:  # the request's bytes are not all read, or the server is unsure
        headers["Connection"] = "close"
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


CLOSING = (408, 413, 500)  # answered with Connection: close


def install_error_handlers(app: FastAPI) -> None:
    """Every exception becomes an answer in OpenAI's shape (see the module docstring)."""
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, param=e.param, code=e.code, kind=e.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "form")]
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}",
                              param=loc[0] if loc else None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}; see /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        response = error_response(e.status_code, message)
        response.headers.update(getattr(e, "headers", None) or {})  # 405's Allow
        return response

    @app.exception_handler(MonotileError)  # ConfigError, DataError, ...: a task refused it
    async def refused(request, e: MonotileError):
        return error_response(400, str(e), code="invalid_input")
    # any other exception is a 500, answered by the Gate (below)


def crashed(e: Exception) -> JSONResponse:
    return error_response(500, f"internal error ({type(e).__name__}); the server goes on")


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "a bad parameter, an unknown model, a model of another kind",
          "401": "no valid API key (with --api-key)",
          "408": "a body that did not arrive within --request-timeout",
          "413": "a body over --max-body-mb",
          "415": "an upload that is not audio or an image", "429": "the queue is full",
          "503": "the models are still loading"}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, saying what the server answers: OpenAI's error shape with 400 (not
    FastAPI's 422) and the other statuses, and server-sent events for streamed text."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    error = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for path, item in schema["paths"].items():
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                responses["503"] = {"description": "the models are still loading"}
                continue
            for status, why in ERRORS.items():
                if status == "415" and "multipart/form-data" not in json.dumps(op):
                    continue
                responses.setdefault(status, {"description": why, **error})
            if "{" in path:  # /v1/models/{model}
                responses["404"] = {"description": "no model of that name is served", **error}
            if path in ("/v1/completions", "/v1/chat/completions"):
                # with stream: true, `data: {chunk}` events, then `data: [DONE]`
                responses["200"].setdefault("content", {})["text/event-stream"] = {}
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


# ---- metrics ----------------------------------------------------------------------------------

class Metrics:
    def __init__(self, models):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("monotile_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("monotile_request_seconds", "time to the whole answer",
                                 ["route"], registry=r,
                                 buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("monotile_tokens", "tokens read (prompt) and generated "
                              "(completion)", ["model", "kind"], registry=r)
        self.ttft = Histogram("monotile_time_to_first_token_seconds", "request to first token",
                              ["model"], registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.per_token = Histogram("monotile_time_per_output_token_seconds",
                                   "time between a stream's tokens", ["model"], registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.batch_rows = Histogram("monotile_batch_rows", "sequences decoded together per "
                                    "step", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.cancelled = Counter("monotile_cancelled", "generations dropped because their "
                                 "client went away", ["model"], registry=r)
        queue = Gauge("monotile_queue_depth", "generation requests waiting", ["model"],
                      registry=r)
        running = Gauge("monotile_running_sequences", "sequences in the running batch",
                        ["model"], registry=r)
        for name, served in models.by_name.items():
            queue.labels(name).set_function(
                lambda s=served: s.engine.queue_depth if s.engine else 0)
            running.labels(name).set_function(lambda s=served: s.engine.running if s.engine else 0)


# ---- the gate: body size, time, key, metrics, crashes ----------------------------------------

class Gate:
    """ASGI middleware: refuses requests without the key (401; /health and the playground page
    are open), reads each body whole before the app sees it, refusing one over `max_body`
    bytes (413) or not arrived within `timeout` seconds (408), answers an exception the app did
    not (a bug) with a 500, and counts every answer by route."""

    OPEN = ("/health", "/")

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics,
                 timeout: float = 30.0):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, done = time.perf_counter(), [500], [False, False]  # started, complete
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0], done[0] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done[1] = True
            await send(message)

        def route_label():
            route = scope.get("route")
            return getattr(route, "path", None) or "unmatched"

        try:
            if self.api_key and scope["path"] not in self.OPEN and scope["method"] != "OPTIONS":
                given = headers.get("authorization", "")
                if given != f"Bearer {self.api_key}":
                    return await error_response(
                        401, "a valid API key is needed: send the header 'Authorization: Bearer "
                        "KEY' with the key the server was started with",
                        code="invalid_api_key")(scope, receive, counted_send)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await self._too_large()(scope, receive, counted_send)
            try:
                with anyio.fail_after(self.timeout):
                    body = await self._body(receive)
            except _TooLarge:
                return await self._too_large()(scope, receive, counted_send)
            except TimeoutError:
                return await error_response(
                    408, f"the request body did not arrive whole within {self.timeout:g} s "
                    "(--request-timeout); send it at once, or start the server with a longer "
                    "timeout", code="request_timeout")(scope, receive, counted_send)
            if body is None:  # the client went away while sending
                status[0] = 499
                return
            replayed = [False]

            async def replay():  # the body once, then the connection's own messages
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, counted_send)
            except Exception as e:
                log.exception("unexpected error on %s %s", scope["method"], scope["path"])
                if done[0] and not done[1]:
                    raise  # an answer cut short: the server closes the connection
                if not done[0]:
                    await crashed(e)(scope, replay, counted_send)
        finally:
            route = route_label()
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _body(self, receive) -> bytes | None:
        """The whole body (_TooLarge past max_body), or None if the client goes away."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self):
        return error_response(413, f"the request body is over {self.max_body:,} bytes, the most "
                              "this server takes (--max-body-mb)", code="body_too_large")


class _TooLarge(Exception):
    pass


# ---- the connection: a time limit on a request's headers -----------------------------------

KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open


def timed_protocol(timeout: float):
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection whose request headers have not
    arrived whole within `timeout` seconds of the connection, or of the first byte after the
    last answer (a 408 if some bytes came); uvicorn alone holds such a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(error_body(408, f"the request headers did not arrive whole within "
                                 f"{timeout:g} s (--request-timeout)",
                                 code="request_timeout")).encode()
    late = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)

    class TimedH11Protocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.head_timer is None:  # a request begun, its headers not yet whole
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self.head_timer = self.loop.call_later(timeout, self._late)

        def _disarm(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _late(self):
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.conn.trailing_data[0]:  # part of a request: say why
                    self.transport.write(late)
                self.transport.close()

    return TimedH11Protocol
