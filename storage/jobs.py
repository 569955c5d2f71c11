"""Jobs: what was asked, by whom, where the answer goes, and how far it got.

State machine (anything else raises `IllegalTransition`):

    queued  -> running | failed (it could not even start) | cancelled
    running -> done | failed | cancelled | queued (a restart interrupted it)
    done, failed, cancelled: final

Finishing a job records its usage in the same transaction, so the usage ledger can never
disagree with the jobs that are done.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import aiosqlite

from generation.request import JOB_ID_PATTERN, GenerationRequest, JobState, new_job_id
from storage.db import Database
from storage.images import ImageRecord, image_from_row

#: Job ids as they appear in button custom ids (part of the schema: see migrations/0001).
_HISTORY_PAGE_MAX = 100


_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A job was asked to move to a state it cannot reach from where it is."""


class UnknownJob(LookupError):
    pass


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    request: GenerationRequest
    owner_id: int
    guild_id: int | None
    channel_id: int
    interaction_id: int | None
    interaction_token: str | None
    token_expires_at: float | None
    message_id: int | None
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    cost: float
    device: str | None
    error: str | None
    #: Times the job was re-run after a restart interrupted it.
    attempts: int
    parent_job_id: str | None
    parent_index: int | None
    #: Fair-share weight from the owner's roles at submission.
    weight: float
    #: When the owner was told how the finished job ended; None: not yet (told again at start-up).
    delivered_at: float | None


def job_from_row(row: sqlite3.Row) -> Job:
    """Build a `Job` from a `SELECT * FROM jobs` row."""
    values = dict(row)
    values["request"] = GenerationRequest.model_validate_json(values["request"])
    values["state"] = JobState(values["state"])
    return Job(**values)


async def create_job(
    db: Database,
    request: GenerationRequest,
    *,
    owner_id: int,
    channel_id: int,
    job_id: str | None = None,
    guild_id: int | None = None,
    interaction_id: int | None = None,
    interaction_token: str | None = None,
    token_expires_at: float | None = None,
    parent_job_id: str | None = None,
    parent_index: int | None = None,
    weight: float = 1.0,
) -> Job:
    """Store a new queued job; it takes the next submission sequence number.

    `job_id` lets the queue keep the id it already gave out; by default a new one is drawn."""
    job_id = new_job_id() if job_id is None else job_id
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"job ids are 12 characters a-z and 2-7, got {job_id!r}")
    async with db.writing() as connection:
        rows = await connection.execute_fetchall(
            "INSERT INTO jobs (id, request, owner_id, guild_id, channel_id, interaction_id,"
            " interaction_token, token_expires_at, created_at, cost, parent_job_id, parent_index,"
            " weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
            (job_id, request.model_dump_json(), owner_id, guild_id, channel_id,
             interaction_id, interaction_token, token_expires_at, db.now(), request.cost,
             parent_job_id, parent_index, weight),
        )
    return job_from_row(rows[0])


async def start_job(db: Database, job_id: str, *, device: str) -> Job:
    """queued -> running on `device`."""
    return await _transition(db, job_id, JobState.RUNNING, "started_at = :now, device = :device",
                             device=device)


async def finish_job(db: Database, job_id: str) -> Job:
    """running -> done, and charge the owner: the job's cost and its count of stored images."""
    async with db.writing() as connection:
        job = await _transition_in(connection, db.now(), job_id, JobState.DONE,
                                   "finished_at = :now")
        await connection.execute(
            "INSERT INTO usage (guild_id, user_id, job_id, at, cost, images)"
            " SELECT ?, ?, ?, ?, ?, count(*) FROM images WHERE job_id = ?",
            (job.guild_id, job.owner_id, job.id, job.finished_at, job.cost, job.id),
        )
    return job


async def fail_job(db: Database, job_id: str, error: str) -> Job:
    """queued or running -> failed, with the error text shown to the user."""
    return await _transition(db, job_id, JobState.FAILED, "finished_at = :now, error = :error",
                             error=error)


async def cancel_job(db: Database, job_id: str) -> Job:
    """queued or running -> cancelled."""
    return await _transition(db, job_id, JobState.CANCELLED, "finished_at = :now")


async def set_message(db: Database, job_id: str, message_id: int) -> None:
    """Remember which message shows the job's result (buttons and edits point at it)."""
    async with db.writing() as connection:
        cursor = await connection.execute(
            "UPDATE jobs SET message_id = ? WHERE id = ?", (message_id, job_id))
        if cursor.rowcount == 0:
            raise UnknownJob(f"no job with id {job_id!r}")


async def requeue_job(db: Database, job_id: str) -> Job:
    """running -> queued after a restart interrupted it; counts the re-run in `attempts`.

    How often a job may be re-run is the queue's policy (`generation.queue.MAX_RERUNS`)."""
    return await _transition(
        db, job_id, JobState.QUEUED, "started_at = NULL, device = NULL, attempts = attempts + 1")


async def get_job(db: Database, job_id: str) -> Job | None:
    row = await db.fetch_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return job_from_row(row) if row is not None else None


@dataclass(frozen=True)
class JobDetail:
    job: Job
    images: list[ImageRecord]
    #: The lineage upwards: parent first, then its parent, and so on.
    parents: list[Job]
    #: Jobs made from this one (variations, upscales, reruns), in submission order.
    children: list[Job]


