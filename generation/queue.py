"""The fair-share queue in front of the GPUs: who runs next, and when.

Design: two-level start-time fair queueing (SFQ, Goyal, Vin and Cheng 1996), not deficit round
robin. Guilds (DMs count as one guild) are the flows of the root and share the GPUs equally; the
(guild, user) pairs are the flows of a guild and share its part by the weight of each job (the
submitter's roles); a user's own jobs run in submission order. Every flow carries a start tag S and
a finish tag F in its parent's virtual time v:

- serving a job of cost c and weight w from a flow: F = S + c / w (guild level: w = 1);
- a flow that becomes eligible (it gets a job, or its owner's running slot frees up) starts at
  S = max(v, F): it resumes where it stopped, but earns no credit for the time it was idle;
- the parent serves the eligible flow with the smallest S (ties: first eligible first) and sets
  v = S. A served flow leaves and re-enters by the same rule, so a backlogged flow gets S = F.

A guild its moderators paused is not eligible at the root, whatever it holds: the other guilds
share the GPUs as if it had no jobs, and on resume it re-enters by the rule above, competing as a
newly active flow with no credit for the pause; its users' tags inside it are left as they were.

Why SFQ rather than DRR: a start tag does not depend on the cost of the job that will be served,
so the two levels compose without knowing in advance which job a guild will send next; costs
span four orders of magnitude (one 512x512 step up to four 2048x2048 images of 60 steps), and DRR
needs a quantum as large as the biggest job to stay O(1), which makes its short-term unfairness
as large as that job, while SFQ lets a newly active flow go next after at most the job in service.
Submit and dispatch are O(log n) with heaps (stale entries are skipped lazily); cancelling is
O(log n) plus the length of its owner's queue.

Position and ETA come from replaying the same scheduler on a copy-on-write fork of the tree,
O(n log n) per call; batching looks a few picks ahead on such a fork. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from generation.prompts import LoraSet, lora_set
from generation.request import GenerationRequest, JobState, Kind, new_job_id
from generation.settings import QueueSettings

#: A running job interrupted by a restart is re-run this many times, then given up.
MAX_RERUNS = 1
#: How many upcoming fair picks `next_batch` may pull a compatible job from.
BATCH_LOOKAHEAD = 16
#: Weight of a new throughput sample in the moving average.
THROUGHPUT_ALPHA = 0.2

FlowKey = tuple[int | None, int]  # (guild id, user id)
#: Jobs with equal keys can share one pipeline batch.
BatchKey = tuple[str, Kind, int, int, int, str, float | None, LoraSet]


class Refused(Exception):
    """A request the queue will not carry out; `str(error)` is the reason, written for the user."""


@dataclass(frozen=True)
class Submission:
    """What the bot hands to `submit`: the request and who asked, with their fair-share weight."""

    request: GenerationRequest
    owner_id: int
    guild_id: int | None
    weight: float = 1.0
    #: The member's role ids, for moderator limits that depend on roles.
    role_ids: tuple[int, ...] = ()


@dataclass(eq=False)
class Job:
    """One accepted request on its way through the queue and the runner."""

    id: str
    request: GenerationRequest
    owner_id: int
    guild_id: int | None
    weight: float
    #: Submission order; storage keeps it so a restart restores the same order.
    seq: int
    #: Times the job was re-run after a restart interrupted it.
    attempts: int = 0
    state: JobState = JobState.QUEUED
    device: str | None = None
    #: Queue clock time the job was dispatched.
    started_at: float | None = None
    #: Set when the job is cancelled while running; the runner stops it at the next step.
    cancel_reason: str | None = None

    @property
    def cost(self) -> float:
        return self.request.cost

    @property
    def flow(self) -> FlowKey:
        return (self.guild_id, self.owner_id)

    @cached_property
    def batch_key(self) -> BatchKey:
        """Computed once (the request never changes): batching compares it often."""
        r = self.request
        # The LoRA set too: it is merged into the weights for the whole batch.
        return (r.model, r.kind, r.width, r.height, r.steps, r.sampler, r.strength, lora_set(r.prompt))


@dataclass(frozen=True)
class Estimate:
    """Where a queued job stands: 1-based place in the dispatch order, seconds until it starts;
    both None while its guild's moderators have paused it (it has neither until they resume)."""

    position: int | None
    starts_in_s: float | None

    @property
    def paused(self) -> bool:
        return self.position is None


