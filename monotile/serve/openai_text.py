"""OpenAI's text protocol: /v1/completions and /v1/chat/completions on the runs that generate
text, answered whole or streamed as server-sent events.

A request becomes one Job per choice on the run's Engine (engine.py: continuous batching); the
engine's events (a token's text, the end and why) are gathered into OpenAI's answer, or sent
as chunks: `data: {chunk}` per piece, the finish_reason in each choice's last chunk, a usage
chunk where the request asks for it (stream_options.include_usage, as OpenAI sends it), then
`data: [DONE]`. Chat formats the messages with the run's chat template, or with
the plain one (each message as "ROLE:\ncontent" and a blank line, then "ASSISTANT:\n"; the
answer ends at a blank line) for a run trained on plain text. An answer also ends, with
finish_reason "stop", at the model's end-of-sequence ids (an imported checkpoint's eos_ids).

A prompt longer than the context could hold at MAX_CHARS_PER_TOKEN characters a token is
refused before it is tokenized; templates and tokenizers run in a worker thread, never on the
event loop. A request for more sequences (prompts x n) than the engine queues is a 400. When
the client goes away, streamed or not, its sequences leave the engine (Engine.cancel).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..infer.generate import Sampling
from ..modalities.chat import PLAIN_STOP, PLAIN_TEMPLATE, render
from .engine import Job, QueueFull
from .gate import ApiError, error_body
from .schemas import MAX_STOPS, ChatRequest, CompletionRequest

# no tokenizer served here fits more characters than this in one token over a whole prompt
# (a long token is a run of spaces or dashes): a longer prompt cannot fit the context, and is
# refused without tokenizing it
MAX_CHARS_PER_TOKEN = 64


class _Gone(Exception):
    """The client of a whole (not streamed) answer went away."""


def add_text_routes(app: FastAPI, models, metrics) -> None:
    """POST /v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions", tags=["text"])
    async def completions(body: CompletionRequest, request: Request):
        served = models.get(body.model, "completions")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt",
                           param="prompt")
        _check_stream_options(body)
        gen = Generation(served, metrics, body, body.max_tokens, _stops(body.stop),
                         logprobs=body.logprobs, chat=False)
        gen.check_rows(len(prompts) * body.n, f"{len(prompts)} prompts x n={body.n}",
                       "prompt" if len(prompts) > 1 else "n")
        encoded = await run_in_threadpool(lambda: [_encode(served, p) for p in prompts])
        jobs = gen.start([ids for ids in encoded for _ in range(body.n)])
        echo = [p for p in prompts for _ in range(body.n)] if body.echo else None
        if body.stream:
            return _sse(gen.stream_completions(jobs, request, echo))
        return await gen.complete_completions(jobs, request, sum(len(e) for e in encoded),
                                              echo)

    @app.post("/v1/chat/completions", tags=["text"])
    async def chat(body: ChatRequest, request: Request):
        served = models.get(body.model, "chat")
        _check_stream_options(body)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content or [])} for m in body.messages]
        task = served.run.task
        stops = _stops(body.stop)
        _check_length(served, sum(len(m["content"] or "") for m in messages), "messages")
        if served.run.has_chat_template:
            def prompt_of():
                return task.chat_prompt(messages)
            stops += list(task.config.chat_stop)
        else:
            def prompt_of():
                return render(PLAIN_TEMPLATE, messages, add_generation_prompt=True)
            stops += list(PLAIN_STOP)
        ids = await run_in_threadpool(lambda: _encode(served, prompt_of(), "messages"))
        limit = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        gen = Generation(served, metrics, body, limit, stops, logprobs=top, chat=True)
        gen.check_rows(body.n, f"n={body.n}", "n")
        jobs = gen.start([ids] * body.n)
        if body.stream:
            return _sse(gen.stream_chat(jobs, request))
        return await gen.complete_chat(jobs, request, len(ids))


def _check_stream_options(body) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true; set "
                       "\"stream\": true or leave stream_options out", param="stream_options")


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop has {len(stops)} strings; give at most {MAX_STOPS}",
                       param="stop")
    return [s for s in stops if s]