async def job_detail(db: Database, job_id: str) -> JobDetail | None:
    """One job with its images and lineage, read from one consistent snapshot."""
    async with db.reading() as connection:
        rows = await connection.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        images = await connection.execute_fetchall(
            "SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
        parents = await connection.execute_fetchall(_PARENTS, (job_id,))
        children = await connection.execute_fetchall(
            "SELECT * FROM jobs WHERE parent_job_id = ? ORDER BY seq", (job_id,))
    return JobDetail(
        job=job_from_row(rows[0]),
        images=[image_from_row(row) for row in images],
        parents=[job_from_row(row) for row in parents],
        children=[job_from_row(row) for row in children],
    )


# A parent always exists before its child (foreign key), so the chain cannot loop.
_PARENTS = """
WITH RECURSIVE chain (id, depth) AS (
    SELECT parent_job_id, 1 FROM jobs WHERE id = ? AND parent_job_id IS NOT NULL
    UNION ALL
    SELECT jobs.parent_job_id, chain.depth + 1 FROM jobs JOIN chain ON jobs.id = chain.id
    WHERE jobs.parent_job_id IS NOT NULL
)
SELECT jobs.* FROM chain JOIN jobs ON jobs.id = chain.id ORDER BY chain.depth
"""


async def history(
    db: Database,
    owner_id: int,
    *,
    guild_id: int | None = None,
    before_seq: int | None = None,
    limit: int = 20,
) -> list[Job]:
    """A user's jobs, newest first; pass the last job's `seq` as `before_seq` for the next page.

    Without `guild_id` every place is included (a user's own history spans servers and DMs)."""
    if not 1 <= limit <= _HISTORY_PAGE_MAX:
        raise ValueError(f"history page size must be 1..{_HISTORY_PAGE_MAX}, got {limit}")
    sql = "SELECT * FROM jobs WHERE owner_id = ? AND seq < ?"
    params: list[object] = [owner_id, before_seq if before_seq is not None else 2**63 - 1]
    if guild_id is not None:
        sql += " AND guild_id = ?"
        params.append(guild_id)
    rows = await db.fetch_all(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit])
    return [job_from_row(row) for row in rows]


async def mark_delivered(db: Database, job_id: str) -> None:
    """The owner has been told how the job ended: it is not told again after a restart."""
    async with db.writing() as connection:
        await connection.execute(
            "UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL", (db.now(), job_id))


async def undelivered(db: Database, *, finished_since: float) -> list[Job]:
    """Finished jobs (done, failed, cancelled) since `finished_since` whose owner was never told
    how they ended, in submission order."""
    rows = await db.fetch_all(
        "SELECT * FROM jobs WHERE delivered_at IS NULL AND state IN ('done', 'failed', 'cancelled')"
        " AND finished_at >= ? ORDER BY seq", (finished_since,))
    return [job_from_row(row) for row in rows]


async def jobs_by_state(db: Database, *states: JobState) -> list[Job]:
    """Jobs in any of `states`, in submission order (queue restore and /queue)."""
    marks = ", ".join("?" * len(states))
    rows = await db.fetch_all(
        f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", [s.value for s in states])
    return [job_from_row(row) for row in rows]


@dataclass(frozen=True)
class Pending:
    """A user's jobs in one place not finished yet: they are charged only at `finish_job`, so
    limits add these to the usage ledger to stop a member queueing past their allowance."""

    queued: int
    running: int
    #: Images asked for (`request.count`); the ledger later charges the images actually stored.
    images: int
    cost: float


#: Runs at every submit, inside the queue's lock: on the jobs_live_by_owner index (migration 0004).
_PENDING = (
    "SELECT coalesce(sum(state = 'queued'), 0) AS queued,"
    " coalesce(sum(state = 'running'), 0) AS running,"
    " coalesce(sum(json_extract(request, '$.count')), 0) AS images,"
    " coalesce(sum(cost), 0) AS cost"
    " FROM jobs WHERE owner_id = ? AND guild_id IS ? AND state IN ('queued', 'running')"
)


async def pending(db: Database, owner_id: int, guild_id: int | None) -> Pending:
    """`owner_id`'s queued and running jobs in one guild (or in DMs, `guild_id` None)."""
    row = await db.fetch_one(_PENDING, (owner_id, guild_id))
    assert row is not None  # an aggregate always yields one row
    return Pending(queued=row["queued"], running=row["running"], images=row["images"],
                   cost=row["cost"])


async def _transition(db: Database, job_id: str, to: JobState, assignments: str,
                      **values: object) -> Job:
    async with db.writing() as connection:
        return await _transition_in(connection, db.now(), job_id, to, assignments, **values)


async def _transition_in(connection: aiosqlite.Connection, now: float, job_id: str,
                         to: JobState, assignments: str, **values: object) -> Job:
    """Move one job to `to` if its current state allows it, inside the caller's transaction."""
    allowed_from = [state.value for state, targets in _TRANSITIONS.items() if to in targets]
    marks = ", ".join(f":from{i}" for i in range(len(allowed_from)))
    rows = await connection.execute_fetchall(
        f"UPDATE jobs SET state = :to, {assignments}"
        f" WHERE id = :id AND state IN ({marks}) RETURNING *",
        {"to": to.value, "now": now, "id": job_id, **values,
         **{f"from{i}": state for i, state in enumerate(allowed_from)}},
    )
    if rows:
        return job_from_row(rows[0])
    current = await connection.execute_fetchall("SELECT state FROM jobs WHERE id = ?", (job_id,))
    if not current:
        raise UnknownJob(f"no job with id {job_id!r}")
    raise IllegalTransition(
        f"job {job_id} is {current[0]['state']}; it can become {to.value} only from "
        f"{' or '.join(allowed_from)}"
    )