@dataclass(frozen=True)
class JobView:
    """One line of the moderators' view of the queue."""

    id: str
    owner_id: int
    guild_id: int | None
    cost: float
    weight: float
    state: JobState
    position: int | None
    starts_in_s: float | None
    device: str | None
    #: Queued in a guild paused by its moderators: no position until it resumes.
    paused: bool = False


@dataclass(frozen=True)
class Snapshot:
    #: The operator's hold on every guild (`pause(None)`); a guild's own pause shows in its jobs.
    paused: bool
    draining: bool
    running: tuple[JobView, ...]
    queued: tuple[JobView, ...]
    #: Measured cost units per second, per device.
    throughput: Mapping[str, float]


LimitCheck = Callable[[Submission], Awaitable[str | None]]
Persist = Callable[[Job], Awaitable[None]]


def role_weight(role_weights: Mapping[str, float], roles: Iterable[str]) -> float:
    """A member's fair-share weight: the largest weight among their roles, 1 if none is listed."""
    return max((role_weights[role] for role in roles if role in role_weights), default=1.0)


# ---------------------------------------------------------------------------------------------
# The scheduler proper: two-level SFQ over (guild, user) flows.

_Entry = tuple[float, int, int, object]  # (start tag, activation order, flow version, flow key)


@dataclass(slots=True)
class _Flow:
    """A flow at either level. Its heap entry is valid while `active` and the versions match."""

    start: float = 0.0
    finish: float = 0.0
    version: int = 0
    active: bool = False


@dataclass(slots=True)
class _UserFlow(_Flow):
    jobs: deque[Job] = field(default_factory=deque)

    def copy(self) -> _UserFlow:
        return _UserFlow(self.start, self.finish, self.version, self.active, deque(self.jobs))


@dataclass(slots=True)
class _GuildFlow(_Flow):
    #: Heap of this guild's eligible user flows and its virtual time.
    heap: list[_Entry] = field(default_factory=list)
    v: float = 0.0
    eligible: int = 0

    def copy(self) -> _GuildFlow:
        heap = list(self.heap)
        return _GuildFlow(
            self.start, self.finish, self.version, self.active, heap, self.v, self.eligible
        )


