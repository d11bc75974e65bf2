"""`monotile serve`: every given run on one port, behind OpenAI's HTTP API.

    POST /v1/completions, /v1/chat/completions   runs that generate text (stream: server-sent
                                                 events; openai_text.py)
    POST /v1/embeddings                          runs that embed (e.g. an imported MiniLM)
    POST /v1/audio/transcriptions                speech runs (multipart upload)
    POST /v1/images/classifications              vision runs (multipart: a file, or base64)
    POST /v1/forecasts                           series runs (a CSV or {name: values})
    POST /v1/predictions                         any run: its task's input and result as JSON
    GET  /v1/models, /v1/models/{model}          the list, one model's card
    GET  /health, /metrics, /                    readiness, Prometheus, a playground

Which routes a run answers is its task's to say (Task.routes; every run answers
/v1/predictions). Generation requests of a run share one Engine (engine.py: continuous
batching); the other routes run one request at a time per model, in a worker thread
(routes.py). The key, the body limit, the time limits, the metrics and OpenAI's error shape
are the gate's (gate.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI

from ..errors import MonotileError
from ..version import __version__
from .engine import Engine
from .gate import (KEEP_ALIVE, ApiError, Gate, Metrics, install_error_handlers, openapi_schema,
                   timed_protocol)
from .openai_text import add_text_routes
from .routes import add_routes

log = logging.getLogger("monotile.serve")

# each route's path, by the API name a task's `routes` uses
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions",
         "embeddings": "/v1/embeddings", "transcriptions": "/v1/audio/transcriptions",
         "classifications": "/v1/images/classifications", "forecasts": "/v1/forecasts",
         "predictions": "/v1/predictions"}
# the kind of service a model card names (and the playground shows a panel for), by its
# first route; a run with none of these is named by its task
KINDS = {"completions": "text", "embeddings": "embedding", "transcriptions": "speech",
         "classifications": "vision", "forecasts": "series"}
# routes whose requests decode token by token at batch 1: their runs' weights are packed
PACKED = ("completions", "embeddings")


# ---- the models -----------------------------------------------------------------------------

@dataclass(eq=False)
class Served:
    name: str
    path: Path
    run: object = None
    routes: tuple[str, ...] = ()   # the task's routes, and "predictions"
    engine: Engine | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time

    @property
    def kind(self) -> str:
        """text | embedding | speech | vision | series, or the task's name."""
        return next((KINDS[r] for r in self.routes if r in KINDS),
                    self.run.kind if self.run is not None else "")

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": int(self.path.stat().st_mtime),
                "owned_by": "monotile", "task": self.kind, "routes": list(self.routes),
                "chat_template": bool(self.run is not None and "chat" in self.routes
                                      and self.run.has_chat_template),
                "context": (self.run.configs["model"].context if self.run is not None
                            else None)}


