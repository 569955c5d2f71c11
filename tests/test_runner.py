"""The GPU runner with fake pipelines: batching, OOM split, failures, timeouts, cancellation,
shutdown, the model cache, an event loop that stays responsive during a CPU generation, and the
next batch queued on the device thread while the current one runs (also with the real Engine on
the meta device standing in for a GPU)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
import weakref
from dataclasses import dataclass

import pytest
import torch

from generation.engine import Engine
from generation.images import ImageInputError
from generation.model_cache import ModelCache
from generation.queue import FairQueue, Job, Submission
from generation.request import JobState
from generation.request import GenerationRequest
from generation.runner import MAX_DELIVERIES, PREFETCH_BATCHES, JobResult, Runner
from generation.settings import ModelSettings, QueueSettings
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.fixtures.devices import StandInDevice, on_stand_in_device

SETTINGS = QueueSettings(max_queued_per_user=50, max_batch_images=8, job_timeout_s=30)


def request(prompt: str = "a lighthouse", model: str = "sd15", count: int = 1, steps: int = 4) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model=model, steps=steps, guidance=7.0, seed=11, width=512, height=512, count=count
    )


@dataclass
class FakeModel:
    name: str
    device: str


class Painter:
    """Runs `steps` steps per batch (sleeping `step_s` each), reporting progress and stopping once
    every job is cancelled; records each call."""

    def __init__(self, step_s: float = 0.0, steps: int | None = None) -> None:
        self.step_s, self.steps = step_s, steps
        self.calls: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.models: list[tuple[str, list[str]]] = []
        self.saw_cancel: set[str] = set()
        #: (model, job ids, thread) of each `prepare`.
        self.prepared: list[tuple[str, list[str], threading.Thread]] = []

    def prepare(self, model, device, batch):
        self.prepared.append((model.name, [j.id for j in batch], threading.current_thread()))

    def run(self, model, device, batch, progress, cancelled):
        self.calls.append([j.id for j in batch])
        self.threads.append(threading.current_thread())
        self.models.append((model.name, [j.request.model for j in batch]))
        self.paint(batch)
        total = self.steps or batch[0].request.steps
        for step in range(1, total + 1):
            if all(cancelled(j.id) for j in batch):
                self.saw_cancel |= {j.id for j in batch}
                raise RuntimeError("stopped: every job was cancelled")
            time.sleep(self.step_s)
            for job in batch:
                progress(job.id, step, total, None)
        return [JobResult(j.id, images=(f"png:{j.id}".encode(),), seeds=tuple(j.request.seeds())) for j in batch]

    def paint(self, batch: list[Job]) -> None:
        """Where subclasses fail."""


class OutOfMemoryAboveOne(Painter):
    def paint(self, batch):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class ExplodesOnBoom(Painter):
    """A bad input (prompt "boom") and a bug of ours (prompt "bug") each fail only their job."""

    def paint(self, batch):
        if any(j.request.prompt == "boom" for j in batch):
            raise ImageInputError("the init image could not be decoded; send a PNG, JPEG or WebP")
        if any(j.request.prompt == "bug" for j in batch):
            raise ValueError("an index out of range")


class Recorder:
    """The three hooks, recording what they saw."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.progress: dict[str, list[tuple[int, int]]] = {}
        self.finished: list[tuple[Job, JobResult, JobState]] = []
        self.changed = asyncio.Event()

    async def on_started(self, job: Job) -> None:
        self.started.append(job.id)

    async def on_progress(self, job: Job, step: int, total: int, preview) -> None:
        self.progress.setdefault(job.id, []).append((step, total))

    async def on_finished(self, job: Job, result: JobResult) -> None:
        assert all(job.id != j.id for j, _, _ in self.finished), "finished twice"
        self.finished.append((job, result, job.state))
        self.changed.set()

    def result(self, job: Job) -> tuple[JobState, JobResult]:
        (found,) = [(state, result) for j, result, state in self.finished if j.id == job.id]
        return found

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.finished) < n:
                self.changed.clear()
                await self.changed.wait()


def start_runner(queue, pipeline, hooks: Recorder, settings=SETTINGS, budget=100, loads=None) -> Runner:
    def load(name: str, device: str) -> FakeModel:
        if loads is not None:
            loads.append(name)
        return FakeModel(name, device)

    runner = Runner(
        queue, pipeline, ["cpu"], settings,
        load_model=load, model_size=lambda model: 40, model_budget_bytes=budget,
        on_started=hooks.on_started, on_progress=hooks.on_progress, on_finished=hooks.on_finished,
    )
    runner.start()
    return runner


