"""The routes of `monotile serve` beyond OpenAI's text protocol (openai_text.py).

    GET  /health, /metrics, /v1/models, /      readiness, Prometheus, the list, the playground
    GET  /v1/models/{model}                    one model's card (404 for a name not served)
    POST /v1/embeddings                        runs whose task answers "embeddings"
    POST /v1/audio/transcriptions              "transcriptions" (a multipart upload)
    POST /v1/images/classifications            "classifications" (a file, or base64)
    POST /v1/forecasts                         "forecasts" (CSV text or {name: values})
    POST /v1/predictions                       every run: {"model", "input": JSON, "options"}

A run's task says which of these it answers (Task.routes) and turns the request's file or JSON
into its input (Task.read); what each route promises of the task's results is written at the
route. The work runs in a worker thread, one request at a time per model: nothing CPU-bound
runs on the event loop (decoding base64, tokenizing, encoding a large answer), and a task reads
an upload's bytes, never a path on the server's disk. An upload the task cannot read is named
in the error as the client named it (its multipart filename).
"""

from __future__ import annotations

import base64
import math
import re
import tempfile
from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, DataError, MonotileError
from ..modalities import check_options, takes
from ..modalities.speech_io import segments_of, transcript_file
from .gate import ApiError
from .schemas import EmbeddingRequest, ForecastRequest, PredictionRequest

STATIC = Path(__file__).parent / "static"
LOCAL_OPTIONS = ("plot", "progress")  # options of Task.predict a client may not set
SEGMENT_FIELDS = ("temperature", "avg_logprob", "compression_ratio", "no_speech_prob")
LANGUAGES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
             "nl": "dutch", "pt": "portuguese", "ru": "russian", "zh": "chinese",
             "ja": "japanese", "ko": "korean", "pl": "polish", "sv": "swedish", "tr": "turkish"}


async def _work(served, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a worker thread, holding the model's lock."""
    def locked():
        with served.lock:
            return fn(*args, **kwargs)
    return await run_in_threadpool(locked)


class _Unreadable(Exception):
    """task.read refused an upload (a DataError): a 415."""


async def _predict_one(served, source, what: str | None = None, name: str = "upload",
                       **options) -> dict:
    """The run's task reads `source` (bytes or JSON) and predicts it: its one result. With
    `what`, an upload the task cannot read is a 415 naming it `name` (as the client did),
    else 400."""
    task, model = served.run.task, served.run.model

    def work():
        try:
            item = task.read(source)
        except DataError as e:
            if what is None:
                raise
            raise _Unreadable(str(e)) from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a JSON value read()
            raise DataError(f"the input is not one this model reads ({type(e).__name__}: "
                            f"{e})") from None  # did not expect: the client's mistake
        return task.predict(model, [item], **options)[0]
    try:
        return await _work(served, work)
    except _Unreadable as e:
        raise ApiError(415, _named(str(e), name), param="file",
                       code="unsupported_media") from None
    except MonotileError as e:
        if what is None:
            raise
        raise ApiError(400, _named(str(e), name), code="invalid_input") from None


# what a reader's message may say of bytes it was handed: an in-memory file's repr, the words
# "the upload", or a temporary file's path on the server
_UNNAMED = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>|\bthe upload\b|"
                      + re.escape(tempfile.gettempdir()) + r"""[/\\][^\s'"():;,]*""")


def _named(message: str, name: str) -> str:
    """A reader's message about an upload, naming it `name` (the client's filename) where it
    spoke of the upload, of an in-memory file or of a temporary path."""
    return _UNNAMED.sub(repr(name), message)


def _filename(file: UploadFile) -> str:
    """The upload's name as the client gave it (no folders), or "upload"."""
    return Path((file.filename or "").replace("\\", "/")).name or "upload"


async def _upload(file: UploadFile, what: str) -> bytes:
    raw = await file.read()
    if not raw:
        raise ApiError(400, f"the {what} file {_filename(file)!r} is empty", param="file")
    return raw


async def _json(answer) -> JSONResponse:
    """`answer` as FastAPI would encode it, in a worker thread: a long forecast or a task's
    large result takes a while to encode."""
    return await run_in_threadpool(lambda: JSONResponse(jsonable_encoder(answer)))


