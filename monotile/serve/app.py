"""`monotile serve`: every given run on one port, behind OpenAI's HTTP API.

    POST /v1/completions, /v1/chat/completions   text runs (stream: server-sent events)
    POST /v1/embeddings                          encoder runs (e.g. an imported MiniLM)
    POST /v1/audio/transcriptions                speech runs (multipart upload)
    POST /v1/images/classifications              vision runs (multipart: a file, or base64)
    POST /v1/forecasts                           series runs (a CSV or {name: values})
    GET  /v1/models, /health, /metrics, /        the list, readiness, Prometheus, a playground

Generation requests of a run share one Engine (engine.py: continuous batching); the other
modalities run one request at a time per model, in a worker thread. Errors come in OpenAI's
shape {"error": {"message", "type", "param", "code"}}: 400 for bad parameters, 401 without the
key, 404 for an unknown route, 413 for a body over the limit, 415 for a file that is not
audio or an image, 429 when the queue is full, 503 while the models load. A client's mistake
is never a 5xx, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MonotileError
from ..infer.generate import Sampling
# chat with a run trained on plain text (no chat template): each message as "ROLE:\ncontent"
# and a blank line, then "ASSISTANT:\n"; the answer ends at a blank line
from ..modalities.chat import PLAIN_STOP, PLAIN_TEMPLATE, render
from .engine import Engine, Job, QueueFull
from .schemas import (MAX_STOPS, ChatRequest, CompletionRequest, EmbeddingRequest,
                      ForecastRequest)

log = logging.getLogger("monotile.serve")
STATIC = Path(__file__).parent / "static"


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
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


# ---- the models -----------------------------------------------------------------------------

@dataclass(eq=False)
class Served:
    name: str
    path: Path
    task: str = ""                 # text | embedding | vision | speech | series
    run: object = None
    engine: Engine | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": int(self.path.stat().st_mtime),
                "owned_by": "monotile", "task": self.task,
                "chat_template": bool(self.run is not None and self.task == "text"
                                      and self.run.has_chat_template),
                "context": (self.run.configs["model"].context if self.run is not None
                            else None)}


ROUTE_OF = {"text": "/v1/completions or /v1/chat/completions", "embedding": "/v1/embeddings",
            "vision": "/v1/images/classifications", "speech": "/v1/audio/transcriptions",
            "series": "/v1/forecasts"}


class Models:
    """The served runs by name, loaded in a background thread after the port opens."""

    def __init__(self, paths: list[Path], names: list[str], *, dtype: str, max_batch: int,
                 max_queue: int):
        self.by_name = {n: Served(n, p) for n, p in zip(names, paths)}
        self.dtype, self.max_batch, self.max_queue = dtype, max_batch, max_queue
        self.ready = threading.Event()
        self.failed: str | None = None
        self.metrics: Metrics | None = None  # set by create_app

    def load_all(self) -> None:
        from ..run import load
        try:
            for served in self.by_name.values():
                run = load(served.path, device="cpu")
                task = run.meta["task"]
                if task == "text" and run.configs["text"].model == "encoder":
                    task = "embedding"
                if task == "transcribe":  # an imported Whisper: transcriptions as speech
                    task = "speech"
                if task in ("text", "embedding"):
                    run.optimize_for_inference(self.dtype)
                served.run, served.task = run, task
                if task == "text":
                    rows = self.metrics.batch_rows.labels(served.name)
                    cancelled = self.metrics.cancelled.labels(served.name)
                    served.engine = Engine(run.model, run.task.tokenizer.decode,
                                           max_batch=self.max_batch, max_queue=self.max_queue,
                                           name=served.name, on_step=rows.observe,
                                           on_cancel=cancelled.inc)
                log.info("loaded %s (%s) from %s", served.name, task, served.path)
            self.ready.set()
        except Exception as e:  # reported by /health and the CLI
            self.failed = f"{type(e).__name__}: {e}" if not isinstance(e, MonotileError) else str(e)
            log.error("could not load the models: %s", self.failed)

    def get(self, name: str, task: str) -> Served:
        if not self.ready.is_set():
            raise ApiError(503, "the models are still loading; retry in a moment",
                           code="loading")
        served = self.by_name.get(name)
        if served is None:
            raise ApiError(400, f"model {name!r} is not served here; GET /v1/models lists "
                           f"{', '.join(self.by_name)}", param="model", code="model_not_found")
        if served.task != task:
            raise ApiError(400, f"model {name!r} is a {served.task} model; send it to "
                           f"{ROUTE_OF[served.task]}", param="model", code="wrong_model_task")
        return served

    def close(self) -> None:
        for served in self.by_name.values():
            if served.engine is not None:
                served.engine.close()


# ---- metrics --------------------------------------------------------------------------------

class Metrics:
    def __init__(self, models: Models):
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


# ---- the gate: body size, key, metrics ------------------------------------------------------

class Gate:
    """ASGI middleware: refuses bodies over `max_body` bytes (413) and requests without the key
    (401; /health and the playground page are open), and counts every answer by route."""

    OPEN = ("/health", "/")

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
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
            seen = [0]

            async def limited_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body:
                        raise _TooLarge
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except _TooLarge:
                await self._too_large()(scope, receive, counted_send)
        finally:
            route = route_label()
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _too_large(self):
        return error_response(413, f"the request body is over {self.max_body:,} bytes, the most "
                              "this server takes (--max-body-mb)", code="body_too_large")


class _TooLarge(Exception):
    pass


# ---- the app --------------------------------------------------------------------------------

def create_app(paths: list[str | Path], *, names: list[str] | None = None,
               api_key: str | None = None, cors_origins: list[str] | None = None,
               max_batch: int = 16, max_queue: int = 64, max_body_mb: float = 25.0,
               dtype: str = "float32") -> FastAPI:
    """The server's ASGI app for the runs at `paths` (served as `names`, default: each run
    folder's name). Models load in the background once the app starts; /health says when."""
    paths = [Path(p) for p in paths]
    names = names or [p.resolve().name for p in paths]
    models = Models(paths, names, dtype=dtype, max_batch=max_batch, max_queue=max_queue)
    metrics = models.metrics = Metrics(models)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=models.load_all, daemon=True, name="load-models").start()
        yield
        models.close()

    app = FastAPI(title="monotile", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible serving of monotile runs: text generation, "
                  "embeddings, speech recognition, image classification and forecasting.")
    app.state.models, app.state.metrics = models, metrics
    _errors(app)
    _routes(app, models, metrics)
    app.openapi = lambda: _openapi(app)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gate, api_key=api_key, max_body=int(max_body_mb * 2 ** 20),
                       metrics=metrics)
    return app


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "a bad parameter, an unknown model, a model of another kind",
          "401": "no valid API key (with --api-key)", "413": "a body over --max-body-mb",
          "415": "an upload that is not audio or an image", "429": "the queue is full",
          "503": "the models are still loading"}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, saying what the server answers: OpenAI's error shape with 400 (not
    FastAPI's 422) and the other statuses, and server-sent events for streamed text."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    error = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                responses["503"] = {"description": "the models are still loading"}
                continue
            for status, why in ERRORS.items():
                if status == "415" and "multipart/form-data" not in json.dumps(op):
                    continue
                responses.setdefault(status, {"description": why, **error})
            if path in ("/v1/completions", "/v1/chat/completions"):
                # with stream: true, `data: {chunk}` events, then `data: [DONE]`
                responses["200"].setdefault("content", {})["text/event-stream"] = {}
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


