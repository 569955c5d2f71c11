"""The GPU runner: one worker per device takes batches from the fair queue and runs the pipeline on
that device's own thread, so the event loop (and Discord's heartbeat) never waits on the GPU.

Progress and results come back to the loop with `loop.call_soon_threadsafe`. The device never
waits for the loop between batches: while one batch runs, the worker already takes the next from
the queue, awaits its `on_started` hooks and queues it on the device thread, which starts it the
moment the running one returns (one batch ahead, no more: the queue still decides who goes next,
only earlier). Between the running batch's steps the pipeline is told the queued one
(`Pipeline.prepare`), so its text encoding and start noise are on the device before it starts.
Results are handed to `on_finished` in tasks of their own, so storing and posting
them never keeps the device waiting either. The worker thread survives anything a pipeline
raises: an out-of-memory error frees memory and retries the batch split in halves down to one job
(and the limit it teaches splits the batch queued behind before it runs), any other exception is
narrowed down the same way so it fails only the job that caused it. Every job a worker takes
completes exactly once (`on_finished`), except jobs interrupted by shutdown (the running batch and
the one behind it): they stay running, and the restore at start-up re-runs them.
A job cancelled while its batch runs completes as soon as the pipeline first sees it cancelled
(its owner is told then, not when its batch-mates finish); a pipeline may drop it from the batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch

from generation.images import ImageInputError
from generation.model_cache import ModelCache
from generation.queue import FairQueue, Job
from generation.request import JobState
from generation.settings import QueueSettings

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

M = TypeVar("M")

#: After the grace period, how long shutdown waits for a pipeline to notice it was cancelled.
ABORT_WAIT_S = 10.0
#: Jobs whose results may be in delivery at once (each holds its images in memory until posted):
#: with this many, a worker waits for one to finish before it takes its next batch.
MAX_DELIVERIES = 16
#: Batches a worker queues on its device thread behind the running one.
PREFETCH_BATCHES = 1


@dataclass(frozen=True)
class JobResult:
    """What became of one job: its images (PIL images, encoded by whoever stores them, off the
    device thread; the runner never looks inside) and their seeds, or `error`, a message for the user."""

    job_id: str
    images: tuple[Image, ...] = ()
    seeds: tuple[int, ...] = ()
    error: str | None = None


#: progress(job_id, step, total, preview or None), called by the pipeline after each step.
Progress = Callable[[str, int, int, Any], None]


class Pipeline(Protocol[M]):
    """What the runner needs from the diffusion pipeline."""

    def run(
        self,
        model: M,
        device: str,
        batch: list[Job],
        progress: Progress,
        cancelled: Callable[[str], bool],
    ) -> list[JobResult]:
        """Run `batch` (jobs with equal `batch_key`, so one model, size, step count and sampler)
        on `device` with `model`, on the calling thread, and return one result per job.

        Check `cancelled(job_id)` before every step; once it is true for every job of the batch,
        stop (return or raise). Results of cancelled jobs are discarded, so a pipeline may also
        drop a cancelled job from the batch. Raise `torch.OutOfMemoryError` when the batch does
        not fit; report a failure of one job as its `JobResult.error`. A raised
        `generation.images.ImageInputError` tells the user its message; any other exception is
        logged and the user told of an internal error."""
        ...

    def prepare(self, model: M, device: str, batch: list[Job]) -> None:
        """Start on `batch`, the one queued to run next with the same model, between the running
        batch's steps (on the device thread): queue work its `run` would begin with, as far as that
        cannot change the running batch. May do nothing; what it raises is ignored (the run meets
        the same problem and reports it)."""
        ...


@dataclass
class _Outcome:
    job: Job
    #: None: interrupted by shutdown, left running for the restart.
    state: JobState | None
    result: JobResult


@dataclass
class _Report:
    """What a batch came to, handed from the worker thread back to the loop."""

    outcomes: list[_Outcome] = field(default_factory=list)
    #: Pipeline calls whose every job came out done, and their seconds: the measured rates.
    timed: list[tuple[list[Job], float]] = field(default_factory=list)


_Call = tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]


class _DeviceThread:
    """A daemon thread running the calls handed to it one at a time; each call's outcome is set
    on its asyncio future from the loop thread."""

    def __init__(self, name: str) -> None:
        self._inbox: SimpleQueue[_Call | None] = SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put((fn, future, loop))
        return future

    def close(self) -> None:
        self._inbox.put(None)

    def _serve(self) -> None:
        while (item := self._inbox.get()) is not None:
            fn, future, loop = item
            try:
                outcome, error = fn(), None
            except BaseException as exc:  # the thread outlives anything the call raises
                outcome, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, error)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                log.warning("event loop closed before a device call returned")


def _settle(future: asyncio.Future, outcome: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(outcome)
    else:
        future.set_exception(error)


@dataclass
class _Worker(Generic[M]):
    device: str
    thread: _DeviceThread
    cache: ModelCache[M]
    #: Work pixels per batch learned from out-of-memory errors (None: no limit seen yet); written
    #: by the device thread the moment it learns it, so a batch queued behind is split to fit.
    max_pixels: float | None = None
    #: Seconds the device spent in pipeline calls since the start.
    busy_s: float = 0.0
    task: asyncio.Task | None = None
    #: Between taking a batch and queueing it on the device thread: not to be cancelled.
    busy: bool = False
    #: Batches queued on the device thread (the running one and those behind it), until settled.
    batches: set[asyncio.Task] = field(default_factory=set)
    #: The jobs of the batches queued on the device thread that have not started, in order.
    queued: deque[list[Job]] = field(default_factory=deque)


class Runner(Generic[M]):
    """Workers for `devices`, fed by `queue`. Use `start()`, then `shutdown(grace_s)`.

    `load_model(name, device)` builds a model, `model_size(model)` gives its bytes, and each
    device keeps loaded models by LRU under `model_budget_bytes`. `queue` must know the same
    devices (its ETAs simulate one server per device). The hooks are awaited on the loop; an
    exception in a hook is logged and never stops a worker. `on_progress` gets the latest step of
    a job (steps are skipped while the previous call for that job is still running).

    The worker thread reads `Job.cancel_reason` while the loop may set it: a single attribute
    store, atomic under the GIL, so the next step sees it."""

    def __init__(
        self,
        queue: FairQueue,
        pipeline: Pipeline[M],
        devices: Sequence[str],
        settings: QueueSettings,
        *,
        load_model: Callable[[str, str], M],
        model_size: Callable[[M], int],
        model_budget_bytes: int,
        on_started: Callable[[Job], Awaitable[None]] | None = None,
        on_progress: Callable[[Job, int, int, Any], Awaitable[None]] | None = None,
        on_finished: Callable[[Job, JobResult], Awaitable[None]] | None = None,
    ) -> None:
        self._queue = queue
        self._pipeline = pipeline
        self._settings = settings
        self._on_started = on_started
        self._on_progress = on_progress
        self._on_finished = on_finished
        self._workers = [
            _Worker(
                device,
                _DeviceThread(f"atelier-{device}"),
                ModelCache(_on(device, load_model), model_size, model_budget_bytes),
            )
            for device in devices
        ]
        self._latest_progress: dict[str, tuple[int, int, Any]] = {}
        self._progress_tasks: dict[str, asyncio.Task] = {}
        #: Results being handed to `on_finished` while the workers run on.
        self._deliveries: set[asyncio.Task] = set()
        self._stopping = False
        #: Set after the shutdown grace period: every running job reads as cancelled.
        self._aborting = threading.Event()
        #: Jobs of batches queued on a device thread that has not started them yet: a cancel
        #: completes them at once (`cancelled`), whichever side claims a job first owns it.
        self._waiting: dict[str, tuple[_Worker[M], Job]] = {}
        self._claims = threading.Lock()

    def start(self, preload: str | None = None) -> None:
        """Start the workers. With `preload`, each device loads that model before its first batch
        (and so builds its compiled graphs in the background from the start), not when a job first
        asks for it."""
        for worker in self._workers:
            worker.thread.thread.start()
            if preload is not None:
                worker.thread.call(partial(self._preload, worker, preload))
            worker.task = asyncio.create_task(self._serve(worker), name=f"runner {worker.device}")

    def busy_seconds(self) -> dict[str, float]:
        """Seconds each device has spent in pipeline calls since `start()` (for utilisation)."""
        return {worker.device: worker.busy_s for worker in self._workers}

    async def shutdown(self, grace_s: float) -> None:
        """Take no new batches; give the running one and the one queued behind it `grace_s`
        seconds, then cancel them (their jobs stay running, to be re-run after the restart); stop
        the threads. Results still being delivered get `grace_s` more seconds (storage keeps what
        was not told, for the restart)."""
        self._stopping = True
        for worker in self._workers:
            if not worker.busy and worker.task is not None:
                worker.task.cancel()
        served = asyncio.ensure_future(self._served())
        _, pending = await asyncio.wait({served}, timeout=grace_s)
        if pending:
            self._aborting.set()
            _, stuck = await asyncio.wait(pending, timeout=ABORT_WAIT_S)
            if stuck:
                tasks = [w.task for w in self._workers if w.task is not None]
                for task in [*tasks, *(t for w in self._workers for t in w.batches), served]:
                    if not task.done():
                        log.error("a pipeline ignored cancellation at shutdown: %s", task.get_name())
                        task.cancel()
        for worker in self._workers:
            worker.thread.close()
        if self._deliveries:
            _, late = await asyncio.wait(set(self._deliveries), timeout=grace_s)
            for task in late:
                log.error("a result was still being delivered at shutdown: %s", task.get_name())
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # their clean-up, before storage closes

    async def _served(self) -> None:
        """Return once the workers stopped and every batch they queued is settled."""
        await asyncio.gather(*(w.task for w in self._workers if w.task is not None), return_exceptions=True)
        while batches := {task for worker in self._workers for task in worker.batches}:
            await asyncio.wait(batches)

    # -- the loop side --

    async def _serve(self, worker: _Worker[M]) -> None:
        """Take batches and queue them on the device thread, one ahead of the running one."""
        settings, loop = self._settings, asyncio.get_running_loop()
        while not self._stopping:
            while len(worker.batches) > PREFETCH_BATCHES:
                await asyncio.wait(set(worker.batches), return_when=asyncio.FIRST_COMPLETED)
            while len(self._deliveries) >= MAX_DELIVERIES:  # slow posting holds the device back
                await asyncio.wait(set(self._deliveries), return_when=asyncio.FIRST_COMPLETED)
            batch = await self._queue.wait_batch(
                worker.device, settings.max_batch_images, worker.max_pixels
            )
            worker.busy = True
            for job in batch:
                await self._hook(self._on_started, job)
            with self._claims:
                self._waiting.update((job.id, (worker, job)) for job in batch)
            worker.queued.append(batch)
            ran = worker.thread.call(partial(self._run, worker, batch, loop))
            settling = asyncio.create_task(self._settle(worker, batch, ran), name=f"batch {batch[0].id}")
            worker.batches.add(settling)
            settling.add_done_callback(worker.batches.discard)
            worker.busy = False

    def cancelled(self, job: Job) -> bool:
        """Complete a cancelled job now if its batch waits behind the running one (the device
        thread will skip it); False when it is not waiting (it runs: it stops at its next step)."""
        with self._claims:
            waiting = self._waiting.pop(job.id, None)
        if waiting is None:
            return False
        worker, job = waiting
        self._complete(worker, _Outcome(job, JobState.CANCELLED, JobResult(job.id, error=job.cancel_reason)))
        return True

    async def _settle(self, worker: _Worker[M], batch: list[Job], ran: asyncio.Future) -> None:
        """Once the device thread ran `batch`: record its rates, finish its jobs, deliver their results."""
        try:
            report = await ran
        except Exception:  # a bug of ours: fail the batch, keep serving
            log.exception("runner %s crashed on batch %s", worker.device, [j.id for j in batch])
            report = _Report([_failed(job, _INTERNAL) for job in batch])
        for jobs, seconds in report.timed:
            try:
                await self._queue.record_batch(worker.device, jobs, seconds)
            except Exception:  # storing a rate: the ETA may forget it, nothing else suffers
                log.exception("runner %s could not record the rate of jobs %s", worker.device,
                              [j.id for j in jobs])
        for outcome in report.outcomes:
            self._complete(worker, outcome)

    def _complete(self, worker: _Worker[M], outcome: _Outcome) -> None:
        """Finish a job in the queue and deliver its result in a task of its own."""
        try:
            if outcome.state is not None:
                self._queue.finish(outcome.job, outcome.state)
        except Exception:  # a bug of ours in one job's bookkeeping: it is still answered
            log.exception("runner %s could not finish job %s", worker.device, outcome.job.id)
        delivery = asyncio.create_task(self._deliver(outcome), name=f"deliver {outcome.job.id}")
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    async def _deliver(self, outcome: _Outcome) -> None:
        """The job's last progress report, then its result (unless a shutdown interrupted it)."""
        job = outcome.job
        if (pump := self._progress_tasks.get(job.id)) is not None:
            await pump
        self._latest_progress.pop(job.id, None)
        if outcome.state is not None:
            await self._hook(self._on_finished, job, outcome.result)

    def _progress(self, job: Job, step: int, total: int, preview: Any) -> None:
        self._latest_progress[job.id] = (step, total, preview)
        if job.id not in self._progress_tasks:
            self._progress_tasks[job.id] = asyncio.create_task(self._pump_progress(job))

    async def _pump_progress(self, job: Job) -> None:
        while (update := self._latest_progress.pop(job.id, None)) is not None:
            await self._hook(self._on_progress, job, *update)
        del self._progress_tasks[job.id]

    @staticmethod
    async def _hook(hook: Callable[..., Awaitable[None]] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            await hook(*args)
        except Exception:
            log.exception("runner hook %s failed", getattr(hook, "__name__", hook))

    # -- the device thread side --

    @staticmethod
    def _preload(worker: _Worker[M], name: str) -> None:
        try:
            worker.cache.get(name)
        except Exception:  # a job for it will try again and tell its owner what went wrong
            log.exception("runner %s could not load %s at start", worker.device, name)

    def _run(
        self, worker: _Worker[M], batch: list[Job], loop: asyncio.AbstractEventLoop
    ) -> _Report:
        """Run `batch`, splitting a part that raised in halves, until every job has an outcome.
        Each part's jobs get the whole time limit from the moment that part starts."""
        timeout = self._settings.job_timeout_s
        deadline = math.inf
        by_id = {job.id: job for job in batch}
        report = _Report()
        worker.queued.popleft()  # this batch: batches run in the order they were queued
        ahead: list[Job] | None = None  # the batch behind this one, once prepared
        #: Jobs completed before their end: cancelled while waiting behind the last batch (the
        #: loop told them), or mid-batch (sent to the loop from here).
        with self._claims:
            told = {job.id for job in batch if self._waiting.pop(job.id, None) is None}

        def stopped(job: Job) -> _Outcome | None:
            if self._aborting.is_set():
                return _Outcome(job, None, JobResult(job.id, error="interrupted by a shutdown"))
            if job.cancel_reason is not None:
                return _Outcome(job, JobState.CANCELLED, JobResult(job.id, error=job.cancel_reason))
            if time.monotonic() > deadline:
                return _failed(
                    job, f"took longer than {timeout:g} s, the time limit, and was stopped"
                )
            return None

        def tell(outcome: _Outcome) -> None:
            """Complete a cancelled job now, while its batch-mates run on."""
            told.add(outcome.job.id)
            loop.call_soon_threadsafe(self._complete, worker, outcome)

        def cancelled(job_id: str) -> bool:
            outcome = stopped(by_id[job_id])
            if outcome is not None and outcome.state is JobState.CANCELLED and job_id not in told:
                tell(outcome)
            return outcome is not None

        def progress(job_id: str, step: int, total: int, preview: Any) -> None:
            nonlocal ahead
            if job_id not in told:  # a job completed mid-batch shows no more progress
                loop.call_soon_threadsafe(self._progress, by_id[job_id], step, total, preview)
            if worker.queued and worker.queued[0] is not ahead:  # between steps: start on the next batch
                ahead = worker.queued[0]
                self._prepare(worker, model_name, model, ahead)

        parts = _fitting(batch, worker.max_pixels)[::-1]  # a batch taken before an OOM taught the limit
        while parts:
            live, deadline = [], math.inf  # jobs that wait for their part are not timed
            for job in parts.pop():
                if job.id in told:
                    continue
                if (outcome := stopped(job)) is None:
                    live.append(job)
                elif outcome.state is JobState.CANCELLED:
                    tell(outcome)
                else:
                    report.outcomes.append(outcome)
            if not live:
                continue
            model_name, out_of_memory, deadline = live[0].request.model, False, time.monotonic() + timeout
            began = math.nan
            try:
                model = worker.cache.get(model_name)
                began = time.monotonic()
                results = self._pipeline.run(model, worker.device, live, progress, cancelled)
            except torch.OutOfMemoryError:
                log.warning("out of memory on %s with jobs %s", worker.device, [j.id for j in live])
                out_of_memory = True
                error = "ran out of GPU memory even alone; try a smaller size or fewer images"
            except ImageInputError as exc:  # the user's input: its message is for them as it is
                error = str(exc)
            except Exception:
                log.exception("jobs %s failed on %s", [j.id for j in live], worker.device)
                error = _INTERNAL
            else:
                seconds = time.monotonic() - began
                done = self._collect([j for j in live if j.id not in told],
                                     {r.job_id: r for r in results}, stopped, report)
                if done == len(live):  # time spent on cancelled or failed work says nothing of speed
                    report.timed.append((live, seconds))
                continue
            finally:
                if not math.isnan(began):
                    worker.busy_s += time.monotonic() - began
            if out_of_memory:  # outside the except block, so the traceback no longer pins tensors
                self._free_memory(worker, model_name)
                if len(live) > 1:
                    half_pixels = _pixels(live) / 2
                    worker.max_pixels = min(worker.max_pixels or half_pixels, half_pixels)
            live = [j for j in live if j.id not in told]
            if len(live) == 1:
                report.outcomes.append(stopped(live[0]) or _failed(live[0], error))
            elif len(live) > 1:
                half = (len(live) + 1) // 2
                parts += [live[half:], live[:half]]  # the first half runs first
        return report

    def _prepare(self, worker: _Worker[M], model_name: str, model: M, batch: list[Job]) -> None:
        """Have the pipeline start on `batch`, queued behind the running one, as it will run: its
        first part, less the jobs already cancelled. Only with the running model: loading another
        now would take the running batch's memory."""
        with self._claims:
            jobs = [job for job in batch if job.id in self._waiting and job.cancel_reason is None]
        if not jobs:
            return
        first = _fitting(jobs, worker.max_pixels)[0]
        if first[0].request.model != model_name:
            return
        try:
            self._pipeline.prepare(model, worker.device, first)
        except Exception:  # its run meets the same problem and reports it
            log.debug("runner %s could not prepare jobs %s", worker.device, [j.id for j in first], exc_info=True)

    @staticmethod
    def _collect(
        jobs: list[Job],
        results: dict[str, JobResult],
        stopped: Callable[[Job], _Outcome | None],
        report: _Report,
    ) -> int:
        """Outcomes of a pipeline call that returned: a finished image stands unless cancelled.
        Returns how many jobs came out done."""
        done = 0
        for job in jobs:
            result = results.get(job.id)
            if result is not None and result.error is None and job.cancel_reason is None:
                report.outcomes.append(_Outcome(job, JobState.DONE, result))
                done += 1
            else:
                failed = _Outcome(job, JobState.FAILED, result) if result else None
                report.outcomes.append(stopped(job) or failed or _failed(job, _INTERNAL))
        return done

    @staticmethod
    def _free_memory(worker: _Worker[M], keep: str) -> None:
        worker.cache.keep_only(keep)
        if worker.device.startswith("cuda") and torch.cuda.is_available():
            with torch.cuda.device(worker.device):
                torch.cuda.empty_cache()


_INTERNAL = "an internal error stopped this job; it has been logged for the bot's operators"


def _on(device: str, load_model: Callable[[str, str], M]) -> Callable[[str], M]:
    """The loader of one device's cache."""
    return lambda name: load_model(name, device)


def _failed(job: Job, error: str) -> _Outcome:
    return _Outcome(job, JobState.FAILED, JobResult(job.id, error=error))


def _pixels(jobs: list[Job]) -> float:
    """The work pixels of a batch (`GenerationRequest.work_pixels`): what its memory grows with."""
    return sum(j.request.count * j.request.work_pixels for j in jobs)


def _fitting(batch: list[Job], max_pixels: float | None) -> list[list[Job]]:
    """`batch` cut, in order, into parts of at most `max_pixels` work pixels (a job too large
    alone makes a part of its own)."""
    parts: list[list[Job]] = []
    for job in batch:
        if not parts or (max_pixels is not None and _pixels([*parts[-1], job]) > max_pixels):
            parts.append([])
        parts[-1].append(job)
    return parts
