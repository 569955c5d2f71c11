"""Retention, start-up reconciliation, `atelier db check` and `atelier db export`."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from generation.request import GenerationRequest
from storage.db import Database
from storage.images import ImageStatus, TEMP_PREFIX, input_path, job_images, put_input, save_image
from storage.jobs import Job, create_job, finish_job, start_job
from storage.maintenance import check, export_user, format_report, reconcile
from storage.moderation import ban
from storage.retention import apply_retention, stored_bytes
from storage.settings import StorageSettings
from tests.fixtures.storage import T0, ManualClock, clock  # noqa: F401
from tests.storage_crash_child import make_png, sample_request

HOUR, DAY = 3600.0, 86400.0


@pytest.fixture
def open_db(
    tmp_path: Path, clock: ManualClock
) -> Callable[..., AbstractAsyncContextManager[Database]]:
    """Open the test database with storage settings of the test's choosing."""
    def opener(**settings: object) -> AbstractAsyncContextManager[Database]:
        return Database.open(StorageSettings(data_dir=tmp_path, **settings), clock=clock)
    return opener


async def _done_job(db: Database, pngs: list[bytes], owner: int = 1, **fields: object) -> Job:
    request = sample_request(count=len(pngs)) if pngs else sample_request()
    job = await create_job(db, request, owner_id=owner, channel_id=2, **fields)
    await start_job(db, job.id, device="cpu")
    for index, png in enumerate(pngs):
        await save_image(db, job.id, index, request.seed + index, png)
    return await finish_job(db, job.id)


async def _statuses(db: Database, job: Job) -> list[ImageStatus]:
    return [image.status for image in await job_images(db, job.id)]


async def test_age_expires_old_jobs_but_keeps_parents_of_waiting_jobs(
    open_db: Callable, clock: ManualClock
) -> None:
    rng = random.Random(0)
    old_pngs = [make_png(rng), make_png(rng)]
    async with open_db(max_age_days=1) as db:
        old = await _done_job(db, old_pngs)
        clock.now += 12 * HOUR
        parent = await _done_job(db, [make_png(rng)])
        waiting = await create_job(db, sample_request(), owner_id=1, channel_id=2,
                                   parent_job_id=parent.id, parent_index=0)
        clock.now += 20 * HOUR
        young = await _done_job(db, [make_png(rng)])
        old_files = [db.images_dir / i.path for i in await job_images(db, old.id)]
        clock.now = T0 + 40 * HOUR  # ages: old 40 h, parent 28 h, young 8 h
        report = await apply_retention(db)
        assert await _statuses(db, old) == [ImageStatus.EXPIRED] * 2
        assert await _statuses(db, parent) == [ImageStatus.OK]  # an upscale of it is queued
        assert await _statuses(db, young) == [ImageStatus.OK]
        assert not any(path.exists() for path in old_files)
        assert (report.expired_jobs, report.expired_images, report.deleted_files) == (1, 2, 2)
        assert report.freed_bytes == sum(map(len, old_pngs))
        # Once the child has run, nothing protects the parent any more.
        await start_job(db, waiting.id, device="cpu")
        await finish_job(db, waiting.id)
        await apply_retention(db)
        assert await _statuses(db, parent) == [ImageStatus.EXPIRED]


async def test_a_file_shared_with_a_kept_image_survives(
    open_db: Callable, clock: ManualClock
) -> None:
    png = make_png(random.Random(1))
    async with open_db(max_age_days=1) as db:
        old = await _done_job(db, [png])
        clock.now += 2 * DAY
        rerun = await _done_job(db, [png])  # same seed, same bytes: the same file
        report = await apply_retention(db)
        assert await _statuses(db, old) == [ImageStatus.EXPIRED]
        (kept,) = await job_images(db, rerun.id)
        assert (db.images_dir / kept.path).read_bytes() == png
        assert report.deleted_files == 0 and report.freed_bytes == 0