def _version() -> str:
    from .. import __version__
    return __version__


def _errors(app: FastAPI) -> None:
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

    @app.exception_handler(MonotileError)
    async def refused(request, e: MonotileError):
        return error_response(400, str(e), code="invalid_input")

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); the server goes on")


# ---- routes ---------------------------------------------------------------------------------

def _routes(app: FastAPI, models: Models, metrics: Metrics) -> None:
    @app.get("/health", tags=["service"])
    async def health():
        if models.failed:
            return JSONResponse({"status": "failed", "error": models.failed}, status_code=500)
        if not models.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "models": list(models.by_name)}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        page = STATIC / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8") if page.is_file() else
                            "<p>monotile serve: the playground page is missing</p>")

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        if not models.ready.is_set():
            raise ApiError(503, "the models are still loading; retry in a moment",
                           code="loading")
        return {"object": "list", "data": [s.card() for s in models.by_name.values()]}

    @app.post("/v1/completions", tags=["text"])
    async def completions(body: CompletionRequest, request: Request):
        served = models.get(body.model, "text")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt",
                           param="prompt")
        encoded = [_encode(served, p) for p in prompts]
        gen = Generation(served, metrics, body, body.max_tokens, _stops(body.stop),
                         logprobs=body.logprobs, chat=False)
        jobs = gen.start([ids for ids in encoded for _ in range(body.n)])
        echo = [p for p in prompts for _ in range(body.n)] if body.echo else None
        if body.stream:
            return _sse(gen.stream_completions(jobs, request, echo))
        return await gen.complete_completions(jobs, sum(len(e) for e in encoded), echo)

    @app.post("/v1/chat/completions", tags=["text"])
    async def chat(body: ChatRequest, request: Request):
        served = models.get(body.model, "text")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content or [])} for m in body.messages]
        task = served.run.task
        stops = _stops(body.stop)
        if served.run.has_chat_template:
            prompt = task.chat_prompt(messages)
            stops += list(task.config.chat_stop)
        else:
            prompt = render(PLAIN_TEMPLATE, messages, add_generation_prompt=True)
            stops += list(PLAIN_STOP)
        ids = _encode(served, prompt)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        gen = Generation(served, metrics, body, limit, stops, logprobs=top, chat=True)
        jobs = gen.start([ids] * body.n)
        if body.stream:
            return _sse(gen.stream_chat(jobs, request))
        return await gen.complete_chat(jobs, len(ids))

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def embeddings(body: EmbeddingRequest):
        served = models.get(body.model, "embedding")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 2048:
            raise ApiError(400, f"input has {len(texts)} texts; give 1 to 2048", param="input")
        if any(not t for t in texts):
            raise ApiError(400, "input holds an empty text; every text needs a character",
                           param="input")
        run = served.run
        width = run.configs["model"].d_model
        if body.dimensions not in (None, width):
            raise ApiError(400, f"dimensions={body.dimensions} is not supported: this model's "
                           f"embeddings have {width}", param="dimensions")

        def work():
            with served.lock:
                return run.embed(texts)
        vectors = await run_in_threadpool(work)
        tokens = sum(len(run.task.tokenizer.encode(t)) for t in texts)
        metrics.tokens.labels(served.name, "prompt").inc(tokens)
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.float().numpy().tobytes()).decode()
                     if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/audio/transcriptions", tags=["audio"])
    async def transcriptions(file: UploadFile = File(...), model: str = Form(...),
                             response_format: str = Form("json"),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             temperature: float = Form(0.0)):
        served = models.get(model, "speech")
        formats = ("json", "text", "srt", "verbose_json", "vtt")
        if response_format not in formats:
            raise ApiError(400, f"response_format={response_format!r} is invalid: choose "
                           f"{', '.join(formats)}", param="response_format")
        from ..modalities.audio import AUDIO_SUFFIXES
        result = await _predict_upload(served, file, AUDIO_SUFFIXES, ".wav", "audio",
                                       lambda path: served.run.predict([str(path)]))
        r = result["predictions"][0]
        if response_format == "text":
            return PlainTextResponse(r["text"] + "\n")
        if response_format in ("srt", "vtt"):
            from ..modalities.speech import to_srt
            srt = to_srt(r.get("segments") or r["words"])
            if response_format == "vtt":
                srt = "WEBVTT\n\n" + srt.replace(",", ".")
            return PlainTextResponse(srt)
        usage = {"type": "duration", "seconds": math.ceil(r["duration"])}  # as OpenAI bills
        if response_format == "verbose_json":
            segments = r.get("segments") or [{"start": 0.0, "end": r["duration"],
                                              "text": r["text"]}]
            return {"task": "transcribe", "language": language or "english",
                    "duration": r["duration"], "text": r["text"], "words": r.get("words", []),
                    "segments": [{"id": i, "start": seg["start"], "end": seg["end"],
                                  "text": seg["text"]} for i, seg in enumerate(segments)],
                    "usage": usage}
        return {"text": r["text"], "usage": usage}

    @app.post("/v1/images/classifications", tags=["images"])
    async def classify(model: str = Form(...), file: UploadFile | None = File(None),
                       image: str | None = Form(None, description="base64 (or a data: URL) "
                                                "instead of a file"),
                       top_k: int = Form(5, ge=1, le=1000)):
        served = models.get(model, "vision")
        if (file is None) == (image is None):
            raise ApiError(400, "give the image as a multipart `file`, or as base64 in "
                           "`image` (one of the two)", param="file")
        if image is not None:
            raw = _b64(image)
            file = UploadFile(io.BytesIO(raw), filename="image.png")
        from ..modalities.vision import IMAGE_SUFFIXES
        result = await _predict_upload(served, file, IMAGE_SUFFIXES, ".png", "image",
                                       lambda path: served.run.predict([str(path)],
                                                                       top_k=top_k))
        r = result["predictions"][0]
        return {"object": "list", "model": served.name,
                "data": [{"label": label, "probability": p}
                         for label, p in zip(r["labels"], r["probs"])]}

    @app.post("/v1/forecasts", tags=["series"])
    async def forecasts(body: ForecastRequest):
        served = models.get(body.model, "series")
        run = served.run
        known = list(run.configs["series"].quantiles)
        if body.quantiles is not None:
            missing = [q for q in body.quantiles if not any(abs(q - k) < 1e-9 for k in known)]
            if missing or not body.quantiles:
                raise ApiError(400, f"quantiles {missing or body.quantiles} are not this "
                               f"model's; it forecasts {known}", param="quantiles")
        text = _history_csv(body)
        if body.series is not None and any(
                v is not None and not (math.isfinite(v) and abs(v) < 1e15)
                for values in body.series.values() for v in values):
            raise ApiError(400, "series holds a value that is not finite or is beyond 1e15; "
                           "give the history in units where its values are ordinary numbers",
                           param="series")

        def work():
            with tempfile.TemporaryDirectory() as tmp, served.lock:
                path = Path(tmp) / "history.csv"
                path.write_text(text, encoding="utf-8")
                return run.predict([str(path)], horizon=body.horizon)
        result = await run_in_threadpool(work)
        if not all(math.isfinite(v) for r in result["forecast"] for v in r.values()
                   if isinstance(v, float)):
            raise ApiError(400, "the forecast is not finite: the history holds values too large "
                           "(or inf/nan); rescale it", param="csv" if body.csv else "series")
        keep = body.quantiles or known
        labels = {f"q{round(q * 100):02d}" for q in known if
                  not any(abs(q - k) < 1e-9 for k in keep)}
        rows = [{k: v for k, v in r.items() if k not in labels} for r in result["forecast"]]
        return {"object": "forecast", "model": served.name, "series": result["series"],
                "horizon": result["horizon"], "quantiles": keep, "forecast": rows}