def _check_length(served, chars: int, param: str) -> None:
    """Refuse a prompt of `chars` characters that cannot fit the context at any tokenizer's
    MAX_CHARS_PER_TOKEN, before anything tokenizes it."""
    context = served.run.configs["model"].context
    most = context * MAX_CHARS_PER_TOKEN
    if chars > most:
        raise ApiError(400, f"the prompt has {chars:,} characters; this model's context of "
                       f"{context} tokens holds at most {most:,} ({MAX_CHARS_PER_TOKEN} a "
                       "token): shorten it", param=param, code="context_length_exceeded")


def _encode(served, prompt: str, param: str = "prompt") -> list[int]:
    """The prompt's ids: a chat template's rendering without the tokenizer's own special tokens
    (the template writes its BOS), any other prompt with them (TextTask.prompt_ids). CPU-bound:
    call it in a worker thread."""
    _check_length(served, len(prompt), param)
    ids = served.run.task.prompt_ids(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty (or holds no character this model knows); "
                       "give at least one", param=param)
    context = served.run.configs["model"].context
    if len(ids) >= context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                       f"{context}, so it takes at most {context - 1}", param=param,
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

    def __init__(self, served, metrics, body, max_tokens: int | None,
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
        task = served.run.task  # answers end at the model's end-of-sequence ids too
        self.end_ids, self.specials = task.config.eos_ids, task.special_texts

    def check_rows(self, count: int, what: str, param: str) -> None:
        """Refuse a request of more sequences than the engine ever queues (400, not a 429
        that retrying cannot cure)."""
        most = self.served.engine.max_queue
        if count > most:
            raise ApiError(400, f"this request asks for {count} sequences ({what}); this server "
                           f"takes at most {most} in one request (--max-queue): send fewer "
                           "prompts or a smaller n", param=param, code="too_many_sequences")

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
                            end_ids=self.end_ids, specials=self.specials,
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
            if event["type"] == "gone":
                raise _Gone
            yield i, event

    async def _watch(self, request: Request, jobs: list[Job]) -> None:
        """Wait until the client goes away; then free its jobs' rows and end events()."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.served.engine.cancel(jobs)
        self.queue.put_nowait((None, {"type": "gone"}))

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

    async def _gather(self, jobs, request: Request):
        """The jobs' texts, finish reasons, log-probabilities and completion tokens; 499 (an
        answer nobody reads) if the client goes away first, its rows freed."""
        n = len(jobs)
        texts, finish = [""] * n, [None] * n
        lps = [[] for _ in range(n)]
        completion = 0
        watch = asyncio.ensure_future(self._watch(request, jobs))
        try:
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
        except _Gone:
            raise ApiError(499, "the client closed the connection before the answer",
                           code="client_closed") from None
        finally:
            watch.cancel()
        return texts, finish, lps, completion

    async def complete_completions(self, jobs, request: Request, prompt_tokens: int, echo):
        texts, finish, lps, completion = await self._gather(jobs, request)
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

    async def complete_chat(self, jobs, request: Request, prompt_tokens: int):
        texts, finish, lps, completion = await self._gather(jobs, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": ({"content": [self._chat_logprob(e) for e in lps[i]]}
                                 if self.logprobs is not None else None),
                    "finish_reason": finish[i]} for i, text in enumerate(texts)]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.served.name, "choices": choices,
                "usage": self.usage(prompt_tokens, completion)}

    def _head(self, kind: str) -> dict:
        head = {"id": self.id, "object": kind, "created": self.created,
                "model": self.served.name}
        if self.include_usage:  # OpenAI: every chunk has usage, null until the last
            head["usage"] = None
        return head

    @property
    def include_usage(self) -> bool:
        options = self.body.stream_options
        return bool(options and options.include_usage)

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
            if self.include_usage:
                yield _chunk({**head, "choices": [],
                              "usage": self.usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"
        finally:  # the client may have gone: free the rows
            self.served.engine.cancel(jobs)

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
            if self.include_usage:
                yield _chunk({**head, "choices": [],
                              "usage": self.usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"
        finally:
            self.served.engine.cancel(jobs)
