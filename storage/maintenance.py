"""Keeping the database and the image folder in agreement, and reading a user's data out.

`reconcile` runs at start-up and from `atelier db check`; it reports problems and never raises
for a file it cannot read or remove (a bad file must not keep the bot from starting).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.db import Database
from storage.images import image_from_row, referenced_paths
from storage.jobs import job_from_row
from storage.settings import StorageSettings

_BATCH = 1000


@dataclass(frozen=True)
class ReconcileReport:
    #: Files no row needs, removed because they were older than the grace period.
    removed_files: list[str] = field(default_factory=list)
    #: (job id, image index) of result rows whose file is gone or has the wrong size.
    missing_images: list[tuple[str, int]] = field(default_factory=list)
    #: Uploaded inputs whose file is gone (their rows are dropped: users upload again).
    missing_inputs: list[str] = field(default_factory=list)
    #: Files that could not be inspected or removed, with the reason.
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckReport:
    integrity: list[str]
    foreign_key_violations: int
    schema_version: int
    counts: dict[str, int]
    reconcile: ReconcileReport

    @property
    def ok(self) -> bool:
        return (self.integrity == ["ok"] and not self.foreign_key_violations
                and not self.reconcile.missing_images and not self.reconcile.errors)


async def reconcile(db: Database, *, grace_s: float | None = None) -> ReconcileReport:
    """Remove unreferenced files older than the grace period; mark rows whose file is missing."""
    grace = db.settings.orphan_grace_s if grace_s is None else grace_s
    report = ReconcileReport()
    directories = await asyncio.to_thread(_directories, db.images_dir, report.errors)
    for directory in directories:
        await _remove_orphans(db, directory, db.now() - grace, report)
    await _mark_missing_images(db, report)
    await _drop_missing_inputs(db, report)
    return report


def _directories(root: Path, errors: list[str]) -> list[Path]:
    return [Path(path) for path, _, _ in os.walk(root, onerror=lambda e: errors.append(str(e)))]


async def _remove_orphans(db: Database, directory: Path, older_than: float,
                          report: ReconcileReport) -> None:
    files = await asyncio.to_thread(_files_with_mtime, directory, db.images_dir, report.errors)
    old = [path for path, mtime in files if mtime < older_than]
    if not old:
        return
    # Under the write lock nothing can write or reference a file while we decide and delete.
    async with db.writing() as connection:
        needed = await referenced_paths(connection, old)
        orphans = [path for path in old if path not in needed]
        removed = await asyncio.to_thread(_unlink_each, db.images_dir, orphans, report.errors)
    report.removed_files.extend(removed)


def _files_with_mtime(directory: Path, root: Path, errors: list[str]) -> list[tuple[str, float]]:
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        found.append((Path(entry.path).relative_to(root).as_posix(),
                                      entry.stat(follow_symlinks=False).st_mtime))
                except OSError as error:
                    errors.append(f"{entry.path}: {error}")
    except OSError as error:
        errors.append(f"{directory}: {error}")
    return found


def _unlink_each(root: Path, paths: list[str], errors: list[str]) -> list[str]:
    removed = []
    for path in paths:
        try:
            (root / path).unlink(missing_ok=True)
            removed.append(path)
        except OSError as error:
            errors.append(f"{path}: {error}")
    return removed


def _intact(root: Path, path: str, size: int) -> bool:
    try:
        return (root / path).stat().st_size == size
    except FileNotFoundError:
        return False


async def _mark_missing_images(db: Database, report: ReconcileReport) -> None:
    after_id = 0
    while True:
        async with db.writing() as connection:
            rows = await connection.execute_fetchall(
                "SELECT id, job_id, idx, path, bytes FROM images"
                " WHERE status = 'ok' AND id > ? ORDER BY id LIMIT ?", (after_id, _BATCH))
            if not rows:
                return
            after_id = rows[-1]["id"]
            intact = await asyncio.to_thread(
                lambda: [_intact(db.images_dir, row["path"], row["bytes"]) for row in rows])
            missing = [row for row, ok in zip(rows, intact, strict=True) if not ok]
            await connection.executemany(
                "UPDATE images SET status = 'missing' WHERE id = ?", [(r["id"],) for r in missing])
        report.missing_images.extend((row["job_id"], row["idx"]) for row in missing)


async def _drop_missing_inputs(db: Database, report: ReconcileReport) -> None:
    after = ""
    while True:
        async with db.writing() as connection:
            rows = await connection.execute_fetchall(
                "SELECT sha256, path, bytes FROM inputs WHERE sha256 > ? ORDER BY sha256 LIMIT ?",
                (after, _BATCH))
            if not rows:
                return
            after = rows[-1]["sha256"]
            intact = await asyncio.to_thread(
                lambda: [_intact(db.images_dir, row["path"], row["bytes"]) for row in rows])
            missing = [row["sha256"] for row, ok in zip(rows, intact, strict=True) if not ok]
            await connection.executemany(
                "DELETE FROM inputs WHERE sha256 = ?", [(sha,) for sha in missing])
        report.missing_inputs.extend(missing)


async def check(settings: StorageSettings) -> CheckReport:
    """`atelier db check`: SQLite's integrity check, file reconciliation, and row counts, with
    the audit log's size (its text bytes and the age of its oldest entry: retention bounds it)."""
    async with Database.open(settings) as db:
        async with db.reading() as connection:
            integrity = [row[0] for row in await connection.execute_fetchall(
                "PRAGMA integrity_check")]
            violations = len(await connection.execute_fetchall("PRAGMA foreign_key_check"))
            (version,) = (await connection.execute_fetchall("PRAGMA user_version"))[0]
            counts = dict(await connection.execute_fetchall(_COUNTS))
            oldest = (await connection.execute_fetchall("SELECT min(at) FROM audit_log"))[0][0]
            if oldest is not None:
                counts["audit oldest entry, days ago"] = int((db.now() - oldest) // 86_400)
        return CheckReport(integrity, violations, version, counts, await reconcile(db))


_COUNTS = """
SELECT 'jobs ' || state, count(*) FROM jobs GROUP BY state
UNION ALL SELECT 'images ' || status, count(*) FROM images GROUP BY status
UNION ALL SELECT 'image bytes', coalesce(sum(bytes), 0) FROM images WHERE status = 'ok'
UNION ALL SELECT 'inputs', count(*) FROM inputs
UNION ALL SELECT 'usage rows', count(*) FROM usage
UNION ALL SELECT 'bans', count(*) FROM bans
UNION ALL SELECT 'audit entries', count(*) FROM audit_log
UNION ALL SELECT 'audit bytes', coalesce(sum(length(action) + length(target)
    + coalesce(length(before_json), 0) + coalesce(length(after_json), 0)), 0) FROM audit_log
"""


def format_report(report: CheckReport) -> str:
    """A short human-readable summary for the terminal."""
    rec = report.reconcile
    lines = [
        f"schema version {report.schema_version}",
        "integrity: " + "; ".join(report.integrity),
        f"foreign key violations: {report.foreign_key_violations}",
        *(f"{name}: {count}" for name, count in sorted(report.counts.items())),
        f"removed unreferenced files: {len(rec.removed_files)}",
        f"images with missing files: {len(rec.missing_images)}",
        *(f"  job {job_id} image {index}" for job_id, index in rec.missing_images[:20]),
        f"inputs with missing files (dropped): {len(rec.missing_inputs)}",
        *(f"error: {error}" for error in rec.errors),
        "OK" if report.ok else "PROBLEMS FOUND",
    ]
    return "\n".join(lines)


async def export_user(settings: StorageSettings, user_id: int) -> dict[str, Any]:
    """`atelier db export --user ID`: everything stored about a user, as plain JSON data.

    Interaction tokens are left out (they are credentials of the bot, not the user's data)."""
    async with Database.open(settings) as db, db.reading() as connection:
        job_rows = await connection.execute_fetchall(
            "SELECT * FROM jobs WHERE owner_id = ? ORDER BY seq", (user_id,))
        image_rows = await connection.execute_fetchall(
            "SELECT images.* FROM images JOIN jobs ON jobs.id = images.job_id"
            " WHERE jobs.owner_id = ? ORDER BY jobs.seq, images.idx", (user_id,))
        usage_rows = await connection.execute_fetchall(
            "SELECT guild_id, job_id, at, cost, images FROM usage WHERE user_id = ? ORDER BY id",
            (user_id,))
        ban_rows = await connection.execute_fetchall(
            "SELECT guild_id, reason, banned_by, at FROM bans WHERE user_id = ?", (user_id,))
    images: dict[str, list[dict[str, Any]]] = {}
    for image in map(image_from_row, image_rows):
        images.setdefault(image.job_id, []).append({
            "index": image.index, "seed": image.seed, "width": image.width,
            "height": image.height, "sha256": image.sha256, "path": image.path,
            "status": image.status.value})
    return {
        "user_id": user_id,
        "jobs": [{**_job_export(row), "images": images.get(row["id"], [])} for row in job_rows],
        "usage": [dict(row) for row in usage_rows],
        "bans": [dict(row) for row in ban_rows],
    }


def _job_export(row: sqlite3.Row) -> dict[str, Any]:
    job = job_from_row(row)
    data = {name: value for name, value in vars(job).items() if name != "interaction_token"}
    data["request"] = job.request.model_dump(mode="json")
    return data