async def submit(queue: FairQueue, owner: int, **kw) -> Job:
    return await queue.submit(Submission(request(**kw), owner, 1))


async def test_a_batch_runs_on_the_device_thread_and_each_job_completes_once():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(), Recorder()
    jobs = [await submit(queue, owner, count=2) for owner in range(3)]
    runner = start_runner(queue, pipeline, hooks)
    await hooks.wait_for(3)
    await runner.shutdown(1)
    assert pipeline.calls == [[j.id for j in jobs]]
    assert pipeline.threads[0].name == "atelier-cpu" and pipeline.threads[0] is not threading.current_thread()
    assert hooks.started == [j.id for j in jobs]
    for job in jobs:
        state, result = hooks.result(job)
        assert state is JobState.DONE and result.images == (f"png:{job.id}".encode(),)
        assert result.seeds == (11, 12)
        assert hooks.progress[job.id][-1] == (4, 4)
        assert [s for s, _ in hooks.progress[job.id]] == sorted(s for s, _ in hooks.progress[job.id])
    assert queue.snapshot().throughput["cpu"] != 10.0  # measured, replacing the initial guess


class SlowDelivery(Recorder):
    """on_finished blocks until `gate` opens: storing and posting results can take seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.delivering: list[str] = []

    async def on_finished(self, job: Job, result: JobResult) -> None:
        self.delivering.append(job.id)
        await self.gate.wait()
        await super().on_finished(job, result)


async def test_the_next_batch_runs_while_the_last_results_are_still_being_delivered():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(), SlowDelivery()
    first, second = await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)  # two batches
    runner = start_runner(queue, pipeline, hooks)
    async with asyncio.timeout(5):
        while len(hooks.delivering) < 2:
            await asyncio.sleep(0.005)
    assert pipeline.calls == [[first.id], [second.id]] and hooks.finished == []
    assert first.state is second.state is JobState.DONE and len(queue) == 0  # the queue already knows
    hooks.gate.set()
    await hooks.wait_for(2)
    await runner.shutdown(1)


async def test_shutdown_waits_for_results_still_being_delivered():
    queue, hooks = FairQueue(SETTINGS), SlowDelivery()
    job = await submit(queue, 1)
    runner = start_runner(queue, Painter(), hooks)
    while not hooks.delivering:
        await asyncio.sleep(0.005)
    asyncio.get_running_loop().call_later(0.1, hooks.gate.set)
    await runner.shutdown(grace_s=5)
    assert hooks.result(job)[0] is JobState.DONE


async def test_results_still_in_delivery_after_the_grace_period_are_cancelled_before_shutdown_returns():
    queue, hooks = FairQueue(SETTINGS), SlowDelivery()  # the gate never opens: Discord hangs
    await submit(queue, 1)
    runner = start_runner(queue, Painter(), hooks)
    while not hooks.delivering:
        await asyncio.sleep(0.005)
    began = time.monotonic()
    await runner.shutdown(grace_s=0.1)
    assert time.monotonic() - began < 1.0 and hooks.finished == []
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("deliver")]  # none left behind


async def test_a_bookkeeping_error_still_answers_the_job_and_the_worker_serves_on(monkeypatch):
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(), Recorder()
    finish = queue.finish
    failures = iter([ValueError("a bug of ours")])

    def finish_once_badly(job, state):
        if (error := next(failures, None)) is not None:
            raise error
        finish(job, state)

    monkeypatch.setattr(queue, "finish", finish_once_badly)
    first, second = await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)  # two batches
    runner = start_runner(queue, pipeline, hooks)
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert pipeline.calls == [[first.id], [second.id]] and hooks.result(second)[0] is JobState.DONE


async def test_out_of_memory_splits_the_batch_in_halves_and_learns_the_limit():
    queue, pipeline, hooks = FairQueue(SETTINGS), OutOfMemoryAboveOne(), Recorder()
    jobs = [await submit(queue, owner) for owner in range(4)]
    runner = start_runner(queue, pipeline, hooks)
    await hooks.wait_for(4)
    assert [len(c) for c in pipeline.calls] == [4, 2, 1, 1, 2, 1, 1]
    assert all(hooks.result(j)[0] is JobState.DONE for j in jobs)
    later = [await submit(queue, owner) for owner in range(10, 12)]
    await hooks.wait_for(6)
    await runner.shutdown(1)
    assert [len(c) for c in pipeline.calls[7:]] == [1, 1]  # no more oversized attempts
    assert all(hooks.result(j)[0] is JobState.DONE for j in later)


async def test_out_of_memory_on_a_single_job_fails_it_with_advice():
    class AlwaysOutOfMemory(Painter):
        def paint(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory")

    queue, hooks = FairQueue(SETTINGS), Recorder()
    job = await submit(queue, 1)
    runner = start_runner(queue, AlwaysOutOfMemory(), hooks)
    await hooks.wait_for(1)
    await runner.shutdown(1)
    state, result = hooks.result(job)
    assert state is JobState.FAILED and "out of GPU memory" in result.error and "smaller size" in result.error


async def test_an_exception_fails_only_its_job_and_the_thread_serves_on():
    queue, pipeline, hooks = FairQueue(SETTINGS), ExplodesOnBoom(), Recorder()
    good1, bad, good2, bug = [await submit(queue, i, prompt=p) for i, p in enumerate(["a", "boom", "c", "bug"])]
    runner = start_runner(queue, pipeline, hooks)
    await hooks.wait_for(4)
    after = await submit(queue, 7)
    await hooks.wait_for(5)
    await runner.shutdown(1)
    assert hooks.result(bad) == (
        JobState.FAILED, JobResult(bad.id, error="the init image could not be decoded; send a PNG, JPEG or WebP"))
    state, result = hooks.result(bug)  # no class names nor internals for the user: the log has them
    assert state is JobState.FAILED and "internal error" in result.error and "index" not in result.error
    assert all(hooks.result(j)[0] is JobState.DONE for j in (good1, good2, after))
    assert len({t.ident for t in pipeline.threads}) == 1 and pipeline.threads[0].is_alive()


async def test_a_crash_outside_the_pipeline_call_and_failing_hooks_leave_the_worker_serving():
    class ReturnsGarbageOnce(Painter):
        def run(self, model, device, batch, progress, cancelled):
            results = super().run(model, device, batch, progress, cancelled)
            return None if len(self.calls) == 1 else results  # the runner cannot read None

    class FailingHooks(Recorder):
        async def on_started(self, job: Job) -> None:
            raise ConnectionError("Discord is down")

    queue, pipeline, hooks = FairQueue(SETTINGS), ReturnsGarbageOnce(), FailingHooks()
    first = await submit(queue, 1)
    runner = start_runner(queue, pipeline, hooks)
    await hooks.wait_for(1)
    second = await submit(queue, 1)
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert hooks.result(first)[0] is JobState.FAILED and "internal error" in hooks.result(first)[1].error
    assert hooks.result(second)[0] is JobState.DONE
    assert pipeline.threads[0] is pipeline.threads[1]


async def test_a_failed_result_and_a_missing_result_fail_their_jobs_only():
    class Partial(Painter):
        def run(self, model, device, batch, progress, cancelled):
            return [JobResult(batch[0].id, error="the prompt is empty after filtering"),
                    JobResult(batch[1].id, images=(b"png",), seeds=(11,))]

    queue, hooks = FairQueue(SETTINGS), Recorder()
    jobs = [await submit(queue, owner) for owner in range(3)]
    runner = start_runner(queue, Partial(), hooks)
    await hooks.wait_for(3)
    await runner.shutdown(1)
    assert hooks.result(jobs[0]) == (JobState.FAILED, JobResult(jobs[0].id, error="the prompt is empty after filtering"))
    assert hooks.result(jobs[1])[0] is JobState.DONE
    assert hooks.result(jobs[2])[0] is JobState.FAILED and "internal error" in hooks.result(jobs[2])[1].error


async def test_a_job_past_its_time_limit_is_stopped_and_failed():
    settings = SETTINGS.model_copy(update={"job_timeout_s": 0.2})
    queue, hooks = FairQueue(settings), Recorder()
    job = await submit(queue, 1)
    runner = start_runner(queue, Painter(step_s=0.01, steps=10_000), hooks, settings=settings)
    began = time.monotonic()
    await hooks.wait_for(1)
    await runner.shutdown(1)
    assert time.monotonic() - began < 2.0
    assert hooks.result(job) == (
        JobState.FAILED, JobResult(job.id, error="took longer than 0.2 s, the time limit, and was stopped")
    )


async def test_each_half_of_a_split_batch_gets_the_whole_time_limit():
    settings = SETTINGS.model_copy(update={"job_timeout_s": 0.25})
    queue, hooks = FairQueue(settings), Recorder()
    jobs = [await submit(queue, owner) for owner in range(2)]
    # Out of memory together; alone each takes 0.15 s: both halves fit the limit, not their sum.
    runner = start_runner(queue, OutOfMemoryAboveOne(step_s=0.03, steps=5), hooks, settings=settings)
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert [hooks.result(j)[0] for j in jobs] == [JobState.DONE, JobState.DONE]


async def test_cancelling_a_running_job_stops_it_at_the_next_step():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(step_s=0.01, steps=10_000), Recorder()
    job = await submit(queue, 1)
    runner = start_runner(queue, pipeline, hooks)
    while not hooks.progress.get(job.id):
        await asyncio.sleep(0.01)
    queue.cancel(job.id, by=99, moderator=True)
    await hooks.wait_for(1)
    await runner.shutdown(1)
    assert hooks.result(job) == (JobState.CANCELLED, JobResult(job.id, error="cancelled by a moderator"))
    assert pipeline.saw_cancel == {job.id}


class Dropping:
    """Steps until released, asking about every job at every step as the engine does and dropping
    the cancelled ones from the batch; records which jobs each step still drew."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.drawn: list[list[str]] = []

    def prepare(self, model, device, batch):
        pass

    def run(self, model, device, batch, progress, cancelled):
        while not self.release.is_set():
            live = [j for j in batch if not cancelled(j.id)]
            self.drawn.append([j.id for j in live])
            for job in live:
                progress(job.id, len(self.drawn), len(self.drawn) + 1, None)
            time.sleep(0.005)
        return [JobResult(j.id, images=(b"png",), seeds=(1,)) for j in batch if not cancelled(j.id)]