# ---- text generation ------------------------------------------------------------------------

def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop has {len(stops)} strings; give at most {MAX_STOPS}",
                       param="stop")
    return [s for s in stops if s]


def _encode(served: Served, prompt: str) -> list[int]:
    task = served.run.task
    ids = task.tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty (or holds no character this model knows); "
                       "give at least one", param="prompt")
    context = served.run.configs["model"].context
    if len(ids) >= context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                       f"{context}, so it takes at most {context - 1}", param="prompt",
                       code="context_length_exceeded")
    return ids


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunk(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Generation:
    """One completions or chat request: its jobs on the engine, and their events gathered
    into OpenAI's answer or stream."""

    def __init__(self, served: Served, metrics: Metrics, body, max_tokens: int | None,
                 stops: list[str], *, logprobs: int | None, chat: bool):
        self.served, self.metrics, self.body, self.stops = served, metrics, body, stops
        self.logprobs, self.chat = logprobs, chat
        self.context = served.run.configs["model"].context
        self.max_tokens = max_tokens  # None: up to the context
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.perf_counter()
        self.tokenizer = served.run.task.tokenizer

    def start(self, prompts: list[list[int]]) -> list[Job]:
        b, loop = self.body, asyncio.get_running_loop()
        sampling = Sampling(temperature=b.temperature, top_k=b.top_k,
                            top_p=b.top_p if b.top_p < 1 else None,
                            repetition_penalty=b.repetition_penalty)
        jobs = []
        for i, ids in enumerate(prompts):
            def emit(event, i=i):
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
            limit = self.context - len(ids) if self.max_tokens is None else self.max_tokens
            if len(ids) + limit > self.context:  # as OpenAI answers it
                raise ApiError(400, f"this model's context is {self.context} tokens; the prompt "
                               f"has {len(ids)} and max_tokens asks for {limit} more: lower "
                               f"max_tokens to at most {self.context - len(ids)}",
                               param="max_tokens", code="context_length_exceeded")
            jobs.append(Job(ids, limit, sampling, emit, presence=b.presence_penalty,
                            frequency=b.frequency_penalty,
                            seed=None if b.seed is None else b.seed + i, stop=self.stops,
                            logprobs=self.logprobs))
        self.metrics.tokens.labels(self.served.name, "prompt").inc(
            sum(len(p) for p in {id(p): p for p in prompts}.values()))
        if all(job.max_tokens == 0 for job in jobs):  # nothing to generate: answer at once
            for job in jobs:
                job.emit({"type": "done", "finish_reason": "length",
                          "prompt_tokens": len(job.prompt), "completion_tokens": 0})
            return jobs
        try:
            self.served.engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        return jobs

    async def events(self, jobs: list[Job]):
        """(index, event) until every job is done; token timing goes to the metrics."""
        open_jobs, first, last = len(jobs), True, None
        while open_jobs:
            i, event = await self.queue.get()
            if event["type"] == "token" and event.get("token") is not None:
                now = time.perf_counter()
                if first:
                    self.metrics.ttft.labels(self.served.name).observe(now - self.started)
                    first = False
                elif last is not None:
                    self.metrics.per_token.labels(self.served.name).observe(now - last)
                last = now
            if event["type"] == "done":
                open_jobs -= 1
                self.metrics.tokens.labels(self.served.name, "completion").inc(
                    event["completion_tokens"])
            if event["type"] == "error":
                open_jobs -= 1
            yield i, event

    def usage(self, prompt_tokens: int, completion: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprob(self, event) -> dict:
        text = self._token_text(event["token"])
        return {"token": text, "logprob": event["logprob"], "bytes": list(text.encode()),
                "top_logprobs": [{"token": self._token_text(t), "logprob": lp,
                                  "bytes": list(self._token_text(t).encode())}
                                 for t, lp in event["top"]]}

    async def _gather(self, jobs):
        n = len(jobs)
        texts, finish = [""] * n, [None] * n
        lps = [[] for _ in range(n)]
        completion = 0
        async for i, event in self.events(jobs):
            if event["type"] == "error":
                raise ApiError(500, f"generation failed: {event['message']}")
            if event["type"] == "token":
                texts[i] += event["text"]
                if event.get("token") is not None and self.logprobs is not None:
                    lps[i].append(event)
            else:
                finish[i] = event["finish_reason"]
                completion += event["completion_tokens"]
        return texts, finish, lps, completion

    async def complete_completions(self, jobs, prompt_tokens: int, echo):
        texts, finish, lps, completion = await self._gather(jobs)
        choices = []
        for i, text in enumerate(texts):
            prefix = echo[i] if echo else ""
            choice = {"index": i, "text": prefix + text, "finish_reason": finish[i],
                      "logprobs": None}
            if self.logprobs is not None:
                choice["logprobs"] = self._completion_logprobs(lps[i], len(prefix))
            choices.append(choice)
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.served.name, "choices": choices,
                "usage": self.usage(prompt_tokens, completion)}

    def _completion_logprobs(self, events, offset: int) -> dict:
        tokens = [self._token_text(e["token"]) for e in events]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in events],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e["top"]}
                                 for e in events], "text_offset": offsets}

    async def complete_chat(self, jobs, prompt_tokens: int):
        texts, finish, lps, completion = await self._gather(jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": ({"content": [self._chat_logprob(e) for e in lps[i]]}
                                 if self.logprobs is not None else None),
                    "finish_reason": finish[i]} for i, text in enumerate(texts)]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.served.name, "choices": choices,
                "usage": self.usage(prompt_tokens, completion)}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.served.name}

    async def stream_completions(self, jobs, request: Request, echo):
        head = self._head("text_completion")
        prompt_tokens = sum(len(p) for p in {id(j.prompt): j.prompt for j in jobs}.values())
        completion = 0
        try:
            if echo:
                for i, prefix in enumerate(echo):
                    yield _chunk({**head, "choices": [{"index": i, "text": prefix,
                                                       "logprobs": None,
                                                       "finish_reason": None}]})
            async for i, event in self.events(jobs):
                if event["type"] == "error":
                    yield _chunk(error_body(500, f"generation failed: {event['message']}"))
                    continue
                if event["type"] == "token":
                    if not event["text"] and event.get("token") is None:
                        continue
                    lp = (self._completion_logprobs([event], 0)
                          if self.logprobs is not None and event.get("token") is not None
                          else None)
                    yield _chunk({**head, "choices": [{"index": i, "text": event["text"],
                                                       "logprobs": lp,
                                                       "finish_reason": None}]})
                else:
                    completion += event["completion_tokens"]
                    yield _chunk({**head, "choices": [{"index": i, "text": "",
                                                       "logprobs": None, "finish_reason":
                                                       event["finish_reason"]}]})
            yield _chunk({**head, "choices": [], "usage": self.usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"
        finally:  # the client may have gone: free the rows
            for job in jobs:
                job.cancelled = True

    async def stream_chat(self, jobs, request: Request):
        head = self._head("chat.completion.chunk")
        prompt_tokens, completion = len(jobs[0].prompt), 0
        try:
            for i in range(len(jobs)):
                yield _chunk({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                         "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
            async for i, event in self.events(jobs):
                if event["type"] == "error":
                    yield _chunk(error_body(500, f"generation failed: {event['message']}"))
                    continue
                if event["type"] == "token":
                    if not event["text"] and (event.get("token") is None
                                              or self.logprobs is None):
                        continue
                    lp = ({"content": [self._chat_logprob(event)]}
                          if self.logprobs is not None and event.get("token") is not None
                          else None)
                    yield _chunk({**head, "choices": [{"index": i,
                                                       "delta": {"content": event["text"]},
                                                       "logprobs": lp, "finish_reason": None}]})
                else:
                    completion += event["completion_tokens"]
                    yield _chunk({**head, "choices": [{"index": i, "delta": {},
                                                       "logprobs": None, "finish_reason":
                                                       event["finish_reason"]}]})
            yield _chunk({**head, "choices": [], "usage": self.usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancelled = True


# ---- uploads --------------------------------------------------------------------------------

def _b64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ApiError(400, "image is not valid base64; send the file's bytes base64-encoded "
                       "(or as a data: URL)", param="image") from None


async def _predict_upload(served: Served, file: UploadFile, suffixes, default: str, what: str,
                          predict) -> dict:
    """Save the upload under its own suffix in a temporary folder and run `predict` on it; an
    undecodable file is a 415."""
    raw = await file.read()
    if not raw:
        raise ApiError(400, f"the {what} file is empty", param="file")
    suffix = Path(file.filename or "").suffix.lower()
    suffix = suffix if suffix in suffixes else default

    def work():
        with tempfile.TemporaryDirectory() as tmp, served.lock:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(raw)
            return predict(path)
    try:
        result = await run_in_threadpool(work)
    except MonotileError as e:
        raise ApiError(415, f"the upload is not a readable {what} file ({e})", param="file",
                       code="unsupported_media") from None
    if not result["predictions"]:
        skipped = result.get("skipped") or [{"error": "unreadable"}]
        raise ApiError(415, f"the upload is not a readable {what} file: "
                       f"{skipped[0]['error']}", param="file", code="unsupported_media")
    return result


def _history_csv(body: ForecastRequest) -> str:
    if (body.csv is None) == (body.series is None):
        raise ApiError(400, "give the history as `csv` (CSV text) or as `series` "
                       "({name: values}), one of the two", param="csv")
    if body.csv is not None:
        if not body.csv.strip():
            raise ApiError(400, "csv is empty; give a header line and the values", param="csv")
        return body.csv
    names = list(body.series)
    if not names:
        raise ApiError(400, "series is empty; give at least one {name: values}",
                       param="series")
    lengths = {len(v) for v in body.series.values()}
    if len(lengths) != 1:
        raise ApiError(400, f"the series have different lengths {sorted(lengths)}; give "
                       "equally long histories", param="series")
    n = lengths.pop()
    if body.timestamps is not None and len(body.timestamps) != n:
        raise ApiError(400, f"timestamps has {len(body.timestamps)} entries for {n} values",
                       param="timestamps")
    import csv
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow((["date"] if body.timestamps else []) + names)
    for t in range(n):
        row = [("" if body.series[k][t] is None else repr(float(body.series[k][t])))
               for k in names]
        w.writerow(([body.timestamps[t]] if body.timestamps else []) + row)
    return out.getvalue()


def serve(paths: list[str], *, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """Run the server until interrupted; 2 when the models cannot be loaded."""
    import uvicorn
    app = create_app(paths, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    server = uvicorn.Server(config)
    models: Models = app.state.models

    def watch():  # stop the server if the models fail to load
        while not (models.ready.is_set() or models.failed):
            time.sleep(0.1)
        if models.failed:
            server.should_exit = True
    threading.Thread(target=watch, daemon=True).start()
    torch.set_grad_enabled(False)
    server.run()
    if models.failed:
        raise MonotileError(f"could not load the models: {models.failed}")
    return 0
