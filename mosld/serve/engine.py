"""The batching engine: one thread owns the model and decodes the requests that arrive together as one batch.

Requests are queued from the event loop (``Engine.submit``); the engine thread takes the first one waiting, then
every other one that arrives within ``batch_window`` seconds (up to ``max_batch`` rows), and runs them through the
one decoder (``mosld.evaluation.decoding.decode_steps``) on a shared KV cache. Each row has its own options, so a
batch mixes greedy and sampled requests, budgets and stop strings; the decoder masks padding and stopped rows, so
a request's tokens do not depend on the rest of its batch. Requests that arrive while a batch decodes wait for the
next one (static batching: a decoding batch takes no new rows, since its rows share one cache).

Each step's updates go back to the requests' event loops as they come (``loop.call_soon_threadsafe``), so a
streamed answer is sent token by token; a request whose client went away is marked cancelled and the decoder
drops its row at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from mosld.evaluation.decoding import DecodeOptions, RowUpdate, decode_steps, left_pad


@dataclass
class BatchStarted:
    """Sent to every request of a batch before its first step: how many rows decode together."""

    rows: int


@dataclass
class EngineError:
    """Sent to the requests of a batch whose decoding raised: the message (the engine goes on with the next)."""

    message: str


Event = BatchStarted | RowUpdate | EngineError


@dataclass
class Job:
    """One request on its way through the engine; its events arrive on ``events`` in the submitting loop."""

    prompt: list[int]
    options: DecodeOptions
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set from the event loop when the client goes away; read by the engine thread

    def send(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down): nobody to tell
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class EngineStats:
    """What the engine has done, for the health route."""

    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    cancelled: int = 0  # rows stopped because their client went away
    errors: int = 0


class Engine:
    """A thread that decodes queued requests in batches with the one decoder.

    Args:
        model: The causal LM (adapters injected, eval mode, on its device).
        tokenizer: Its tokenizer.
        max_batch: Most requests decoded together.
        batch_window: Seconds the engine waits after a batch's first request for others to join it.
        autocast: ``torch.autocast`` dtype for mixed precision (as in training), or ``None`` for the model's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch: int = 16,
        batch_window: float = 0.01,
        autocast: torch.dtype | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: expected a positive number, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_window, self.autocast = max_batch, batch_window, autocast
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats = EngineStats()
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mosld-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the batch it decodes (requests still queued are not answered)."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, prompt: list[int], options: DecodeOptions, stream: bool = False) -> Job:
        """Queue a request; call from the event loop whose queue receives its events."""
        job = Job(list(prompt), options, stream, asyncio.get_running_loop())
        self._pending.put(job)
        return job

    def _next_batch(self) -> list[Job] | None:
        first = self._pending.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.batch_window
        while len(jobs) < self.max_batch:
            try:  # what is already queued joins at once; then wait out the window for more
                job = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._pending.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            jobs = [job for job in jobs if not job.cancelled]
            if jobs:
                self._decode(jobs)

    def _decode(self, jobs: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        for job in jobs:
            job.send(BatchStarted(len(jobs)))
        batch = left_pad([job.prompt for job in jobs], self.pad_id)
        mixed = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        cancelled: Callable[[int], bool] = lambda row: jobs[row].cancelled  # noqa: E731
        try:
            with mixed:
                steps = decode_steps(
                    self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                    [job.options for job in jobs], text_deltas=any(job.stream for job in jobs), cancelled=cancelled,
                )  # fmt: skip
                for updates in steps:
                    for update in updates:
                        self.stats.cancelled += update.finish_reason == "cancelled"
                        jobs[update.row].send(update)
        except Exception as err:  # a failed batch must not take the server down: its requests get the error
            self.stats.errors += 1
            for job in jobs:
                job.send(EngineError(f"{type(err).__name__}: {err}"))
