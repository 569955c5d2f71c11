"""Retention: delete old result images (and old uploads) to honour max_age_days and max_bytes.

What is kept, and why:
- A job's images are expired together, oldest first, and the job row stays with its image rows
  marked `expired`, so a button pressed later can answer "expired" instead of failing.
- "Live buttons" are protected: a job younger than `max_age_days` is never deleted for age;
  under `max_bytes` pressure jobs younger than `protect_s` (default one day: the time in which
  people still press upscale/variation buttons) are kept even if the cap is exceeded, and the
  report says so. A job whose image is the parent of a queued or running job is always kept.
- Files are shared by equal images; a file is deleted only when no `ok` row still needs it.
- Uploaded inputs expire by age only (since their last use); they are small next to results.
- The audit log expires by age only (`audit_max_age_days`, a year by default): moderators look
  back months, not forever, and refused prompts are members' words kept no longer than needed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from storage.db import Database
from storage.images import referenced_paths

DEFAULT_PROTECT_S = 24 * 3600.0
_SECONDS_PER_DAY = 86_400.0
#: Image rows considered per transaction, so the writer is never held for long.
_BATCH = 500

_OLDEST_UNPROTECTED = """
SELECT job_id, bytes FROM images AS i
WHERE i.status = 'ok' AND i.created_at < ?
  AND NOT EXISTS (SELECT 1 FROM jobs AS child
                  WHERE child.parent_job_id = i.job_id AND child.state IN ('queued', 'running'))
ORDER BY i.created_at LIMIT ?
"""


@dataclass(frozen=True)
class RetentionReport:
    expired_jobs: int = 0
    expired_images: int = 0
    deleted_files: int = 0
    freed_bytes: int = 0
    expired_inputs: int = 0
    #: Audit log entries deleted for age.
    expired_audit: int = 0
    #: Still above max_bytes because everything left is protected.
    over_cap: bool = False

    def __add__(self, other: RetentionReport) -> RetentionReport:
        return RetentionReport(
            self.expired_jobs + other.expired_jobs,
            self.expired_images + other.expired_images,
            self.deleted_files + other.deleted_files,
            self.freed_bytes + other.freed_bytes,
            self.expired_inputs + other.expired_inputs,
            self.expired_audit + other.expired_audit,
            self.over_cap or other.over_cap,
        )


async def apply_retention(db: Database, *, protect_s: float = DEFAULT_PROTECT_S) -> RetentionReport:
    """Run every rule once (call it periodically and at start-up)."""
    settings, now = db.settings, db.now()
    report = RetentionReport()
    if settings.audit_max_age_days is not None:
        cutoff = now - settings.audit_max_age_days * _SECONDS_PER_DAY
        while expired := await _expire_audit(db, cutoff):
            report += RetentionReport(expired_audit=expired)
    if settings.max_age_days is not None:
        cutoff = now - settings.max_age_days * _SECONDS_PER_DAY
        while (batch := await _expire_oldest(db, cutoff, need_bytes=None)).expired_jobs:
            report += batch
        report += await _expire_inputs(db, cutoff)
    if settings.max_bytes is not None:
        stored = await stored_bytes(db)
        while stored > settings.max_bytes:
            over = stored - settings.max_bytes
            batch = await _expire_oldest(db, now - protect_s, need_bytes=over)
            if not batch.expired_jobs:
                report += RetentionReport(over_cap=True)
                break
            report += batch
            stored -= batch.freed_bytes
    return report


async def stored_bytes(db: Database) -> int:
    """Bytes of the files that live rows reference (each shared file counted once)."""
    row = await db.fetch_one(
        "SELECT (SELECT coalesce(sum(bytes), 0) FROM"
        "         (SELECT max(bytes) AS bytes FROM images WHERE status = 'ok' GROUP BY path))"
        "     + (SELECT coalesce(sum(bytes), 0) FROM inputs) AS total")
    assert row is not None  # a scalar SELECT always yields one row
    return int(row["total"])


async def _expire_oldest(db: Database, cutoff: float, need_bytes: int | None) -> RetentionReport:
    """Expire the oldest unprotected jobs older than `cutoff` (enough for `need_bytes` if given)."""
    async with db.writing() as connection:
        candidates = await connection.execute_fetchall(_OLDEST_UNPROTECTED, (cutoff, _BATCH))
        chosen: dict[str, None] = {}
        planned = 0
        for row in candidates:
            if need_bytes is not None and planned >= need_bytes:
                break
            chosen[row["job_id"]] = None
            planned += row["bytes"]
        if not chosen:
            return RetentionReport()
        marks = ", ".join("?" * len(chosen))
        expired = await connection.execute_fetchall(
            f"UPDATE images SET status = 'expired' WHERE status = 'ok' AND job_id IN ({marks})"
            " RETURNING path, bytes", list(chosen))
        sizes = {row["path"]: row["bytes"] for row in expired}
        still_needed = await referenced_paths(connection, list(sizes))
        doomed = {path: size for path, size in sizes.items() if path not in still_needed}
        # Unlinked before COMMIT, under the write lock: a crash in between leaves `ok` rows
        # without files, which reconciliation marks missing; never a file that is needed.
        await asyncio.to_thread(_unlink_all, db.images_dir, list(doomed))
    return RetentionReport(expired_jobs=len(chosen), expired_images=len(expired),
                           deleted_files=len(doomed), freed_bytes=sum(doomed.values()))


async def _expire_audit(db: Database, cutoff: float) -> int:
    """Delete up to `_BATCH` audit entries older than `cutoff`; how many went."""
    async with db.writing() as connection:
        cursor = await connection.execute(
            "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < ? LIMIT ?)",
            (cutoff, _BATCH))
        return cursor.rowcount


async def _expire_inputs(db: Database, cutoff: float) -> RetentionReport:
    async with db.writing() as connection:
        rows = await connection.execute_fetchall(
            "DELETE FROM inputs WHERE last_used_at < ? RETURNING path, bytes", (cutoff,))
        await asyncio.to_thread(_unlink_all, db.images_dir, [row["path"] for row in rows])
    return RetentionReport(expired_inputs=len(rows), deleted_files=len(rows),
                           freed_bytes=sum(row["bytes"] for row in rows))


def _unlink_all(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).unlink(missing_ok=True)