async def test_a_job_cancelled_inside_a_shared_batch_is_answered_before_its_batch_mates_finish():
    queue, pipeline, hooks = FairQueue(SETTINGS), Dropping(), Recorder()
    mine, theirs = await submit(queue, 1), await submit(queue, 2)
    runner = start_runner(queue, pipeline, hooks)
    while not hooks.progress.get(theirs.id):
        await asyncio.sleep(0.01)
    queue.cancel(theirs.id, by=2)
    await hooks.wait_for(1)  # while the batch still runs
    assert hooks.result(theirs) == (JobState.CANCELLED, JobResult(theirs.id, error="cancelled by its owner"))
    assert queue.get(theirs.id) is None and queue.get(mine.id).state is JobState.RUNNING
    seen = len(hooks.progress[theirs.id])
    pipeline.release.set()
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert hooks.result(mine)[0] is JobState.DONE
    assert [j for j in hooks.finished if j[0] is theirs and j[2] is JobState.CANCELLED]  # once, cancelled
    assert pipeline.drawn[0] == [mine.id, theirs.id] and pipeline.drawn[-1] == [mine.id]
    assert len(hooks.progress[theirs.id]) == seen  # no progress after the answer
    assert queue.snapshot().throughput["cpu"] == 10.0  # a batch with a cancel measures nothing


