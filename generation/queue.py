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

Position and ETA come from replaying the same scheduler, batching included, on a copy of the tree,
O(n log n) per call; batching looks a few picks ahead on a copy-on-write fork. The event loop only
takes the copy (`FairQueue.replay`, O(n)); the replay (`Replay.run`) may then run on a worker
thread (the studio's), holding the interpreter a couple of milliseconds at a time. A batch lasts its
cost over the rate measured for batches of its model, size and image count (`record_batch`), so the
ETA includes the speed-up of batching; until a size was measured, the device's average stands in
and the estimate says it is not `measured`. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from generation.prompts import LoraSet, lora_set
from generation.request import GenerationRequest, JobState, Kind, RateKey, new_job_id
from generation.settings import QueueSettings

#: A running job interrupted by a restart is re-run this many times, then given up.
MAX_RERUNS = 1
#: How many upcoming fair picks `next_batch` may pull a compatible job from.
BATCH_LOOKAHEAD = 16
#: A replay lets go of the interpreter this often (seconds), so that on a worker thread it holds
#: the event loop back for about this long at most, not for Python's 5 ms switch interval or more.
REPLAY_SLICE_S = 0.002
#: Weight of a new throughput sample in the moving average.
THROUGHPUT_ALPHA = 0.2

FlowKey = tuple[int | None, int]  # (guild id, user id)
#: Jobs with equal keys can share one pipeline batch.
BatchKey = tuple[str, Kind, int, int, int, str, float | None, LoraSet]
#: Measured batch rates (cost units per second) by (model, width, height), then images per batch.
Rates = dict[tuple[str, int, int], dict[int, float]]
#: A device in a replay: (when it frees up, order, device, owners it releases, measured).
_Event = tuple[float, int, str, list[int], bool]


class Refused(Exception):
    """A request the queue will not carry out; `str(error)` is the reason, written for the user
    (`explain`: every reason at once when there are several), `reasons` each one."""

    def __init__(self, *reasons: str) -> None:
        super().__init__(explain(reasons))
        self.reasons = reasons


def explain(reasons: Sequence[str]) -> str:
    """One reason as it is; several as one list, so a member can fix everything in one go."""
    if len(reasons) == 1:
        return reasons[0]
    lines = "\n".join(f"- {reason[:1].upper()}{reason[1:]}" for reason in reasons)
    return f"This request cannot run here, for {len(reasons)} reasons:\n{lines}"


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

    @cached_property
    def cost(self) -> float:
        """The request's cost, computed once: replays read it thousands of times."""
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
    """Where a queued job stands: 1-based place in the dispatch order and seconds until it starts.
    While its guild's moderators have paused it, `position` is its place were they to resume now
    and `starts_in_s` is None. `measured`: every batch before its start has a measured rate, so
    the time is worth showing (otherwise it rests on a guess)."""

    position: int | None
    starts_in_s: float | None
    paused: bool = False
    measured: bool = False


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
    #: Queued in a guild paused by its moderators: its position is where it would be on resume.
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


#: Every reason a submission may not run (the moderators' limits from storage); empty if it may.
LimitCheck = Callable[[Submission], Awaitable[Sequence[str]]]
Persist = Callable[[Job], Awaitable[None]]
#: Stores a new moving average of a batch rate (cost units per second) so a restart keeps it.
SaveRate = Callable[[RateKey, float], Awaitable[None]]


def _moving_average(old: float | None, sample: float) -> float:
    """The exponential moving average after `sample` (the sample itself when there is none yet)."""
    return sample if old is None else THROUGHPUT_ALPHA * sample + (1 - THROUGHPUT_ALPHA) * old


def rate_key(batch: Sequence[Job]) -> RateKey:
    """The key a batch's measured rate is kept under (its jobs share model and size)."""
    r = batch[0].request
    return (r.model, r.width, r.height, sum(job.request.count for job in batch))


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
        self._paused: set[int] = set(parent._paused) if parent else set()
        self._heap: list[_Entry] = list(parent._heap) if parent else []
        self._v = parent._v if parent else 0.0
        self._order = parent._order if parent else 0

    def fork(self) -> _Tree:
        return _Tree(self._cap, parent=self)

    def copy(self) -> _Tree:
        """An independent copy of this tree (not a fork: it shares nothing mutable, so it may be
        replayed on another thread while this one moves on), its heaps without stale entries:
        entries never tie (activation order), so the heaps pop in the same order."""
        assert self._parent is None, "copy the queue's tree, not a fork of it"
        tree = _Tree(self._cap)
        tree._users = {key: flow.copy() for key, flow in self._users.items()}
        tree._guilds = {key: flow.copy() for key, flow in self._guilds.items()}
        for guild in tree._guilds.values():
            guild.heap = tree._valid(guild.heap, "user")
        tree._heap = tree._valid(self._heap, "guild")
        tree._running = dict(self._running)
        tree._owner_flows = {owner: set(keys) for owner, keys in self._owner_flows.items()}
        tree._paused = set(self._paused)
        tree._v, tree._order = self._v, self._order
        return tree

    # -- flow access (copy on write in a fork) --

    def _user(self, key: FlowKey) -> _UserFlow:
        flow = self._users.get(key)
        if flow is None:
            base = self._parent._find(key, "user") if self._parent else None
            flow = self._users[key] = base.copy() if base else _UserFlow()
            if base is None:
                self._owner_flows.setdefault(key[1], set()).add(key)
        return flow

    def _guild(self, key: int | None) -> _GuildFlow:
        flow = self._guilds.get(key)
        if flow is None:
            base = self._parent._find(key, "guild") if self._parent else None
            flow = self._guilds[key] = base.copy() if base else _GuildFlow()
        return flow

    def _find(self, key: object, level: str) -> _Flow | None:
        """A flow for reading only, from the nearest fork that has it (no copy); None if none."""
        tree = self
        while True:  # not recursive: replays call this a million times
            flow = (tree._users if level == "user" else tree._guilds).get(key)
            if flow is not None or tree._parent is None:
                return flow
            tree = tree._parent

    def _seen(self, key: object, level: str) -> _Flow:
        flow = self._find(key, level)
        assert flow is not None, f"a heap entry without its {level} flow"
        return flow

    def running(self, owner: int) -> int:
        tree = self
        while owner not in tree._running and tree._parent is not None:
            tree = tree._parent
        return tree._running.get(owner, 0)

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

    def paused_guilds(self) -> set[int]:
        return set(self._paused)

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

    def _valid(self, heap: list[_Entry], level: str) -> list[_Entry]:
        """The entries of `heap` that are not stale, as a heap."""
        valid = [entry for entry in heap if self._current(entry, level)]
        heapq.heapify(valid)
        return valid

    def _current(self, entry: _Entry, level: str) -> bool:
        """Whether a heap entry still stands for its flow (it is active and was not re-pushed)."""
        flow = self._seen(entry[3], level)
        return flow.active and flow.version == entry[2]

    def _top(self, heap: list[_Entry], level: str) -> _Entry | None:
        """The valid entry with the smallest start tag, dropping stale entries on the way (the
        entry, not its key: the DM guild's key is None)."""
        while heap:
            if self._current(heap[0], level):
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
        rates: Mapping[RateKey, float] | None = None,
        save_rate: SaveRate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`devices` are the runner's (ETAs simulate one server each); `limits` returns every
        reason to refuse (the moderator limits from storage), told together with the queue's own; `persist` stores an accepted job
        before `submit` returns (if it raises, the job is not queued); `initial_throughput` (cost
        units per second) stands in for a device until the runner has measured it; `rates` are
        the batch rates measured before (`record_batch`), and `save_rate` stores each new one."""
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
        self._rates: Rates = {}
        for (model, width, height, images), rate in (rates or {}).items():
            self._rates.setdefault((model, width, height), {})[images] = rate
        self._save_rate = save_rate
        self._submit_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._paused_all = False
        self.draining = False

    # -- submitting --

    async def submit(self, submission: Submission) -> Job:
        """Accept a request, or raise `Refused` with every reason (a refusal changes nothing)."""
        if submission.weight <= 0:
            raise ValueError(f"a fair-share weight must be > 0, got {submission.weight}")
        async with self._submit_lock:
            if self.draining:
                raise Refused("Atelier is about to restart and takes no new jobs; try again in a minute")
            reasons = self._refusals(submission.owner_id)
            if self._limits is not None:
                reasons += await self._limits(submission)
            if reasons:
                raise Refused(*reasons)
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

    def _refusals(self, owner: int) -> list[str]:
        """The queue's own caps (`[queue]`), which no moderator can raise."""
        cap, total = self._settings.max_queued_per_user, self._settings.max_queued_total
        reasons = []
        if self._queued[owner] >= cap:
            reasons.append(f"you already have {self._queued[owner]} jobs queued (the limit is {cap}); "
                           "wait for one to finish or cancel one")
        if self._queued_total >= total:
            reasons.append(f"the queue is full ({total} jobs waiting, the limit); try again in a few minutes")
        return reasons

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
        batch = _gather(self._tree, head, max_images, max_pixels)
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

    async def record_batch(self, device: str, batch: Sequence[Job], seconds: float) -> None:
        """Fold one batch that ran to its end in `seconds` into the moving averages: the device's
        throughput and the rate of batches of its model, size and image count, which `save_rate`
        stores (an error there is the caller's to log; the average is kept in memory anyway)."""
        cost = sum(job.cost for job in batch)
        if cost <= 0 or seconds <= 0:
            return
        self.record_throughput(device, cost, seconds)
        model, width, height, images = key = rate_key(batch)
        rates = self._rates.setdefault((model, width, height), {})
        rates[images] = _moving_average(rates.get(images), cost / seconds)
        if self._save_rate is not None:
            await self._save_rate(key, rates[images])

    def rate(self, key: RateKey) -> float | None:
        """The measured rate of batches like `key` (see `_rate`); None if that model and size never ran."""
        return _rate(self._rates, key)

    def record_throughput(self, device: str, cost: float, seconds: float) -> None:
        """Fold one measured batch into the device's moving average of cost units per second."""
        if cost <= 0 or seconds <= 0:
            return
        old = self._throughput.get(device) if device in self._measured else None
        self._throughput[device] = _moving_average(old, cost / seconds)
        self._measured.add(device)

    # -- observing --

    def __len__(self) -> int:
        """Jobs queued (not running)."""
        return self._queued_total

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def estimates(self) -> dict[str, Estimate]:
        """Position and expected start of every queued job (`replay().run()`)."""
        return self.replay().run()

    async def estimates_in_thread(self) -> dict[str, Estimate]:
        """`estimates` for callers on the event loop: the loop only copies the queue, the replay
        runs on a worker thread (hundreds of milliseconds at 10,000 queued jobs)."""
        return await asyncio.to_thread(self.replay().run)

    def replay(self) -> Replay:
        """What `estimates` needs, copied now (O(n), cheap): run it here or on a worker thread."""
        now = self._clock()
        running: dict[str, list[Job]] = {}
        queued = []
        for job in self._jobs.values():
            if job.state is JobState.RUNNING:
                running.setdefault(job.device or "", []).append(job)
            elif job.state is JobState.QUEUED:
                queued.append(job)
        devices: list[_Event] = []
        for order, device in enumerate(self._throughput):
            batches: dict[float | None, list[Job]] = {}
            for job in running.get(device, ()):
                batches.setdefault(job.started_at, []).append(job)
            busy, measured = 0.0, True
            for batch in batches.values():
                seconds, known = _duration(self._rates, self._throughput, self._initial_throughput, device, batch)
                busy, measured = busy + seconds, measured and known
            began = min((job.started_at or now for job in running.get(device, ())), default=now)
            owners = [job.owner_id for job in running.get(device, ())]
            devices.append((max(now, began + busy), order, device, owners, measured))
        held = [job for job in queued if self._tree.is_paused(job.guild_id)]
        resumed = None
        if held:
            resumed = self._tree.copy()
            for guild in resumed.paused_guilds():
                resumed.resume(guild)
        return Replay(
            now, devices, self._tree.copy(), resumed, queued, held,
            {size: dict(rates) for size, rates in self._rates.items()}, dict(self._throughput),
            self._initial_throughput, self._settings.max_batch_images,
        )

    def snapshot(self, estimates: Mapping[str, Estimate] | None = None) -> Snapshot:
        """Everything queued and running, with positions (from `estimates` when given), for moderators."""
        estimates = self.estimates() if estimates is None else estimates

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
            key=lambda v: (v.paused, v.position if v.position is not None else len(self._jobs)),
        )
        throughput = dict(self._throughput)
        return Snapshot(self._paused_all, self.draining, tuple(running), tuple(queued), throughput)