def _b64(text, param: str = "image") -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, f"{param}'s base64 is not a string", param=param)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ApiError(400, f"{param} is not valid base64; send the file's bytes "
                       "base64-encoded (or as a data: URL)", param=param) from None


def add_routes(app: FastAPI, models, metrics) -> None:
    """Every route but the text protocol's."""
    _service_routes(app, models, metrics)

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def embeddings(body: EmbeddingRequest):
        """The task embeds (Embedder): (N, d) unit-length vectors."""
        served = models.get(body.model, "embeddings")
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
            return run.embed(texts), sum(len(run.task.tokenizer.encode(t)) for t in texts)
        vectors, tokens = await _work(served, work)
        metrics.tokens.labels(served.name, "prompt").inc(tokens)

        def answer():  # 2048 vectors are a second of encoding: not on the event loop
            data = []
            for i, v in enumerate(vectors):
                value = (base64.b64encode(v.float().numpy().tobytes()).decode()
                         if body.encoding_format == "base64" else v.tolist())
                data.append({"object": "embedding", "index": i, "embedding": value})
            return JSONResponse({"object": "list", "data": data, "model": served.name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return await run_in_threadpool(answer)

    @app.post("/v1/audio/transcriptions", tags=["audio"])
    async def transcriptions(file: UploadFile = File(...), model: str = Form(...),
                             response_format: str = Form("json"),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             temperature: float = Form(0.0),
                             timestamp_granularities: list[str] | None = Form(
                                 None, alias="timestamp_granularities[]")):
        """The task's result: {"text", "duration", and "words" [{"word", "start", "end"}] or
        "segments" [{"start", "end", "text"[, "words"]}]}, as OpenAI answers: json {"text"},
        text, srt, vtt (openai-whisper's files, speech_io.transcript_file) or verbose_json
        (segments; words when timestamp_granularities[] holds "word")."""
        served = models.get(model, "transcriptions")
        formats = ("json", "text", "srt", "verbose_json", "vtt")
        if response_format not in formats:
            raise ApiError(400, f"response_format={response_format!r} is invalid: choose "
                           f"{', '.join(formats)}", param="response_format")
        granularities = set(timestamp_granularities or ())
        if not granularities <= {"word", "segment"}:
            raise ApiError(400, f"timestamp_granularities={sorted(granularities)} is invalid: "
                           "choose word, segment or both", param="timestamp_granularities")
        predict = served.run.task.predict
        # what the client asked, refused by name where the run cannot do it (a CTC run has
        # no language or temperature); a CTC run times its words anyway
        options = {k: v for k, v in (("language", language), ("temperature", temperature))
                   if v}
        try:
            check_options(predict, options, f"{served.run.kind} runs",
                          flag=str)
        except ConfigError as e:
            raise ApiError(400, str(e), param=next(iter(options))) from None
        if "word" in granularities and takes(predict, "word_timestamps"):
            options["word_timestamps"] = True
        r = await _predict_one(served, await _upload(file, "audio"), "audio",
                               _filename(file), **options)
        if response_format == "text":
            return PlainTextResponse(r["text"] + "\n")
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(transcript_file(r, response_format))
        usage = {"type": "duration", "seconds": math.ceil(r["duration"])}  # as OpenAI bills
        if response_format == "json":
            return {"text": r["text"], "usage": usage}
        segments = segments_of(r) or [{"start": 0.0, "end": r["duration"], "text": r["text"]}]
        words = r.get("words") or [w for seg in segments for w in seg.get("words") or []]
        code = r.get("language") or language
        answer = {"task": r.get("task", "transcribe"),
                  "language": LANGUAGES.get(code, code or "english"),
                  "duration": r["duration"], "text": r["text"],
                  "segments": [{"id": i, "seek": seg.get("seek", 0), "start": seg["start"],
                                "end": seg["end"], "text": seg["text"],
                                **{k: seg[k] for k in SEGMENT_FIELDS if k in seg}}
                               for i, seg in enumerate(segments)],
                  "usage": usage}
        if "word" in granularities or r.get("words"):
            answer["words"] = [{"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
                               for w in words]
        return answer

    @app.post("/v1/images/classifications", tags=["images"])
    async def classify(model: str = Form(...), file: UploadFile | None = File(None),
                       image: str | None = Form(None, description="base64 (or a data: URL) "
                                                "instead of a file"),
                       top_k: int = Form(5, ge=1, le=1000)):
        """The task's result: {"labels", "probs"}, most probable first."""
        served = models.get(model, "classifications")
        if (file is None) == (image is None):
            raise ApiError(400, "give the image as a multipart `file`, or as base64 in "
                           "`image` (one of the two)", param="file")
        raw = await run_in_threadpool(_b64, image) if image is not None else \
            await _upload(file, "image")
        if not raw:
            raise ApiError(400, "the image file is empty", param="file")
        r = await _predict_one(served, raw, "image", "image" if file is None else
                               _filename(file), top_k=top_k)
        return {"object": "list", "model": served.name,
                "data": [{"label": label, "probability": p}
                         for label, p in zip(r["labels"], r["probs"])]}

    @app.post("/v1/forecasts", tags=["series"])
    async def forecasts(body: ForecastRequest):
        """The task reads {"csv"} or {"series", "timestamps"}; its result: {"series",
        "horizon", "quantiles", "forecast": [{"timestamp", "series", "forecast", "q10",
        ...}]}."""
        served = models.get(body.model, "forecasts")
        known = list(served.run.configs[served.run.kind].quantiles)
        if body.quantiles is not None:
            missing = [q for q in body.quantiles if not any(abs(q - k) < 1e-9 for k in known)]
            if missing or not body.quantiles:
                raise ApiError(400, f"quantiles {missing or body.quantiles} are not this "
                               f"model's; it forecasts {known}", param="quantiles")
        if (body.csv is None) == (body.series is None):
            raise ApiError(400, "give the history as `csv` (CSV text) or as `series` "
                           "({name: values}), one of the two", param="csv")
        history = {"csv": body.csv} if body.csv is not None else \
            {"series": body.series, "timestamps": body.timestamps}
        r = await _predict_one(served, history, horizon=body.horizon)
        if not all(math.isfinite(v) for row in r["forecast"] for v in row.values()
                   if isinstance(v, float)):
            raise ApiError(400, "the forecast is not finite: the history holds values too large "
                           "(or inf/nan); rescale it", param="csv" if body.csv else "series")
        keep = body.quantiles or known
        dropped = {f"q{round(q * 100):02d}" for q in known
                   if not any(abs(q - k) < 1e-9 for k in keep)}
        rows = [{k: v for k, v in row.items() if k not in dropped} for row in r["forecast"]]
        return await _json({"object": "forecast", "model": served.name, "series": r["series"],
                            "horizon": r["horizon"], "quantiles": keep, "forecast": rows})

    @app.post("/v1/predictions", tags=["predictions"])
    async def predictions(body: PredictionRequest):
        """Any run: the task reads `input` (JSON) and predicts it with `options` (those of its
        predict, as `monotile predict` passes them); its result, as it is."""
        served = models.get(body.model, "predictions")
        local = [k for k in body.options if k in LOCAL_OPTIONS]
        if local:  # a path on the server's disk, or a progress bar on its terminal
            raise ApiError(400, f"option {local[0]!r} is not for a server's clients",
                           param="options")
        try:
            check_options(served.run.task.predict, body.options, f"{served.run.kind} runs",
                          flag=lambda name: f"option {name!r}")
        except ConfigError as e:
            raise ApiError(400, str(e), param="options") from None
        source = body.input
        if isinstance(source, dict) and set(source) == {"base64"}:  # a file's bytes
            source = await run_in_threadpool(_b64, source["base64"], "input")
        r = await _predict_one(served, source, **body.options)
        return await _json({"object": "prediction", "model": served.name, "data": r})


def _service_routes(app: FastAPI, models, metrics) -> None:
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
        models.check_ready()
        return {"object": "list", "data": [s.card() for s in models.by_name.values()]}

    @app.get("/v1/models/{model:path}", tags=["models"])
    async def retrieve_model(model: str):
        """OpenAI's Model object (id, object "model", created, owned_by), and monotile's
        task, routes, chat_template and context."""
        return models.get(model).card()