async def test_max_bytes_removes_oldest_first_and_spares_recent_jobs(
    open_db: Callable, clock: ManualClock
) -> None:
    rng = random.Random(2)
    pngs = [make_png(rng, width=64, height=64) for _ in range(4)]
    sizes = [len(png) for png in pngs]
    cap = sizes[2] + sizes[3]
    async with open_db(max_bytes=cap) as db:
        jobs = []
        for png, offset in zip(pngs, (0, 1, 2, 10)):
            clock.now = T0 + offset * HOUR
            jobs.append(await _done_job(db, [png]))
        clock.now = T0 + 11 * HOUR
        report = await apply_retention(db, protect_s=3 * HOUR)  # jobs[3] is protected
        assert [await _statuses(db, job) for job in jobs] == [
            [ImageStatus.EXPIRED], [ImageStatus.EXPIRED], [ImageStatus.OK], [ImageStatus.OK]]
        assert report.freed_bytes == sizes[0] + sizes[1] and not report.over_cap
        assert await stored_bytes(db) == cap
    async with open_db(max_bytes=sizes[3] // 2) as db:
        report = await apply_retention(db, protect_s=3 * HOUR)
        # Everything older went; the protected job stays although the folder is over the cap.
        assert await _statuses(db, jobs[2]) == [ImageStatus.EXPIRED]
        assert await _statuses(db, jobs[3]) == [ImageStatus.OK]
        assert report.over_cap


async def test_uploads_expire_by_last_use(open_db: Callable, clock: ManualClock) -> None:
    async with open_db(max_age_days=1) as db:
        stale = await put_input(db, b"old upload")
        stale_path = await input_path(db, stale)
        clock.now += 1.5 * DAY
        fresh = await put_input(db, b"new upload")
        report = await apply_retention(db)
        assert report.expired_inputs == 1 and not stale_path.exists()
        with pytest.raises(LookupError):
            await input_path(db, stale)
        assert (await input_path(db, fresh)).read_bytes() == b"new upload"


def _age(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


async def test_the_audit_log_expires_by_age_and_check_reports_its_size(
    open_db: Callable, clock: ManualClock, tmp_path: Path
) -> None:
    async with open_db(audit_max_age_days=30) as db:
        for user in range(3):  # three moderator actions, 40, 20 and 0 days ago
            await ban(db, actor_id=9, guild_id=5, user_id=user, reason="spam " * 20)
            clock.now += 20 * DAY
        clock.now -= 20 * DAY
    before = await check(StorageSettings(data_dir=tmp_path))
    assert before.counts["audit entries"] == 3 and before.counts["audit oldest entry, days ago"] >= 40
    assert before.counts["audit bytes"] > 3 * len("spam " * 20)
    assert "audit bytes: " in format_report(before)
    async with open_db(audit_max_age_days=30) as db:
        report = await apply_retention(db)
        assert report.expired_audit == 1
        kept = await db.fetch_all("SELECT target FROM audit_log ORDER BY at")
        assert [row["target"] for row in kept] == ["user:1", "user:2"]
        assert (await apply_retention(db)).expired_audit == 0
    async with open_db(audit_max_age_days=None) as db:  # kept forever
        clock.now += 1000 * DAY
        assert (await apply_retention(db)).expired_audit == 0
    assert StorageSettings().audit_max_age_days == 365


async def test_reconcile_removes_old_orphans_and_marks_missing_files(
    open_db: Callable, clock: ManualClock
) -> None:
    rng = random.Random(3)
    async with open_db(orphan_grace_s=HOUR) as db:
        kept, gone, cut = [await _done_job(db, [make_png(rng)]) for _ in range(3)]
        images = {job.id: (await job_images(db, job.id))[0] for job in (kept, gone, cut)}
        (db.images_dir / images[gone.id].path).unlink()
        (db.images_dir / images[cut.id].path).write_bytes(b"\x89PNG truncated")
        old_orphan = db.images_dir / "ab" / ("ab" + "0" * 62 + ".png")
        young_orphan = db.images_dir / "cd" / ("cd" + "1" * 62 + ".png")
        stale_temp = db.images_dir / "ef" / f"{TEMP_PREFIX}x1y2"
        for path in (old_orphan, young_orphan, stale_temp):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"leftover")
        for path in db.images_dir.rglob("*"):
            _age(path, T0 - 2 * HOUR)
        _age(young_orphan, T0 - 0.5 * HOUR)
        lost_input = await put_input(db, b"upload")
        (await input_path(db, lost_input)).unlink()

        report = await reconcile(db)
        assert sorted(report.removed_files) == sorted(
            p.relative_to(db.images_dir).as_posix() for p in (old_orphan, stale_temp))
        assert sorted(report.missing_images) == sorted([(gone.id, 0), (cut.id, 0)])
        assert report.missing_inputs == [lost_input] and report.errors == []
        assert young_orphan.exists() and not old_orphan.exists() and not stale_temp.exists()
        assert (db.images_dir / images[kept.id].path).exists()
        assert await _statuses(db, gone) == [ImageStatus.MISSING]
        assert await _statuses(db, kept) == [ImageStatus.OK]
        with pytest.raises(LookupError):
            await input_path(db, lost_input)
        # Reported once: a second pass finds nothing new.
        assert (await reconcile(db)).missing_images == []


async def test_check_reports_integrity_counts_and_problems(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    rng = random.Random(4)
    async with Database.open(settings) as db:
        done = await _done_job(db, [make_png(rng), make_png(rng)])
        await create_job(db, sample_request(), owner_id=3, channel_id=2)
    healthy = await check(settings)
    assert healthy.integrity == ["ok"] and healthy.foreign_key_violations == 0 and healthy.ok
    assert healthy.counts["jobs done"] == 1 and healthy.counts["jobs queued"] == 1
    assert healthy.counts["images ok"] == 2 and healthy.schema_version >= 1
    assert "OK" in format_report(healthy).splitlines()

    image = (await _images_of(settings, done.id))[1]
    (settings.images_dir / image.path).unlink()
    damaged = await check(settings)
    assert not damaged.ok and damaged.reconcile.missing_images == [(done.id, 1)]
    text = format_report(damaged)
    assert f"job {done.id} image 1" in text and text.endswith("PROBLEMS FOUND")


async def _images_of(settings: StorageSettings, job_id: str) -> list:
    async with Database.open(settings) as db:
        return await job_images(db, job_id)


async def test_export_holds_a_users_data_and_nothing_else(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    png = make_png(random.Random(5))
    request: GenerationRequest = sample_request(prompt="my own prompt")
    async with Database.open(settings) as db:
        first = await _done_job(db, [png], owner=7, guild_id=70, interaction_token="secret")
        second = await create_job(db, request, owner_id=7, channel_id=2, parent_job_id=first.id,
                                  parent_index=0)
        await _done_job(db, [make_png(random.Random(6))], owner=8)
        await ban(db, actor_id=1, guild_id=70, user_id=7, reason="spam")
    exported = await export_user(settings, 7)
    parsed = json.loads(json.dumps(exported))  # plain JSON data all the way down
    assert parsed["user_id"] == 7
    assert [job["id"] for job in parsed["jobs"]] == [first.id, second.id]
    assert parsed["jobs"][1]["request"] == request.model_dump(mode="json")
    assert parsed["jobs"][1]["parent_job_id"] == first.id
    assert [i["sha256"] for i in parsed["jobs"][0]["images"]] == [
        (await _images_of(settings, first.id))[0].sha256]
    assert all("interaction_token" not in job for job in parsed["jobs"])
    assert "secret" not in json.dumps(parsed)
    assert [(u["guild_id"], u["job_id"]) for u in parsed["usage"]] == [(70, first.id)]
    assert [b["reason"] for b in parsed["bans"]] == ["spam"]