async def test_shutdown_lets_a_short_batch_finish_within_the_grace_period():
    queue, hooks = FairQueue(SETTINGS), Recorder()
    job = await submit(queue, 1)
    runner = start_runner(queue, Painter(step_s=0.03, steps=10), hooks)
    while not hooks.started:
        await asyncio.sleep(0.005)
    await runner.shutdown(grace_s=5)
    assert hooks.result(job)[0] is JobState.DONE


async def test_shutdown_after_the_grace_period_leaves_the_batch_running_for_restart():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(step_s=0.01, steps=10_000), Recorder()
    running = await submit(queue, 1)
    queued = await submit(queue, 1)  # the same user: waits behind the running job
    runner = start_runner(queue, pipeline, hooks)
    while not hooks.started:
        await asyncio.sleep(0.005)
    began = time.monotonic()
    await runner.shutdown(grace_s=0.2)
    assert 0.2 <= time.monotonic() - began < 1.5
    assert hooks.finished == []
    assert running.state is JobState.RUNNING and queued.state is JobState.QUEUED and len(queue) == 1
    assert pipeline.saw_cancel == {running.id}
    assert await _thread_exits(pipeline.threads[0])


async def _thread_exits(thread: threading.Thread) -> bool:
    for _ in range(100):
        if not thread.is_alive():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_an_idle_runner_shuts_down_at_once():
    queue, hooks = FairQueue(SETTINGS), Recorder()
    runner = start_runner(queue, Painter(), hooks)
    await asyncio.sleep(0.01)
    began = time.monotonic()
    await runner.shutdown(grace_s=5)
    assert time.monotonic() - began < 0.5
    await submit(queue, 1)
    await asyncio.sleep(0.05)
    assert hooks.started == [] and len(queue) == 1