def _rate(rates: Rates, key: RateKey) -> float | None:
    """The measured rate of batches like `key`: of its image count, else of the nearest count
    measured for that model and size (the fewer images, the more conservative); None if that
    model and size never ran."""
    model, width, height, images = key
    sized = rates.get((model, width, height))
    if not sized:
        return None
    return sized[min(sized, key=lambda n: (abs(n - images), n))]


def _duration(
    rates: Rates, throughput: Mapping[str, float], initial: float, device: str, batch: Sequence[Job]
) -> tuple[float, bool]:
    """Seconds `batch` takes on `device`, and whether a measured rate says so (else the
    device's average throughput guesses it)."""
    cost = sum(job.cost for job in batch)
    rate = _rate(rates, rate_key(batch))
    if rate is None:
        return cost / throughput.get(device, initial), False
    return cost / rate, True


@dataclass(eq=False)
class Replay:
    """The queue at one moment, for `FairQueue.estimates`: its own copy of the scheduler's tree,
    so the replay, the costly part, may run on a worker thread while the queue moves on. Run once.

    It dispatches everything eligible onto the devices in simulated time, batching as the runner
    does: each device frees up when its batch ends (at the measured rate), releasing its owners'
    slots. Assumes no new arrivals and that the operator's hold ends now. The jobs of paused
    guilds are placed as if the pause ended now, with no start time (`paused`), in a second
    replay (`resumed`); the others as if those were not there."""

    now: float
    devices: list[_Event]
    tree: _Tree
    resumed: _Tree | None
    queued: list[Job]
    held: list[Job]
    rates: Rates
    throughput: dict[str, float]
    initial_throughput: float
    max_batch_images: int

    def run(self) -> dict[str, Estimate]:
        """Position and expected start of every queued job (O(n log n), see the class)."""
        result = self._place(self.tree)
        if self.resumed is not None:
            places = self._place(self.resumed)
            result.update((job.id, Estimate(places[job.id].position if job.id in places else None,
                                            None, paused=True)) for job in self.held)
        return result

    def _place(self, tree: _Tree) -> dict[str, Estimate]:
        events = list(self.devices)
        heapq.heapify(events)
        order = len(events)
        result: dict[str, Estimate] = {}
        # Jobs not placed yet by batch key: a head with no compatible job left needs no look-ahead.
        unplaced = Counter(job.batch_key for job in self.queued)
        pause_at = time.perf_counter() + REPLAY_SLICE_S
        while events and len(result) < len(self.queued):
            at, _, device, freed, measured = heapq.heappop(events)
            for owner in freed:
                tree.release(owner)
            head = tree.pop()
            order += 1
            if head is None:  # everyone left waits for a running job of theirs: idle until one ends
                # (the first event that frees someone: another idle device would wake this one in vain)
                freeing = [event for event in events if event[3]]
                if not freeing:
                    break
                wake = min(freeing)
                heapq.heappush(events, (wake[0], order, device, [], wake[4]))
                continue
            unplaced[head.batch_key] -= 1
            batch = _gather(tree, head, self.max_batch_images, None, unplaced[head.batch_key])
            unplaced[head.batch_key] -= len(batch) - 1
            for job in batch:
                result[job.id] = Estimate(len(result) + 1, at - self.now, measured=measured)
            seconds, known = _duration(self.rates, self.throughput, self.initial_throughput, device, batch)
            heapq.heappush(events, (at + seconds, order, device, [j.owner_id for j in batch],
                                    measured and known))
            if time.perf_counter() > pause_at:  # on a worker thread, let the event loop's thread in
                time.sleep(0)
                pause_at = time.perf_counter() + REPLAY_SLICE_S
        return result


def _gather(
    tree: _Tree, head: Job, max_images: int, max_pixels: float | None, compatible: float = math.inf
) -> list[Job]:
    """`head` (just popped from `tree`) and the compatible jobs among the next `BATCH_LOOKAHEAD`
    fair picks that are each the head of their flow, taken from `tree` (see `next_batch`);
    `compatible`: how many queued jobs share its batch key, if known (none: no look-ahead)."""
    batch, images = [head], head.request.count
    pixels_per_image = head.request.work_pixels  # SD-equivalent: an x4 image weighs far more
    budget = min(max_images, max_pixels / pixels_per_image if max_pixels else max_images)
    ahead = tree.fork() if images < budget and compatible > 0 else None
    for _ in range(BATCH_LOOKAHEAD if ahead else 0):
        job = ahead.pop()
        if job is None or images >= budget or len(batch) > compatible:
            break
        if job.batch_key == head.batch_key and images + job.request.count <= budget and tree.is_head(job):
            tree.take(job)
            batch.append(job)
            images += job.request.count
    return batch
