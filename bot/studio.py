"""The studio: storage, the fair queue, the runner and the engine wired together for the bot.

Storage is the source of truth. A job is stored before `submit` returns (so before the user is
told "queued"), every state change is written as it happens, and results are delivered from the
stored job (its channel, interaction token and message), so a restart loses nothing: at start-up
queued jobs re-enter the queue in their submission order and running ones are re-run once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from PIL.Image import Image

from bot.config import AppConfig
from bot.policy import Requester
from generation.addons import AddonLibrary
from generation.compiled import Compiling, cache_dir_in
from generation.engine import Engine
from generation.metadata import png_bytes
from generation.queue import Estimate, FairQueue, Job, Submission, role_weight
from generation.request import GenerationRequest, JobState, RateKey
from generation.runner import JobResult, Runner
from generation.settings import default_model
from storage import jobs as stored
from storage.db import Database
from storage.images import ImageRecord, input_path, job_images, save_image
from storage.maintenance import reconcile
from storage.moderation import paused_guilds, set_queue_paused
from storage.rates import load_rates, save_rate
from storage.retention import apply_retention

log = logging.getLogger(__name__)

#: Seconds between two retention passes while the bot runs.
RETENTION_EVERY_S = 3600.0
#: Finished jobs whose owner was never told are told at start-up if they finished this recently.
RETELL_WITHIN_S = 7 * 86400.0
#: Longest a device thread waits for the loop to look up a stored input (it may be shutting down).
INPUT_WAIT_S = 30.0
#: Shortest time between two replays of the queue for its estimates (and never less than the last
#: replay took, so they hold the interpreter half the time at most): a burst of changes (the jobs
#: of a batch starting one by one, a flood of submissions) is replayed once, not once per change.
ESTIMATES_EVERY_S = 0.05
#: What the owner of a job is told when restarts interrupted it more often than it may re-run.
GAVE_UP = "restarts interrupted this job twice, so it was not run again; please ask once more"


@dataclass(frozen=True)
class Origin:
    """Where a request came from and where its answer goes; stored with the job."""

    channel_id: int
    interaction_id: int | None = None
    interaction_token: str | None = None
    token_expires_at: float | None = None
    parent_job_id: str | None = None
    parent_index: int | None = None


class Listener(Protocol):
    """The Discord side: told about every change a user should see."""

    async def queue_moved(self, estimates: Mapping[str, Estimate]) -> None: ...

    async def started(self, job: stored.Job) -> None: ...

    async def progressed(self, job_id: str, step: int, total: int, preview: Any) -> None: ...

    async def finished(self, job: stored.Job, images: list[ImageRecord]) -> None:
        """`job.state` is done, failed (`job.error` says why) or cancelled."""


#: The moderators' checks: every reason a requester may not run a request (`bot.policy.problems`).
Refusal = Callable[[Database, AppConfig, Requester, GenerationRequest], Awaitable[list[str]]]


async def _png(image: Image) -> bytes:
    """A result image as PNG bytes, its `parameters` text as the chunk, encoded off the loop."""
    return await asyncio.to_thread(png_bytes, image, image.info.get("parameters"))


class Studio:
    """Open with `async with Studio.open(config, devices, budget) as studio`, then `start(listener)`;
    leaving the block drains the queue and gives the running batch the configured grace period."""

    def __init__(
        self,
        config: AppConfig,
        db: Database,
        devices: tuple[str, ...],
        model_budget_bytes: int,
        refusal: Refusal | None = None,
        rates: Mapping[RateKey, float] | None = None,
    ) -> None:
        """`rates`: the batch rates measured before (`storage.rates`), for the queue's ETAs."""
        self.config = config
        self.db = db
        #: The LoRA and embedding folders: the engine reads them; commands list and check them.
        self.addons = AddonLibrary(config.generation.lora_dir, config.generation.embedding_dir)
        engine = Engine.of(
            config.models, config.generation, self._read_input,
            compiling=Compiling.of(config.generation, cache_dir_in(config.storage.data_dir)),
            addons=self.addons, preview=config.discord.preview, preview_every_s=config.discord.progress_interval_s,
        )
        self._refusal = refusal
        self.queue = FairQueue(config.queue, devices, limits=self._limits, persist=self._persist,
                               rates=rates, save_rate=self._save_rate)
        self._runner = Runner(
            self.queue, engine, devices, config.queue,
            load_model=engine.load, model_size=engine.size, model_budget_bytes=model_budget_bytes,
            on_started=self._started, on_progress=self._progressed, on_finished=self._finished,
        )
        #: Who submits and from where, for the queue's hooks, which run in the submitting task.
        self._submitting: ContextVar[tuple[Requester, Origin, tuple[str, ...]]] = ContextVar("submitting")
        self._listener: Listener | None = None
        #: Every waiting job's place and ETA as of the last replay of the queue (`_moved`; the
        #: acknowledgement of a submission reads this one).
        self.estimates: dict[str, Estimate] = {}
        #: The replays' task (`_replay_moves`) while changes wait for one, and the round that the
        #: changes since the last replay began wait for (done when their replay is).
        self._replaying: asyncio.Task | None = None
        self._round: asyncio.Future | None = None
        self._next_replay_at = float("-inf")
        self._tasks: list[asyncio.Task] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: AppConfig,
        devices: tuple[str, ...],
        model_budget_bytes: int,
        refusal: Refusal | None = None,
    ) -> AsyncIterator[Studio]:
        """Open the database, tidy it and restore unfinished jobs into the queue. `devices` are
        concrete ("cpu", "cuda:0"); `refusal` runs at submit, inside the queue's lock."""
        async with Database.open(config.storage) as db:
            studio = cls(config, db, devices, model_budget_bytes, refusal, await load_rates(db))
            await reconcile(db)
            await apply_retention(db)
            await studio._restore()
            try:
                yield studio
            finally:
                await studio.shutdown()

    def start(self, listener: Listener) -> None:
        """Start generating; `listener` hears of every change from now on."""
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        default = default_model(self.config.models, self.config.generation.upscaler)
        self._runner.start(preload=None if default is None else default.name)
        self._running = True
        self._tasks = [asyncio.create_task(self._retain(), name="retention")]
        self._tasks.append(asyncio.create_task(self._tell_untold(), name="untold results"))

    async def shutdown(self) -> None:
        """Take no new jobs, give the running batch the grace period, keep the rest for restart."""
        if not self._running:
            return
        self._running = False
        self.queue.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._runner.shutdown(self.config.queue.shutdown_grace_s)
        if self._replaying is not None:  # its listener call must not outlive the studio
            await asyncio.gather(self._replaying, return_exceptions=True)

    def busy_seconds(self) -> dict[str, float]:
        """Seconds each device has spent running pipelines since `start` (for utilisation figures)."""
        return self._runner.busy_seconds()

    # -- what the commands call --

    async def submit(self, request: GenerationRequest, requester: Requester, origin: Origin,
                     problems: Sequence[str] = ()) -> Job:
        """Queue a request (stored before this returns); raises `Refused` with every reason, those
        the caller found first (`problems`: its LoRAs and embeddings) with the studio's own."""
        weight = role_weight(self.config.queue.role_weights, requester.role_names)
        submission = Submission(request, requester.user_id, requester.guild_id, weight, requester.role_ids)
        token = self._submitting.set((requester, origin, tuple(problems)))
        try:
            job = await self.queue.submit(submission)
        finally:
            self._submitting.reset(token)
        await self._moved()
        return job

    async def cancel(self, job_id: str, *, by: int, moderator: bool = False) -> Job:
        """Cancel a queued job at once, or a running one at its next step; raises `Refused`."""
        job = self.queue.cancel(job_id, by=by, moderator=moderator)
        if job.state is JobState.CANCELLED:  # it was queued: the runner will never see it
            await stored.cancel_job(self.db, job.id)
            await self._tell_finished(job.id)
            await self._moved()
        else:  # it runs, or waits behind the running batch: then the runner completes it now
            self._runner.cancelled(job)
        return job

    async def pause(self, guild_id: int, paused: bool) -> None:
        """Pause or resume a guild's queue (its moderators'), stored so that a restart keeps it;
        its waiting jobs' messages say so."""
        await set_queue_paused(self.db, guild_id, paused)
        if paused:
            self.queue.pause(guild_id)
        else:
            self.queue.resume(guild_id)
        await self._moved()

    # -- the queue's and the runner's hooks --

    async def _limits(self, submission: Submission) -> list[str]:
        requester, _, problems = self._submitting.get()
        if self._refusal is None:
            return list(problems)
        return [*await self._refusal(self.db, self.config, requester, submission.request), *problems]

    async def _persist(self, job: Job) -> None:
        _, origin, _ = self._submitting.get()
        await stored.create_job(
            self.db, job.request, job_id=job.id, owner_id=job.owner_id, guild_id=job.guild_id,
            channel_id=origin.channel_id, interaction_id=origin.interaction_id,
            interaction_token=origin.interaction_token, token_expires_at=origin.token_expires_at,
            parent_job_id=origin.parent_job_id, parent_index=origin.parent_index, weight=job.weight,
        )

    async def _save_rate(self, key: RateKey, rate: float) -> None:
        await save_rate(self.db, key, rate)

    async def _started(self, job: Job) -> None:
        row = await stored.start_job(self.db, job.id, device=job.device or "")
        await self._moved(wait=False)  # the runner goes on; a batch's jobs are replayed once
        if self._listener is not None:
            await self._listener.started(row)

    async def _progressed(self, job: Job, step: int, total: int, preview: Any) -> None:
        if self._listener is not None:
            await self._listener.progressed(job.id, step, total, preview)

    async def _finished(self, job: Job, result: JobResult) -> None:
        if job.state is JobState.DONE:
            try:
                pngs = await asyncio.gather(*map(_png, result.images))  # in parallel: zlib lets go of the GIL
                for index, (png, seed) in enumerate(zip(pngs, result.seeds, strict=True)):
                    await save_image(self.db, job.id, index, seed, png)
                await stored.finish_job(self.db, job.id)
            except Exception:
                log.exception("could not store the images of job %s", job.id)
                await stored.fail_job(self.db, job.id, "the images could not be saved; an operator was told")
        elif job.state is JobState.CANCELLED:
            await stored.cancel_job(self.db, job.id)
        else:
            await stored.fail_job(self.db, job.id, result.error or "generation failed")
        await self._tell_finished(job.id)

    async def _tell_finished(self, job_id: str) -> None:
        row = await stored.get_job(self.db, job_id)
        if self._listener is not None and row is not None:
            await self._listener.finished(row, await job_images(self.db, job_id))

    async def _moved(self, wait: bool = True) -> None:
        """The queue changed: replay it for new estimates and tell the listener. `wait`: return
        once a replay that began after this change is done (a submission's acknowledgement reads
        its estimates), however many changes come after it."""
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
        this_round = self._round
        if self._replaying is None:
            self._replaying = asyncio.create_task(self._replay_moves(), name="estimates")
        if wait:
            await asyncio.shield(this_round)

    async def _replay_moves(self) -> None:
        """Replay the queue while changes wait for a replay, at most once per `ESTIMATES_EVERY_S`
        (changes that come meanwhile share the next replay), and settle each round's waiters."""
        loop = asyncio.get_running_loop()
        this_round: asyncio.Future | None = None
        try:
            while self._round is not None:
                await asyncio.sleep(self._next_replay_at - loop.time())
                this_round, self._round = self._round, None  # later changes wait for the next replay
                began = loop.time()
                try:
                    await self._replay()
                except Exception:  # the estimates or their listener: the last estimates stay
                    log.exception("replaying the queue for its estimates failed")
                finally:
                    self._next_replay_at = loop.time() + max(ESTIMATES_EVERY_S, loop.time() - began)
                    this_round.set_result(None)
        finally:
            self._replaying = None
            for waiting in (this_round, self._round):  # cancelled: nobody waits forever
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            self._round = None

    async def _replay(self) -> None:
        """New estimates, told to the listener. The loop only copies the queue (`FairQueue.replay`,
        O(n): milliseconds at 10,000 jobs); the replay itself (a few hundred of them there) runs on
        a worker thread, so Discord's heartbeat and interactions go on."""
        estimates = await asyncio.to_thread(self.queue.replay().run)
        # Jobs that started while the thread replayed are no longer waiting.
        self.estimates = {job_id: estimate for job_id, estimate in estimates.items()
                          if (job := self.queue.get(job_id)) and job.state is JobState.QUEUED}
        if self._listener is not None:
            await self._listener.queue_moved(self.estimates)

    def _read_input(self, sha256: str) -> bytes:
        """A stored input image, for the engine on a device thread: storage answers on the loop."""
        assert self._loop is not None, "the engine runs only after start()"
        path = asyncio.run_coroutine_threadsafe(input_path(self.db, sha256), self._loop).result(timeout=INPUT_WAIT_S)
        return path.read_bytes()

    # -- start-up and housekeeping --

    async def _restore(self) -> None:
        """Paused guilds paused again; queued and running jobs back into the queue in submission
        order, running ones once."""
        for guild_id in await paused_guilds(self.db):
            self.queue.pause(guild_id)
        rows = await stored.jobs_by_state(self.db, JobState.QUEUED, JobState.RUNNING)
        jobs = [
            Job(row.id, row.request, row.owner_id, row.guild_id, row.weight, row.seq, row.attempts, row.state)
            for row in rows
        ]
        given_up = {job.id for job in self.queue.restore(jobs)}
        for row in rows:
            if row.id in given_up:
                await stored.fail_job(self.db, row.id, GAVE_UP)  # told with the untold results at start
            elif row.state is JobState.RUNNING:
                await stored.requeue_job(self.db, row.id)
        if rows:
            log.info("restored %d jobs, gave up on %d", len(rows) - len(given_up), len(given_up))

    async def _tell_untold(self) -> None:
        """Finished jobs whose owner was never told (a crash or a failed post between finishing and
        delivering; jobs given up at restore), told again, oldest first."""
        since = self.db.now() - RETELL_WITHIN_S
        for job in await stored.undelivered(self.db, finished_since=since):
            await self._tell_finished(job.id)

    async def _retain(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_EVERY_S)
            try:
                await apply_retention(self.db)
            except Exception:
                log.exception("retention failed; it runs again in %g s", RETENTION_EVERY_S)