def test_model_cache_evicts_the_least_recently_used_model():
    loads: list[str] = []
    sizes = {"sd15": 40, "sd21": 50, "inpaint": 40, "huge": 200}

    def load(name: str) -> str:
        loads.append(name)
        return name

    cache = ModelCache(load, lambda model: sizes[model], budget_bytes=100)
    assert [cache.get(n) for n in ("sd15", "sd21", "sd15")] == ["sd15", "sd21", "sd15"]
    assert cache.loaded == ["sd21", "sd15"] and loads == ["sd15", "sd21"]
    cache.get("inpaint")  # 90 + 40 > 100: the least recently used (sd21) goes first
    assert cache.loaded == ["sd15", "inpaint"] and cache.used_bytes == 80
    cache.get("sd21")  # known to need 50: evicts sd15 before loading
    assert cache.loaded == ["inpaint", "sd21"]
    cache.get("huge")  # bigger than the budget: loaded alone
    assert cache.loaded == ["huge"] and loads == ["sd15", "sd21", "inpaint", "sd21", "huge"]
    cache.get("sd15")
    cache.keep_only("sd15")
    assert cache.loaded == ["sd15"]


def test_an_evicted_model_held_in_a_reference_cycle_is_freed_before_the_next_loads():
    """A compiled text tower refers back to itself through its compiled call: the cache collects
    an evicted model at once rather than leave its memory to a later full collection."""
    class Model:
        def __init__(self, name: str) -> None:
            self.name, self.me = name, self  # a cycle, as tower -> compiled call -> tower

    alive: dict[str, weakref.ref] = {}

    def load(name: str) -> Model:
        assert all(ref() is None for ref in alive.values()), "the evicted model is still in memory"
        model = Model(name)
        alive[name] = weakref.ref(model)
        return model

    cache = ModelCache(load, lambda model: 60, budget_bytes=100)
    gc.disable()  # as between two automatic collections
    try:
        cache.get("sd15")
        cache.get("sd21")
    finally:
        gc.enable()
    assert cache.loaded == ["sd21"]


async def test_jobs_for_another_model_wait_for_the_swap():
    queue, pipeline, hooks, loads = FairQueue(SETTINGS), Painter(), Recorder(), []
    jobs = [await submit(queue, owner, model=m) for owner, m in enumerate(["sd15", "sd21", "sd15", "sd21"])]
    runner = start_runner(queue, pipeline, hooks, budget=60, loads=loads)  # room for one model
    await hooks.wait_for(4)
    await runner.shutdown(1)
    assert all(hooks.result(j)[0] is JobState.DONE for j in jobs)
    assert all(name == m for name, models in pipeline.models for m in models)
    assert loads == ["sd15", "sd21"]  # the two sd15 jobs batch, then the two sd21 jobs


class MatmulPipeline(Painter):
    """A real CPU generation stand-in: about a second of float32 matrix products."""

    def paint(self, batch):
        x = torch.randn(384, 384)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            x = torch.tanh(x @ x)


async def test_the_event_loop_stays_responsive_during_a_cpu_generation():
    queue, pipeline, hooks = FairQueue(SETTINGS), MatmulPipeline(), Recorder()
    job = await submit(queue, 1)
    interval, lateness = 0.02, []
    runner = start_runner(queue, pipeline, hooks)
    began = time.monotonic()
    while not hooks.finished:
        expected = time.monotonic() + interval
        await asyncio.sleep(interval)
        lateness.append(time.monotonic() - expected)
    await runner.shutdown(1)
    assert hooks.result(job)[0] is JobState.DONE
    assert time.monotonic() - began >= 1.0 and len(lateness) >= 25  # the timer kept firing
    assert max(lateness) < 0.2, f"the loop stalled for {max(lateness):.3f} s"


class Held(Painter):
    """Its first batch waits on the device thread until `release` is set; records, in order, when
    each batch starts and ends there."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.trace: list[str] = []
        self.second_started = threading.Event()

    def run(self, model, device, batch, progress, cancelled):
        call = sum(t.startswith("start") for t in self.trace) + 1
        self.trace.append(f"start {call}")
        if call == 2:
            self.second_started.set()
        if call == 1:
            assert self.release.wait(5), "the test never released the first batch"
        try:
            return super().run(model, device, batch, progress, cancelled)
        finally:
            self.trace.append(f"end {call}")

    def prepare(self, model, device, batch):
        super().prepare(model, device, batch)
        self.trace.append("prepare")


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def settle_loop() -> None:
    """Let every task that can run on the loop run: what the runner would take, it has taken."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_the_next_batch_is_started_and_queued_while_one_runs_and_follows_it_without_the_loop():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    first, second = await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)  # two batches
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: hooks.started == [first.id, second.id])  # the second one's hooks ran already
    assert pipeline.trace == ["start 1"] and second.state is JobState.RUNNING
    pipeline.release.set()
    # The loop is blocked from here on: the device thread starts the second batch on its own.
    assert pipeline.second_started.wait(5), "the device waited for the event loop between batches"
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert pipeline.trace == ["start 1", "prepare", "end 1", "start 2", "end 2"]
    assert pipeline.calls == [[first.id], [second.id]]
    assert all(hooks.result(j)[0] is JobState.DONE for j in (first, second))


