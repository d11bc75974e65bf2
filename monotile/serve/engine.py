"""Continuous batching: many generation requests decoded together on one model.

Each running request owns one row of a KV cache of `max_batch` rows. Between two decoding
steps, waiting requests join (each prompt is prefilled alone into the next free row) and
finished ones leave (the last running row is copied into the freed one, so rows 0..n-1 are
always the running ones). One step feeds every running row its last token at its own position:

    logits_b = model(x_b | the keys and values of row b at positions 0..pos_b),   b < n

in one batch. A decoding step at batch 1 is bound by reading the weights from memory, so n rows
cost little more than one: the weights are read once for all of them (bench/serve.py).

The engine's thread lives while there is work: it ends after LINGER seconds with nothing to do,
and the next submit starts another. PyTorch's CPU operators run on OpenMP, whose runtime (GNU
libgomp) gives each thread that starts a parallel region a pool of worker threads of its own,
kept until that thread ends; once the pools hold more threads than there are CPUs, every
worker sleeps between regions instead of spinning, and each of the ~150 regions of a SmolLM2
step then waits for a worker to wake: 10.7 ms a step instead of 4.0 on 2 cores (an idle engine
of another model, or the thread that loaded the models, is enough). A thread that ends gives
its pool back.

Each request keeps its own sampling rules, seed and stop strings, so it gets the same tokens
alone or batched with others (tests/test_serve.py). A request ends ("stop") at a stop string or
at one of the model's end-of-sequence ids (Job.end_ids), whose text is not given out. A request
whose client went away (Engine.cancel) leaves the queue at once and its row at the next step.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from ..infer.generate import Sampling, TextPieces, apply_presence_frequency, next_token


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the server answers 429."""