class _Tree:
    """The two-level SFQ state. A fork shares its parent's flows until it touches them (copy on
    write), so looking ahead or replaying the whole queue never disturbs the real order."""

    def __init__(self, running_cap: int, parent: _Tree | None = None) -> None:
        self._cap = running_cap
        self._parent = parent
        self._users: dict[FlowKey, _UserFlow] = {}
        self._guilds: dict[int | None, _GuildFlow] = {}
        self._running: dict[int, int] = {}
        self._owner_flows: dict[int, set[FlowKey]] = parent._owner_flows if parent else {}
        self._paused: set[int] = parent._paused if parent else set()
        self._heap: list[_Entry] = list(parent._heap) if parent else []
        self._v = parent._v if parent else 0.0
        self._order = parent._order if parent else 0

    def fork(self) -> _Tree:
        return _Tree(self._cap, parent=self)

    # -- flow access (copy on write in a fork) --

    def _user(self, key: FlowKey) -> _UserFlow:
        flow = self._users.get(key)
        if flow is None:
            base = self._parent._users.get(key) if self._parent else None
            flow = self._users[key] = base.copy() if base else _UserFlow()
            if base is None:
                self._owner_flows.setdefault(key[1], set()).add(key)
        return flow

    def _guild(self, key: int | None) -> _GuildFlow:
        flow = self._guilds.get(key)
        if flow is None:
            base = self._parent._guilds.get(key) if self._parent else None
            flow = self._guilds[key] = base.copy() if base else _GuildFlow()
        return flow

    def _seen(self, key: object, level: str) -> _Flow:
        """A flow for reading only: no copy in a fork."""
        own = self._users if level == "user" else self._guilds
        return own[key] if key in own or self._parent is None else self._parent._seen(key, level)

    def running(self, owner: int) -> int:
        if owner in self._running or self._parent is None:
            return self._running.get(owner, 0)
        return self._parent.running(owner)

    # -- public operations --

    def add(self, job: Job) -> None:
        self._user(job.flow).jobs.append(job)
        self._refresh(job.flow)

    def remove(self, job: Job) -> None:
        self._user(job.flow).jobs.remove(job)
        self._refresh(job.flow)

    def peek(self) -> Job | None:
        """The job the scheduler would dispatch next."""
        guild = self._top(self._heap, "guild")
        if guild is None:
            return None
        user = self._top(self._guild(guild[3]).heap, "user")
        return self._seen(user[3], "user").jobs[0]

    def pop(self) -> Job | None:
        """Dispatch the next job in fair order."""
        job = self.peek()
        if job is not None:
            guild = self._guild(job.guild_id)
            self._v, guild.v = guild.start, self._user(job.flow).start
            self.take(job)
        return job

    def is_head(self, job: Job) -> bool:
        """Whether `job` may be dispatched now without breaking FIFO or the running cap."""
        flow = self._user(job.flow)
        return flow.active and flow.jobs[0] is job

    def take(self, job: Job) -> None:
        """Dispatch `job` (the head of an eligible flow), charging its cost to its own flows."""
        user, guild = self._user(job.flow), self._guild(job.guild_id)
        user.jobs.popleft()
        user.finish = user.start + job.cost / job.weight
        guild.finish = guild.start + job.cost
        self._running[job.owner_id] = self.running(job.owner_id) + 1
        self._deactivate_user(job.flow)
        self._deactivate_guild(job.guild_id)
        for key in self._owner_flows[job.owner_id]:  # job.flow among them
            self._refresh(key)

    def release(self, owner: int) -> None:
        """One of `owner`'s running jobs ended: their flows may become eligible again."""
        self._running[owner] = self.running(owner) - 1
        for key in self._owner_flows.get(owner, ()):
            self._refresh(key)

    def pause(self, guild: int) -> None:
        self._paused.add(guild)
        self._refresh_guild(guild)

    def resume(self, guild: int) -> None:
        self._paused.discard(guild)
        self._refresh_guild(guild)

    def is_paused(self, guild: int | None) -> bool:
        return guild in self._paused

    # -- eligibility --

    def _refresh(self, key: FlowKey) -> None:
        """Bring a user flow and its guild in line with the rule: eligible iff it has a job and its
        owner is under the running cap."""
        user = self._user(key)
        want = bool(user.jobs) and self.running(key[1]) < self._cap
        if want and not user.active:
            guild = self._guild(key[0])
            user.active, user.start = True, max(guild.v, user.finish)
            self._push(guild.heap, user, key)
            guild.eligible += 1
        elif not want and user.active:
            self._deactivate_user(key)
        self._refresh_guild(key[0])

    def _refresh_guild(self, key: int | None) -> None:
        """The same rule one level up: eligible iff one of its users is and it is not paused."""
        guild = self._guild(key)
        want = guild.eligible > 0 and key not in self._paused
        if want and not guild.active:
            guild.active, guild.start = True, max(self._v, guild.finish)
            self._push(self._heap, guild, key)
        elif not want and guild.active:
            self._deactivate_guild(key)

    def _deactivate_user(self, key: FlowKey) -> None:
        user = self._user(key)
        if user.active:
            user.active, user.version = False, user.version + 1
            self._guild(key[0]).eligible -= 1

    def _deactivate_guild(self, key: int | None) -> None:
        guild = self._guild(key)
        if guild.active:
            guild.active, guild.version = False, guild.version + 1

    def _push(self, heap: list[_Entry], flow: _Flow, key: object) -> None:
        self._order += 1
        heapq.heappush(heap, (flow.start, self._order, flow.version, key))

    def _top(self, heap: list[_Entry], level: str) -> _Entry | None:
        """The valid entry with the smallest start tag, dropping stale entries on the way (the
        entry, not its key: the DM guild's key is None)."""
        while heap:
            _, _, version, key = heap[0]
            flow = self._seen(key, level)
            if flow.active and flow.version == version:
                return heap[0]
            heapq.heappop(heap)
        return None