async def test_the_batch_behind_is_prepared_once_on_the_device_thread_between_the_running_ones_steps():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    first = await submit(queue, 1, steps=4)
    behind = [await submit(queue, owner, steps=5) for owner in (2, 3)]  # one batch of two
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 3)
    pipeline.release.set()
    await hooks.wait_for(3)
    await runner.shutdown(1)
    assert pipeline.trace == ["start 1", "prepare", "end 1", "start 2", "end 2"]  # not once per step
    ((model, ids, thread),) = pipeline.prepared
    assert (model, ids) == ("sd15", [j.id for j in behind]) and thread is pipeline.threads[0]
    assert pipeline.calls == [[first.id], [j.id for j in behind]]


async def test_a_batch_behind_is_prepared_without_its_cancelled_jobs_and_not_when_it_needs_another_model():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    await submit(queue, 1, steps=4)
    cancelled, kept = [await submit(queue, owner, steps=5) for owner in (2, 3)]
    runner = start_runner(queue, pipeline, hooks, budget=200)
    await until(lambda: len(hooks.started) == 3)
    queue.cancel(cancelled.id, by=2)
    runner.cancelled(cancelled)
    pipeline.release.set()
    await hooks.wait_for(3)
    other = await submit(queue, 4, model="sd21")  # queued behind a batch of the running model
    pipeline.release.clear()
    await submit(queue, 5, steps=6)
    await hooks.wait_for(4)
    pipeline.release.set()
    await hooks.wait_for(5)
    await runner.shutdown(1)
    assert [ids for _, ids, _ in pipeline.prepared] == [[kept.id]]
    assert hooks.result(other)[0] is JobState.DONE


async def test_a_failing_preparation_changes_nothing():
    class Unprepared(Held):
        def prepare(self, model, device, batch):
            super().prepare(model, device, batch)
            raise RuntimeError("a bad LoRA name, say")

    queue, pipeline, hooks = FairQueue(SETTINGS), Unprepared(), Recorder()
    jobs = [await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)]
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 2)
    pipeline.release.set()
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert len(pipeline.prepared) == 1 and all(hooks.result(j)[0] is JobState.DONE for j in jobs)


async def test_only_one_batch_waits_behind_the_running_one():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    jobs = [await submit(queue, owner, steps=owner + 1) for owner in range(4)]  # four batches
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 1 + PREFETCH_BATCHES)
    await settle_loop()
    assert len(hooks.started) == 1 + PREFETCH_BATCHES and len(queue) == 2  # the others stay queued
    pipeline.release.set()
    await hooks.wait_for(4)
    await runner.shutdown(1)
    assert pipeline.calls == [[j.id] for j in jobs]


async def test_a_job_cancelled_while_its_batch_waits_behind_the_running_one_never_runs():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    running, waiting = await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 2)
    queue.cancel(waiting.id, by=2)
    pipeline.release.set()
    await hooks.wait_for(2)
    later = await submit(queue, 3)
    await hooks.wait_for(3)
    await runner.shutdown(1)
    assert pipeline.calls == [[running.id], [later.id]]
    assert hooks.result(waiting) == (JobState.CANCELLED, JobResult(waiting.id, error="cancelled by its owner"))
    assert hooks.result(running)[0] is hooks.result(later)[0] is JobState.DONE
    assert waiting.state is JobState.CANCELLED and queue.get(waiting.id) is None


async def test_a_job_cancelled_while_its_batch_waits_is_answered_at_once_not_when_it_reaches_the_device():
    queue, pipeline, hooks = FairQueue(SETTINGS), Held(), Recorder()
    running, waiting = await submit(queue, 1, steps=4), await submit(queue, 2, steps=5)
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 2)
    queue.cancel(waiting.id, by=2)
    assert runner.cancelled(waiting) and not runner.cancelled(waiting)  # claimed once
    await hooks.wait_for(1)  # while the running batch is still held
    assert hooks.result(waiting) == (JobState.CANCELLED, JobResult(waiting.id, error="cancelled by its owner"))
    assert not runner.cancelled(running)  # it runs: it stops at its next step instead
    pipeline.release.set()
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert pipeline.calls == [[running.id]]
    assert hooks.result(running)[0] is JobState.DONE and queue.get(waiting.id) is None


