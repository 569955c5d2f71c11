"""The SQLite connection: migrations, one serialized writer, a small pool of readers.

Durability: WAL with `synchronous=FULL`, so a transaction whose commit has returned survives a
process crash *and* a power loss (each commit fsyncs the WAL). Result images are fsynced too, so
the two agree: whatever the bot acknowledged to a user is on disk. Writes go through one
connection behind an asyncio lock (SQLite allows one writer anyway; queueing here instead of in
SQLite means callers never see "database is locked"), and reads use their own connections, which
WAL lets run while a write transaction is open.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from storage.settings import StorageSettings

#: The migrations shipped with this Atelier.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_BUSY_TIMEOUT_MS = 10_000
_READERS = 2


class SchemaError(RuntimeError):
    """The database cannot be used by this Atelier (too new, or the migrations are malformed)."""


@dataclass(frozen=True)
class Migration:
    version: int
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Numbered `NNNN_name.sql` files, which must run 0001, 0002, ... without gaps.

    A file holds plain statements, no BEGIN/COMMIT: all pending ones run in one transaction."""
    migrations = sorted(
        (Migration(int(m.group(1)), path) for path in directory.iterdir()
         if (m := _MIGRATION_NAME.match(path.name))),
        key=lambda migration: migration.version,
    )
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise SchemaError(f"migration {migration.path.name} should be numbered {expected:04d}")
    return migrations


class Database:
    """Open with `async with Database.open(settings) as db:`; see the module docstring."""

    def __init__(
        self,
        settings: StorageSettings,
        writer: aiosqlite.Connection,
        readers: asyncio.Queue[aiosqlite.Connection],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.images_dir = settings.images_dir
        self.now = clock
        self._writer = writer
        self._readers = readers
        self._write_lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: StorageSettings,
        *,
        migrations_dir: Path = MIGRATIONS_DIR,
        clock: Callable[[], float] = time.time,
    ) -> AsyncIterator[Database]:
        """Create the folders, migrate the schema and hand out a ready database."""
        settings.images_dir.mkdir(parents=True, exist_ok=True)
        settings.database_path.parent.mkdir(parents=True, exist_ok=True)
        connections: list[aiosqlite.Connection] = []
        try:
            writer = await _connect(settings.database_path, connections)
            await writer.execute("PRAGMA journal_mode = WAL")
            await _migrate(writer, load_migrations(migrations_dir))
            readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
            for _ in range(_READERS):
                readers.put_nowait(await _connect(settings.database_path, connections))
            yield cls(settings, writer, readers, clock)
        finally:
            for connection in connections:
                await connection.close()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; writers queue on the lock, and any exception rolls back.

        A cancelled caller is safe too: its statements still run in the connection's thread,
        but in order, so the ROLLBACK queued here runs after them and before the next BEGIN."""
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                yield self._writer
                await self._writer.commit()
            except BaseException:
                await self._writer.rollback()
                raise

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read connection holding one consistent snapshot for the duration of the block."""
        connection = await self._readers.get()
        try:
            try:
                await connection.execute("BEGIN")
                yield connection
            finally:
                # Queued after anything still pending on this connection, as in `writing`.
                await connection.rollback()
        finally:
            self._readers.put_nowait(connection)

    async def fetch_all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self.reading() as connection:
            return list(await connection.execute_fetchall(sql, tuple(params)))

    async def fetch_one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


async def _connect(path: Path, opened: list[aiosqlite.Connection]) -> aiosqlite.Connection:
    # isolation_level=None: no implicit transactions; `Database` issues BEGIN itself.
    connection = await aiosqlite.connect(path, isolation_level=None)
    opened.append(connection)
    connection.row_factory = sqlite3.Row
    for pragma in (
        f"busy_timeout = {_BUSY_TIMEOUT_MS}",
        "foreign_keys = ON",
        "synchronous = FULL",
    ):
        await connection.execute(f"PRAGMA {pragma}")
    return connection


async def _migrate(connection: aiosqlite.Connection, migrations: list[Migration]) -> None:
    """Bring the schema to the newest version in one transaction, or refuse a newer database."""
    (version,) = (await connection.execute_fetchall("PRAGMA user_version"))[0]
    known = len(migrations)
    if version > known:
        raise SchemaError(
            f"database schema version {version} is newer than this Atelier (knows up to {known}): "
            "upgrade Atelier or restore a backup"
        )
    pending = migrations[version:]
    if not pending:
        return
    # executescript() commits any open transaction first, so BEGIN/COMMIT live in the script.
    script = "".join(f"{m.sql()}\n;PRAGMA user_version = {m.version};\n" for m in pending)
    try:
        await connection.executescript(f"BEGIN IMMEDIATE;\n{script}COMMIT;")
    except BaseException:
        if connection.in_transaction:
            await connection.rollback()
        raise