# ---------------------------------------------------------------------------------------------


class FairQueue:
    """The queue the bot submits to and the runner takes batches from (one asyncio loop)."""

    def __init__(
        self,
        settings: QueueSettings,
        devices: Sequence[str] = ("cpu",),
        *,
        limits: LimitCheck | None = None,
        persist: Persist | None = None,
        initial_throughput: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`devices` are the runner's (ETAs simulate one server each); `limits` returns a refusal
        reason or None (the moderator limits from storage); `persist` stores an accepted job
        before `submit` returns (if it raises, the job is not queued); `initial_throughput` (cost
        units per second) stands in for a device until the runner has measured it."""
        self._settings = settings
        self._limits = limits
        self._persist = persist
        self._clock = clock
        self._tree = _Tree(settings.max_running_per_user)
        self._jobs: dict[str, Job] = {}
        self._queued = Counter[int]()
        self._queued_total = 0
        self._seq = 0
        self._initial_throughput = initial_throughput
        self._throughput = {device: initial_throughput for device in devices}
        self._measured: set[str] = set()
        self._submit_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._paused_all = False
        self.draining = False

    # -- submitting --

    async def submit(self, submission: Submission) -> Job:
        """Accept a request, or raise `Refused` with the reason (a refusal changes nothing)."""
        if submission.weight <= 0:
            raise ValueError(f"a fair-share weight must be > 0, got {submission.weight}")
        async with self._submit_lock:
            reason = self._refusal(submission.owner_id)
            if reason is None and self._limits is not None:
                reason = await self._limits(submission)
            if reason is not None:
                raise Refused(reason)
            job = Job(
                id=new_job_id(),
                request=submission.request,
                owner_id=submission.owner_id,
                guild_id=submission.guild_id,
                weight=submission.weight,
                seq=self._seq,
            )
            if self._persist is not None:
                await self._persist(job)
            self._seq += 1
            self._enqueue(job)
            return job

    def _refusal(self, owner: int) -> str | None:
        cap, total = self._settings.max_queued_per_user, self._settings.max_queued_total
        if self.draining:
            return "Atelier is about to restart and takes no new jobs; try again in a minute"
        if self._queued[owner] >= cap:
            return (
                f"you already have {self._queued[owner]} jobs queued (the limit is {cap}); "
                "wait for one to finish or cancel one"
            )
        if self._queued_total >= total:
            return (
                f"the queue is full ({total} jobs waiting, the limit); try again in a few minutes"
            )
        return None

    def _enqueue(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._queued[job.owner_id] += 1
        self._queued_total += 1
        self._tree.add(job)
        self._changed.set()

    def restore(self, jobs: Iterable[Job]) -> list[Job]:
        """Re-enqueue persisted jobs after a restart, in their original submission order, ignoring
        the caps they passed once. A job that was running is queued again with attempts + 1,
        `MAX_RERUNS` times; jobs past that are returned instead, for the caller to fail."""
        given_up = []
        for job in sorted(jobs, key=lambda j: j.seq):
            if job.state is JobState.RUNNING:
                if job.attempts >= MAX_RERUNS:
                    given_up.append(job)
                    continue
                job.attempts += 1
            elif job.state is not JobState.QUEUED:
                raise ValueError(f"job {job.id} is {job.state}; only queued or running jobs return")
            job.state, job.device, job.started_at = JobState.QUEUED, None, None
            job.cancel_reason = None
            self._seq = max(self._seq, job.seq + 1)
            self._enqueue(job)
        return given_up

    # -- moderating --

    def cancel(self, job_id: str, *, by: int, moderator: bool = False) -> Job:
        """Cancel a job for its owner or for a moderator of its guild (the bot checks which).

        A queued job leaves the queue at once (state cancelled); a running one gets
        `cancel_reason` and the runner stops it at its next step and finishes it."""
        job = self._jobs.get(job_id)
        if job is None:
            raise Refused(f"there is no queued or running job `{job_id}`; it may have finished")
        if job.owner_id != by and not moderator:
            raise Refused("only the member who asked for a job, or a moderator, can cancel it")
        reason = "cancelled by its owner" if job.owner_id == by else "cancelled by a moderator"
        if job.state is JobState.QUEUED:
            self._tree.remove(job)
            self._queued[job.owner_id] -= 1
            self._queued_total -= 1
            del self._jobs[job_id]
            job.state, job.cancel_reason = JobState.CANCELLED, reason
            self._changed.set()
        else:
            job.cancel_reason = job.cancel_reason or reason
        return job

    def pause(self, guild_id: int | None = None) -> None:
        """Stop dispatching one guild's jobs (its moderators' pause: the other guilds' jobs go on
        and it earns no fair-share credit meanwhile), or with None every job (the operator's hold,
        the only pause of DMs). Submissions are still accepted and running jobs finish."""
        if guild_id is None:
            self._paused_all = True
        else:
            self._tree.pause(guild_id)

    def resume(self, guild_id: int | None = None) -> None:
        """Undo `pause(guild_id)`. Each level is lifted on its own: ending the operator's hold
        does not resume a guild its moderators paused."""
        if guild_id is None:
            self._paused_all = False
        else:
            self._tree.resume(guild_id)
        self._changed.set()

    def is_paused(self, guild_id: int | None = None) -> bool:
        """Whether `pause(guild_id)` is in force (None: the operator's hold on every guild)."""
        return self._paused_all if guild_id is None else self._tree.is_paused(guild_id)

    def drain(self) -> None:
        """Refuse new submissions but keep dispatching what is queued (before a restart)."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running."""
        while self._jobs:
            self._changed.clear()
            await self._changed.wait()

    # -- dispatching (the runner) --

    def next_batch(
        self, device: str, max_images: int, max_pixels: float | None = None
    ) -> list[Job]:
        """The scheduler's next job plus compatible jobs (same `batch_key`) that are among its
        next `BATCH_LOOKAHEAD` fair picks and each the head of its own flow, while the batch holds
        at most `max_images` images and `max_pixels` work pixels (`GenerationRequest.work_pixels`,
        which memory follows; the head job always goes).
        Each job is charged to its own flow, so batching moves a job at most a few picks early
        and the shares stay as without batching. Empty when everything is paused (`pause(None)`)
        or nothing is eligible (a paused guild's jobs are not)."""
        head = None if self._paused_all else self._tree.pop()
        if head is None:
            return []
        self._throughput.setdefault(device, self._initial_throughput)
        batch, images = [head], head.request.count
        pixels_per_image = head.request.work_pixels  # SD-equivalent: an x4 image weighs far more
        budget = min(max_images, max_pixels / pixels_per_image if max_pixels else max_images)
        ahead = self._tree.fork() if images < budget else None
        for _ in range(BATCH_LOOKAHEAD if ahead else 0):
            job = ahead.pop()
            if job is None or images >= budget:
                break
            if (
                job.batch_key == head.batch_key
                and images + job.request.count <= budget
                and self._tree.is_head(job)
            ):
                self._tree.take(job)
                batch.append(job)
                images += job.request.count
        now = self._clock()
        self._queued_total -= len(batch)
        for job in batch:
            self._queued[job.owner_id] -= 1
            job.state, job.device, job.started_at = JobState.RUNNING, device, now
        return batch

    async def wait_batch(
        self, device: str, max_images: int, max_pixels: float | None = None
    ) -> list[Job]:
        """`next_batch`, waiting until there is one."""
        while not (batch := self.next_batch(device, max_images, max_pixels)):
            self._changed.clear()
            await self._changed.wait()
        return batch

    def finish(self, job: Job, state: JobState) -> None:
        """The runner ended a running job (done, failed or cancelled); frees its owner's slot."""
        if job.state is not JobState.RUNNING or self._jobs.get(job.id) is not job:
            raise ValueError(f"job {job.id} is {job.state}, not running; it cannot finish twice")
        if state not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            raise ValueError(f"a job finishes as done, failed or cancelled, not {state}")
        job.state = state
        del self._jobs[job.id]
        self._tree.release(job.owner_id)
        self._changed.set()

    def record_throughput(self, device: str, cost: float, seconds: float) -> None:
        """Fold one measured batch into the device's moving average of cost units per second."""
        if cost <= 0 or seconds <= 0:
            return
        rate = cost / seconds
        old = self._throughput.get(device, rate) if device in self._measured else rate
        self._throughput[device] = THROUGHPUT_ALPHA * rate + (1 - THROUGHPUT_ALPHA) * old
        self._measured.add(device)

    # -- observing --

    def __len__(self) -> int:
        """Jobs queued (not running)."""
        return self._queued_total

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def estimates(self) -> dict[str, Estimate]:
        """Position and expected start of every queued job, by replaying the scheduler on a fork
        with the measured throughput: O(n log n). Assumes no batching and no new arrivals, and
        that the operator's hold ends now. Jobs of paused guilds get a `paused` estimate (no place,
        no start), so their status can say so; the others are placed as if those were not there."""
        tree, now = self._tree.fork(), self._clock()
        # Each device frees up when its running batch ends (estimated), releasing its owners.
        started = {device: now for device in self._throughput}
        cost = dict.fromkeys(self._throughput, 0.0)
        owners: dict[str, list[int]] = {device: [] for device in self._throughput}
        for job in self._jobs.values():
            if job.state is JobState.RUNNING:
                started[job.device] = min(started[job.device], job.started_at)
                cost[job.device] += job.cost
                owners[job.device].append(job.owner_id)
        events = [
            (max(now, started[d] + cost[d] / self._throughput[d]), order, d, owners[d])
            for order, d in enumerate(self._throughput)
        ]
        heapq.heapify(events)
        order = len(events)
        result: dict[str, Estimate] = {}
        while events and len(result) < len(self):
            at, _, device, freed = heapq.heappop(events)
            for owner in freed:
                tree.release(owner)
            job = tree.pop()
            order += 1
            if job is None:  # everyone left waits for a running job of theirs: idle until one ends
                if not any(event[3] for event in events):
                    break
                heapq.heappush(events, (events[0][0], order, device, []))
                continue
            result[job.id] = Estimate(len(result) + 1, at - now)
            end = at + job.cost / self._throughput[device]
            heapq.heappush(events, (end, order, device, [job.owner_id]))
        held = Estimate(None, None)
        result.update((job.id, held) for job in self._jobs.values()
                      if job.state is JobState.QUEUED and self._tree.is_paused(job.guild_id))
        return result

    def snapshot(self) -> Snapshot:
        """Everything queued and running, with positions, for moderators."""
        estimates = self.estimates()

        def view(job: Job) -> JobView:
            estimate = estimates.get(job.id)  # running jobs have none
            return JobView(
                job.id, job.owner_id, job.guild_id, job.cost, job.weight, job.state,
                estimate.position if estimate else None,
                estimate.starts_in_s if estimate else None,
                job.device,
                estimate is not None and estimate.paused,
            )

        running = [view(j) for j in self._jobs.values() if j.state is JobState.RUNNING]
        queued = sorted(
            (view(j) for j in self._jobs.values() if j.state is JobState.QUEUED),
            key=lambda v: v.position if v.position is not None else len(self._jobs),
        )
        throughput = dict(self._throughput)
        return Snapshot(self._paused_all, self.draining, tuple(running), tuple(queued), throughput)