async def test_a_preloaded_model_is_loaded_before_any_job_and_a_failed_preload_harms_nothing():
    loads: list[str] = []
    queue, hooks = FairQueue(SETTINGS), Recorder()
    runner = Runner(queue, Painter(), ["cpu"], SETTINGS, load_model=lambda name, device: loads.append(name) or FakeModel(name, device),
                    model_size=lambda model: 40, model_budget_bytes=100, on_finished=hooks.on_finished)
    runner.start(preload="sd15")
    await until(lambda: loads == ["sd15"])
    job = await submit(queue, 1)
    await hooks.wait_for(1)
    assert loads == ["sd15"] and hooks.result(job)[0] is JobState.DONE  # the job found it loaded
    await runner.shutdown(1)

    def broken(name: str, device: str) -> FakeModel:
        raise FileNotFoundError(name)

    queue, hooks = FairQueue(SETTINGS), Recorder()
    runner = Runner(queue, Painter(), ["cpu"], SETTINGS, load_model=broken, model_size=lambda model: 40,
                    model_budget_bytes=100, on_finished=hooks.on_finished)
    runner.start(preload="missing")
    job = await submit(queue, 1)
    await hooks.wait_for(1)
    assert hooks.result(job)[0] is JobState.FAILED  # told, and the worker goes on
    await runner.shutdown(1)


async def test_a_limit_learned_from_running_out_of_memory_splits_the_batch_queued_behind():
    class HeldOutOfMemory(Held, OutOfMemoryAboveOne):
        pass

    settings = SETTINGS.model_copy(update={"max_batch_images": 4})
    queue, pipeline, hooks = FairQueue(settings), HeldOutOfMemory(), Recorder()
    jobs = [await submit(queue, owner) for owner in range(8)]
    runner = start_runner(queue, pipeline, hooks, settings=settings)
    await until(lambda: len(hooks.started) == 8)  # two batches of four: one runs, one waits
    pipeline.release.set()
    await hooks.wait_for(8)
    await runner.shutdown(1)
    assert [len(c) for c in pipeline.calls] == [4, 2, 1, 1, 2, 1, 1] + [1, 1, 1, 1]  # no oversized try
    assert [j for call in pipeline.calls[7:] for j in call] == [j.id for j in jobs[4:]]  # in order
    assert all(hooks.result(j)[0] is JobState.DONE for j in jobs)


async def test_shutdown_leaves_the_running_batch_and_the_one_behind_it_running_for_restart():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(step_s=0.01, steps=10_000), Recorder()
    running, behind, queued = [await submit(queue, owner, steps=s) for owner, s in ((1, 4), (2, 5), (1, 4))]
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 2)
    began = time.monotonic()
    await runner.shutdown(grace_s=0.2)
    assert 0.2 <= time.monotonic() - began < 1.5
    assert hooks.finished == [] and pipeline.calls == [[running.id]]  # the one behind never started
    assert running.state is behind.state is JobState.RUNNING and queued.state is JobState.QUEUED
    assert await _thread_exits(pipeline.threads[0])


async def test_shutdown_gives_the_batch_behind_the_running_one_the_rest_of_the_grace_period():
    queue, pipeline, hooks = FairQueue(SETTINGS), Painter(step_s=0.02, steps=5), Recorder()
    jobs = [await submit(queue, owner, steps=owner + 3) for owner in (1, 2)]  # two batches
    runner = start_runner(queue, pipeline, hooks)
    await until(lambda: len(hooks.started) == 2)
    await runner.shutdown(grace_s=5)
    assert pipeline.calls == [[j.id] for j in jobs]
    assert all(hooks.result(j)[0] is JobState.DONE for j in jobs)


async def test_results_waiting_to_be_delivered_hold_the_next_batches_back():
    settings = SETTINGS.model_copy(update={"max_batch_images": 1})
    queue, pipeline, hooks = FairQueue(settings), Painter(), SlowDelivery()
    jobs = [await submit(queue, owner) for owner in range(MAX_DELIVERIES + 5)]
    runner = start_runner(queue, pipeline, hooks, settings=settings)
    # Taking stops at MAX_DELIVERIES; the batch already queued behind still runs.
    await until(lambda: len(hooks.delivering) == MAX_DELIVERIES + PREFETCH_BATCHES)
    await settle_loop()
    assert len(hooks.started) == len(pipeline.calls) == MAX_DELIVERIES + PREFETCH_BATCHES and len(queue) == 4
    hooks.gate.set()
    await hooks.wait_for(len(jobs))
    await runner.shutdown(1)


