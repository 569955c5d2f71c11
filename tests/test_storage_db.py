"""The connection layer: migrations, refusing newer databases, transactions and concurrency."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from storage.db import MIGRATIONS_DIR, Database, SchemaError, load_migrations
from storage.audit import audit_log
from generation.request import JobState
from storage.jobs import create_job, finish_job, jobs_by_state, start_job
from storage.limits import Scope, set_limits, usage
from storage.moderation import ban
from storage.settings import LimitsSettings, StorageSettings
from tests.storage_crash_child import sample_request

SHIPPED = len(load_migrations())


def test_storage_imports_without_torch() -> None:
    """Storage may use only generation/request.py of ours: no torch, no other room."""
    root = Path(__file__).parents[1]
    modules = ", ".join(f"storage.{m.stem}" for m in (root / "storage").glob("*.py"))
    probe = (f"import sys, {modules}; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
             "('bot', 'models') or m.startswith('generation.') and m != 'generation.request'))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=root)
    assert result.stdout.strip() == "[]"


def _version(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA user_version").fetchone()[0]


def _migrations_dir(tmp_path: Path, extra: dict[str, str], upto: int | None = None) -> Path:
    """The shipped migrations (the first `upto` of them) plus extra ones, in a fresh folder."""
    directory = tmp_path / f"migrations-{upto}-{len(extra)}"
    directory.mkdir()
    for migration in load_migrations()[:upto]:
        shutil.copy(migration.path, directory / migration.path.name)
    for name, sql in extra.items():
        (directory / name).write_text(sql)
    return directory


async def test_empty_database_gets_every_table(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    async with Database.open(settings) as db:
        tables = {row["name"] for row in await db.fetch_all(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        journal = (await db.fetch_one("PRAGMA journal_mode"))[0]
        foreign_keys = (await db.fetch_one("PRAGMA foreign_keys"))[0]
    assert {"jobs", "images", "inputs", "usage", "guild_settings", "limits", "bans",
            "blocked_words", "audit_log"} <= tables
    assert journal == "wal" and foreign_keys == 1
    assert _version(settings.database_path) == SHIPPED
    assert settings.images_dir.is_dir()


_NEXT = f"{SHIPPED + 1:04d}_job_notes.sql"
_NEXT_SQL = "ALTER TABLE jobs ADD COLUMN note TEXT NOT NULL DEFAULT 'none';\n" \
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"


@pytest.mark.parametrize("start", range(SHIPPED + 1))
async def test_migrates_from_every_earlier_version(tmp_path: Path, start: int) -> None:
    """A database at version `start` reaches the newest version, keeping its rows."""
    settings = StorageSettings(data_dir=tmp_path)
    async with Database.open(settings, migrations_dir=_migrations_dir(tmp_path, {}, start)) as db:
        if start >= 1:  # columns every version has: today's create_job may need newer ones
            async with db.writing() as connection:
                await connection.execute(
                    "INSERT INTO jobs (id, request, owner_id, channel_id, created_at, cost)"
                    " VALUES ('aaaaaaaaaaaa', ?, 1, 2, 0, 25)", (sample_request().model_dump_json(),))
    assert _version(settings.database_path) == start
    newest = _migrations_dir(tmp_path, {_NEXT: _NEXT_SQL})
    async with Database.open(settings, migrations_dir=newest) as db:
        rows = await db.fetch_all("SELECT id, note, weight FROM jobs")
        await db.fetch_all("SELECT * FROM notes")  # the new table exists
    assert _version(settings.database_path) == SHIPPED + 1
    # A job stored before version 2 gets weight 1, as every job had before weights were kept.
    assert [tuple(row) for row in rows] == ([("aaaaaaaaaaaa", "none", 1.0)] if start >= 1 else [])


async def test_failed_migration_leaves_database_untouched(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    async with Database.open(settings):
        pass
    broken = _migrations_dir(tmp_path, {_NEXT: "CREATE TABLE half (x);\nSELECT * FROM no_such;"})
    with pytest.raises(sqlite3.OperationalError, match="no_such"):
        async with Database.open(settings, migrations_dir=broken):
            pass
    assert _version(settings.database_path) == SHIPPED
    with sqlite3.connect(settings.database_path) as connection:
        assert connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    with sqlite3.connect(settings.database_path) as connection:
        connection.execute("PRAGMA user_version = 7")
    expected = (f"database schema version 7 is newer than this Atelier (knows up to {SHIPPED}): "
                "upgrade Atelier or restore a backup")
    with pytest.raises(SchemaError) as raised:
        async with Database.open(settings):
            pass
    assert str(raised.value) == expected
    assert _version(settings.database_path) == 7


def test_migration_numbering_must_not_have_gaps(tmp_path: Path) -> None:
    directory = _migrations_dir(tmp_path, {f"{SHIPPED + 2:04d}_skips.sql": "SELECT 1;"})
    with pytest.raises(SchemaError, match=f"should be numbered {SHIPPED + 1:04d}"):
        load_migrations(directory)
    assert [m.version for m in load_migrations(MIGRATIONS_DIR)] == list(range(1, SHIPPED + 1))


async def test_exception_rolls_the_whole_transaction_back(tmp_path: Path) -> None:
    async with Database.open(StorageSettings(data_dir=tmp_path)) as db:
        with pytest.raises(RuntimeError):
            async with db.writing() as connection:
                await connection.execute(
                    "INSERT INTO bans VALUES (1, 2, 'spam', 3, 0)")
                raise RuntimeError("caller failed half-way")
        assert await db.fetch_all("SELECT * FROM bans") == []


@pytest.mark.parametrize("where", ["at BEGIN", "inside the transaction"])
async def test_a_cancelled_writer_leaves_nothing_behind(tmp_path: Path, where: str) -> None:
    """Discord handlers get cancelled; the next writer must find a clean connection."""
    async with Database.open(StorageSettings(data_dir=tmp_path)) as db:
        inside = asyncio.Event()

        async def slow_ban() -> None:
            async with db.writing() as connection:
                await connection.execute("INSERT INTO bans VALUES (1, 2, 'spam', 3, 0)")
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(slow_ban())
        if where == "at BEGIN":
            await asyncio.sleep(0)  # the task runs until it awaits its BEGIN statement
        else:
            await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
        assert await db.fetch_all("SELECT * FROM bans") == []
        assert [j.id for j in await jobs_by_state(db, JobState.QUEUED)] == [job.id]


async def test_reads_do_not_wait_behind_a_long_write(tmp_path: Path) -> None:
    async with Database.open(StorageSettings(data_dir=tmp_path)) as db:
        await create_job(db, sample_request(), owner_id=1, channel_id=2)
        write_open, read_done = asyncio.Event(), asyncio.Event()
        seen: list[int] = []

        async def long_write() -> None:
            async with db.writing() as connection:
                await connection.execute("UPDATE jobs SET state = 'running'")
                write_open.set()
                # The transaction stays open until the reader has finished: a reader that
                # waited for the writer would deadlock here and time out.
                await asyncio.wait_for(read_done.wait(), timeout=5)

        async def read() -> None:
            await write_open.wait()
            for state in JobState:
                seen.append(len(await jobs_by_state(db, state)))
            read_done.set()

        await asyncio.gather(long_write(), read())
        # The reader saw the committed snapshot: the job still queued, not the open write.
        assert seen == [1, 0, 0, 0, 0]
        assert len(await jobs_by_state(db, JobState.RUNNING)) == 1


async def test_many_concurrent_writers_never_see_locked(tmp_path: Path) -> None:
    """200 writers on one Database, plus a second Database on the same file (as `atelier db
    check` beside a running bot): every write lands, none reports "database is locked"."""
    settings = StorageSettings(data_dir=tmp_path)
    limits = LimitsSettings()
    async with Database.open(settings) as bot, Database.open(settings) as other:
        async def job_then_usage(db: Database, user: int) -> None:
            job = await create_job(db, sample_request(), owner_id=user, channel_id=1, guild_id=5)
            await start_job(db, job.id, device="cpu")
            await finish_job(db, job.id)

        writers = [job_then_usage(bot, user) for user in range(100)]
        writers += [ban(bot, actor_id=1, guild_id=5, user_id=1000 + n, reason="r")
                    for n in range(50)]
        writers += [set_limits(other, actor_id=1, guild_id=5, scope=Scope.USER, target_id=n,
                               values={"daily_images": n}, defaults=limits) for n in range(50)]
        results = await asyncio.gather(*writers, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert len(await jobs_by_state(bot, JobState.DONE)) == 100
        assert (await usage(bot, 3, 5, window_hours=1)).jobs == 1
        assert len(await audit_log(other, 5, limit=1000)) == 100