@dataclass(eq=False)
class Job:
    """One sequence to generate. `emit` is called from the engine's thread with events:
    {"type": "token", "text", "token", "logprob", "top"}, then {"type": "done",
    "finish_reason", "prompt_tokens", "completion_tokens"} (or {"type": "error", "message"})."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[dict], None]
    presence: float = 0.0
    frequency: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    end_ids: tuple[int, ...] = ()  # the model's end-of-sequence ids: the answer ends, unshown
    specials: dict[int, str] = field(default_factory=dict)  # special ids' texts, for `stop`
    logprobs: int | None = None  # how many alternatives per token; None: no log-probabilities
    cancelled: bool = False      # set by Engine.cancel when the client goes away


@dataclass(eq=False)
class _Row:
    job: Job
    seq: list[int]            # prompt and generated ids
    pos: int                  # tokens held in the cache row
    generator: torch.Generator
    counts: torch.Tensor      # (V,) how often each token was generated
    pieces: TextPieces
    generated: int = 0
    next: int = 0             # the sampled token, fed at the next step


LINGER = 1.0  # seconds an idle engine's thread waits for work before it ends


class Engine:
    """A thread that owns `model` (a LanguageModel) and decodes all submitted jobs together."""

    def __init__(self, model, decode, *, max_batch: int = 16, max_queue: int = 64,
                 name: str = "model", on_step: Callable[[int], None] | None = None,
                 on_cancel: Callable[[], None] | None = None):
        """`on_step(rows)` is called after each decoding step, `on_cancel()` for each request
        dropped because its client went away (the server's metrics)."""
        self.model, self.decode = model.eval(), decode
        self.on_step, self.on_cancel = on_step, on_cancel
        self.context = model.trunk.cfg.context
        self.vocab = model.trunk.cfg.vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = model.trunk.make_cache(max_batch)
        self.device = next(model.parameters()).device  # ids go there; sampling stays on CPU
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self.name = name
        self.thread: threading.Thread | None = None  # while there is work (_wake)

    # ---- the server's side --------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none: QueueFull if they do not fit)."""
        with self.cv:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this "
                                f"server queues is {self.max_queue}; retry shortly")
            self.waiting.extend(jobs)
            self._wake()

    def cancel(self, jobs: list[Job]) -> None:
        """Drop `jobs` (their client went away): those waiting leave the queue now, running ones
        free their rows at the next step; finished ones are left as they are."""
        with self.cv:
            for job in jobs:
                job.cancelled = True
            waiting = len(self.waiting)
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
            for _ in range(waiting - len(self.waiting)):
                if self.on_cancel:
                    self.on_cancel()
            self.cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
            thread = self.thread
        if thread is not None:
            thread.join(timeout=10)

    def _wake(self) -> None:
        """Under self.cv: tell the thread there is work, or start one where none runs."""
        if self.thread is None and not self.closed:
            self.thread = threading.Thread(target=self._loop, daemon=True,
                                           name=f"engine-{self.name}")
            self.thread.start()
        self.cv.notify()

    # ---- the engine's thread -------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    if not (self.waiting or self.rows or self.closed):
                        self.cv.wait_for(lambda: self.waiting or self.closed, timeout=LINGER)
                    if self.closed or not (self.waiting or self.rows):
                        self.thread = None  # the next submit starts another
                        return
                    admit = []
                    while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                        job = self.waiting.popleft()
                        if not job.cancelled:
                            admit.append(job)
                try:
                    for job in admit:
                        if not job.cancelled:
                            self._prefill(job)
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug, not a client's mistake: fail the running jobs
                    for row in self.rows:
                        row.job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
                    self.rows.clear()

    def _prefill(self, job: Job) -> None:
        b = len(self.rows)
        ids = torch.tensor([job.prompt], device=self.device)
        logits = self.model(ids, cache=[c.rows(b, b + 1) for c in self.cache], pos=0,
                            last=True)[0, -1]
        logits = logits.cpu()
        generator = torch.Generator()
        generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        row = _Row(job, list(job.prompt), len(job.prompt), generator,
                   torch.zeros(self.vocab, dtype=torch.long),
                   TextPieces(self.decode, job.stop, specials=job.specials, end_ids=job.end_ids))
        self.rows.append(row)
        if self._take(row, logits):
            self.rows.pop()

    def _step(self) -> None:
        n = len(self.rows)
        tokens = torch.tensor([[row.next] for row in self.rows], device=self.device)
        positions = {row.pos for row in self.rows}
        # rows at one position (one client, or prompts of one length) take the plain step;
        # others each their own position, behind a key mask
        pos = (positions.pop() if len(positions) == 1 else
               torch.tensor([row.pos for row in self.rows], device=self.device))
        logits = self.model(tokens, cache=[c.rows(0, n) for c in self.cache], pos=pos)[:, 0]
        logits = logits.cpu()
        self.steps += 1
        if self.on_step:
            self.on_step(n)
        done = []
        for i, row in enumerate(self.rows):
            row.pos += 1
            if self._take(row, logits[i]):
                done.append(i)
        for i in reversed(done):  # keep rows 0..n-1 the running ones
            last = len(self.rows) - 1
            if i != last:
                for c in self.cache:  # the positions it holds: the rest is masked
                    c.move_row(last, i, self.rows[last].pos)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample the row's next token from its logits (V,), emit it; True when the row ends.
        A failure ends this row alone, with an error event: the others decode on."""
        job = row.job
        if job.cancelled:
            if self.on_cancel:
                self.on_cancel()
            return True
        try:
            return self._sample(row, logits)
        except Exception as e:
            job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
            return True

    def _sample(self, row: _Row, logits: torch.Tensor) -> bool:
        job = row.job
        logits = logits.float()
        shaped = apply_presence_frequency(logits, row.counts, job.presence, job.frequency)
        seen = torch.tensor([row.seq]) if job.sampling.repetition_penalty != 1 else None
        token = int(next_token(shaped[None], seen, job.sampling, row.generator)[0])
        event = {"type": "token", "token": token}
        if job.logprobs is not None:
            logp = torch.log_softmax(logits, -1)
            event["logprob"] = float(logp[token])
            top = logp.topk(min(job.logprobs, logp.numel())) if job.logprobs else None
            event["top"] = ([] if top is None else
                            list(zip(top.indices.tolist(), top.values.tolist())))
        row.counts[token] += 1
        row.seq.append(token)
        row.generated += 1
        row.next = token
        event["text"] = row.pieces.push(token)
        job.emit(event)
        finish = ("stop" if row.pieces.stopped else
                  "length" if row.generated >= job.max_tokens or row.pos >= self.context
                  else None)
        if finish is None:
            return False
        rest = row.pieces.flush()
        if rest:
            job.emit({"type": "token", "text": rest, "token": None})
        job.emit({"type": "done", "finish_reason": finish, "prompt_tokens": len(job.prompt),
                  "completion_tokens": row.generated, "time": time.monotonic()})
        return True