async def test_busy_seconds_count_the_time_in_pipeline_calls():
    queue, hooks = FairQueue(SETTINGS), Recorder()
    for owner in range(2):
        await submit(queue, owner, steps=owner + 4)  # two batches
    runner = start_runner(queue, Painter(step_s=0.02), hooks)
    await hooks.wait_for(2)
    await runner.shutdown(1)
    assert 9 * 0.02 <= runner.busy_seconds()["cpu"] < 9 * 0.02 + 0.5


class OnStandInDevice:
    """The real Engine on the meta device standing in for a GPU (tests/fixtures/devices.py), run
    under the stand-in on the device thread; marks each batch's begin and end and each step in
    the stand-in's record of what crossed between host and device."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.device = engine, StandInDevice()

    def run(self, model, device, batch, progress, cancelled):
        def step(job_id, step, total, preview):
            self.device.traffic.append("step")
            progress(job_id, step, total, preview)

        with self.device:
            self.device.traffic.append("begin")
            try:
                return self.engine.run(model, device, batch, step, cancelled)
            finally:
                self.device.traffic.append("end")

    def prepare(self, model, device, batch):  # called from within `run`, under the stand-in
        self.device.traffic.append("prepare")
        self.engine.prepare(model, device, batch)


async def test_on_a_stand_in_gpu_the_next_batch_is_prepared_during_the_last_reading_back_only_images(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    engine = Engine((ModelSettings(name="tiny", checkpoint=path, config=yaml_path),), "float32", lambda sha: b"")
    pipeline, hooks = OnStandInDevice(engine), Recorder()
    queue = FairQueue(SETTINGS)
    for owner, steps in ((1, 3), (2, 4)):  # two batches of two images each
        await queue.submit(Submission(GenerationRequest(
            prompt="a fox", model="tiny", sampler="euler", steps=steps, guidance=5.0, seed=1, width=64, height=64,
            count=2), owner, 1))
    runner = Runner(
        queue, pipeline, ["cpu"], SETTINGS, load_model=lambda name, device: on_stand_in_device(engine.load(name, "cpu")),
        model_size=lambda model: 1, model_budget_bytes=10, on_finished=hooks.on_finished,
    )
    runner.start()
    await hooks.wait_for(2, timeout=60)
    await runner.shutdown(1)
    assert [(state, len(result.images)) for _, result, state in hooks.finished] == [(JobState.DONE, 2)] * 2
    runs = [(what, len(list(group))) for what, group in itertools.groupby(pipeline.device.traffic)]
    uploads = [count for what, count in runs if what == "copy to device"]
    # The second batch's prompt tokens, emphasis weights and start noise cross during the first one's
    # steps (it was queued while the model loaded), so it starts with the per-run constants only
    # (guidance, schedule); nothing is read back but the images, in one copy per batch.
    prepared = runs[4][1] if runs[4][0] == "copy to device" else 0
    assert prepared >= 3 and uploads[0] - prepared == 2
    assert runs == [("begin", 1), ("copy to device", uploads[0]), ("step", 1), ("prepare", 1),
                    ("copy to device", prepared), ("step", 2), ("read back", 1), ("end", 1),
                    ("begin", 1), ("copy to device", uploads[0] - prepared), ("step", 4), ("read back", 1), ("end", 1)]


@pytest.mark.gpu
async def test_a_real_cuda_out_of_memory_error_splits_the_batch():
    """Each job holds 30% of the free GPU memory: four at once cannot fit, two can."""
    free, _ = torch.cuda.mem_get_info()
    per_job = int(0.3 * free)

    class Hungry(Painter):
        def paint(self, batch):
            torch.empty(per_job * len(batch), dtype=torch.uint8, device="cuda")

    queue, pipeline, hooks = FairQueue(SETTINGS, devices=("cuda",)), Hungry(), Recorder()
    jobs = [await submit(queue, owner) for owner in range(4)]
    runner = Runner(
        queue, pipeline, ["cuda"], SETTINGS, load_model=FakeModel, model_size=lambda model: 1,
        model_budget_bytes=10, on_finished=hooks.on_finished,
    )
    runner.start()
    await hooks.wait_for(4, timeout=60)
    await runner.shutdown(1)
    assert [len(c) for c in pipeline.calls] == [4, 2, 2]
    assert all(hooks.result(j)[0] is JobState.DONE for j in jobs)