class Models:
    """The served runs by name, loaded in a background thread after the port opens."""

    def __init__(self, paths: list[Path], names: list[str], *, dtype: str, max_batch: int,
                 max_queue: int, device: str = "cpu"):
        self.by_name = {n: Served(n, p) for n, p in zip(names, paths)}
        self.dtype, self.max_batch, self.max_queue = dtype, max_batch, max_queue
        self.device = device
        self.ready = threading.Event()
        self.failed: str | None = None
        self.metrics: Metrics | None = None  # set by create_app

    def load_all(self) -> None:
        from ..rundir import check_run_dir, read_config
        from ..run import load
        try:
            for served in self.by_name.values():
                # a text run's routes (completions and chat, or embeddings) are all PACKED:
                # it is read for inference layer by layer (infer/convert.py), in less memory
                _, meta, _ = read_config(check_run_dir(served.path))
                run = load(served.path, device=self.device,
                           dtype=self.dtype if meta["task"] == "text" else None)
                routes = (*run.task.routes, "predictions")
                if any(r in PACKED for r in routes) and meta["task"] != "text":
                    run.optimize_for_inference(self.dtype)
                served.run, served.routes = run, routes
                if "completions" in routes:
                    rows = self.metrics.batch_rows.labels(served.name)
                    cancelled = self.metrics.cancelled.labels(served.name)
                    served.engine = Engine(run.model, run.task.tokenizer.decode,
                                           max_batch=self.max_batch, max_queue=self.max_queue,
                                           name=served.name, on_step=rows.observe,
                                           on_cancel=cancelled.inc)
                log.info("loaded %s (%s) from %s", served.name, served.kind, served.path)
            self.ready.set()
        except Exception as e:  # reported by /health and the CLI
            self.failed = f"{type(e).__name__}: {e}" if not isinstance(e, MonotileError) else str(e)
            log.error("could not load the models: %s", self.failed)

    def check_ready(self) -> None:
        """503 while the models load."""
        if not self.ready.is_set():
            raise ApiError(503, "the models are still loading; retry in a moment",
                           code="loading")

    def get(self, name: str, route: str | None = None) -> Served:
        """The served model `name`, which must answer `route` (if given): 503 while loading,
        for an unknown model 400 (a request naming it) or 404 (GET /v1/models/{name}, route
        None), 400 for a model of another kind (naming the route it answers)."""
        self.check_ready()
        served = self.by_name.get(name)
        if served is None:
            raise ApiError(400 if route else 404, f"model {name!r} is not served here; "
                           f"GET /v1/models lists {', '.join(self.by_name)}", param="model",
                           code="model_not_found", kind="invalid_request_error")
        if route is not None and route not in served.routes:
            where = " or ".join(PATHS[r] for r in served.routes if r != "predictions") or \
                PATHS["predictions"]
            raise ApiError(400, f"model {name!r} is a {served.kind} model; send it to {where}",
                           param="model", code="wrong_model_task")
        return served

    def close(self) -> None:
        for served in self.by_name.values():
            if served.engine is not None:
                served.engine.close()


# ---- the app --------------------------------------------------------------------------------

def create_app(paths: list[str | Path], *, names: list[str] | None = None,
               api_key: str | None = None, cors_origins: list[str] | None = None,
               max_batch: int = 16, max_queue: int = 64, max_body_mb: float = 25.0,
               dtype: str = "float32", device: str = "cpu",
               request_timeout: float = 30.0) -> FastAPI:
    """The server's ASGI app for the runs at `paths` (served as `names`, default: each run
    folder's name). Models load in the background once the app starts; /health says when.
    A request body must arrive whole within `request_timeout` seconds (else 408)."""
    paths = [Path(p) for p in paths]
    names = names or [p.resolve().name for p in paths]
    models = Models(paths, names, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
                    device=device)
    metrics = models.metrics = Metrics(models)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=models.load_all, daemon=True, name="load-models").start()
        yield
        models.close()

    app = FastAPI(title="monotile", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible serving of monotile runs: text generation, "
                  "embeddings, speech recognition, image classification and forecasting.")
    app.state.models, app.state.metrics = models, metrics
    install_error_handlers(app)
    add_routes(app, models, metrics)
    add_text_routes(app, models, metrics)
    app.openapi = lambda: openapi_schema(app)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gate, api_key=api_key, max_body=int(max_body_mb * 2 ** 20),
                       metrics=metrics, timeout=request_timeout)
    return app


def serve(paths: list[str], *, host: str = "127.0.0.1", port: int = 8000,
          request_timeout: float = 30.0, **options) -> int:
    """Run the server until interrupted; 2 when the models cannot be loaded. A request's
    headers, then its body, must arrive within `request_timeout` seconds each."""
    import uvicorn
    app = create_app(paths, request_timeout=request_timeout, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            http=timed_protocol(request_timeout), timeout_keep_alive=KEEP_ALIVE,
                            h11_max_incomplete_event_size=16 * 2 ** 10)
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
