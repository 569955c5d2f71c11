"""Image files: results and uploaded inputs, named by content hash, written atomically.

Every change to the image folder (write, delete) happens while holding the database's write
lock, so a file and the row that references it can never be changed by two tasks at once:
retention cannot delete a file between its write and its row's commit. A file is complete
under its final name (temp file, fsync, rename, fsync the folder) before its row is committed.

Layout: results at `ab/abcdef....png`, uploads at `inputs/ab/abcdef...` (sha256 hex).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import struct
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import aiosqlite

from storage.db import Database

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Prefix of in-flight temp files; they never carry a final name.
TEMP_PREFIX = ".tmp-"
INPUTS_DIR = "inputs"
#: Paths per IN (...) query (SQLite allows 32766 parameters; half go to each side of a UNION).
_SQL_BATCH = 500


class ImageStatus(StrEnum):
    OK = "ok"
    #: The file vanished (found by reconciliation).
    MISSING = "missing"
    #: Deleted by retention; buttons answer "expired".
    EXPIRED = "expired"


@dataclass(frozen=True)
class ImageRecord:
    job_id: str
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    path: str
    bytes: int
    created_at: float
    status: ImageStatus


def image_from_row(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        job_id=row["job_id"], index=row["idx"], seed=row["seed"], width=row["width"],
        height=row["height"], sha256=row["sha256"], path=row["path"], bytes=row["bytes"],
        created_at=row["created_at"], status=ImageStatus(row["status"]),
    )


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG format requires to come first."""
    if len(png) < 24 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("result images must be PNG-encoded bytes (with their parameters chunk)")
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` either does not exist or holds all of it, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry is only on disk once the folder is synced."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def save_image(db: Database, job_id: str, index: int, seed: int, png: bytes) -> ImageRecord:
    """Store result image `index` of a job. Saving the same index again (a re-run) replaces it."""
    (width, height), sha256 = png_size(png), await asyncio.to_thread(_sha256, png)  # megabytes: off the loop
    path = f"{sha256[:2]}/{sha256}.png"
    async with db.writing() as connection:
        await asyncio.to_thread(write_atomic, db.images_dir / path, png)
        rows = await connection.execute_fetchall(
            "INSERT INTO images (job_id, idx, seed, width, height, sha256, path, bytes, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (job_id, idx) DO UPDATE SET seed = excluded.seed,"
            " width = excluded.width, height = excluded.height, sha256 = excluded.sha256,"
            " path = excluded.path, bytes = excluded.bytes, created_at = excluded.created_at,"
            " status = 'ok' RETURNING *",
            (job_id, index, seed, width, height, sha256, path, len(png), db.now()),
        )
    return image_from_row(rows[0])


async def job_images(db: Database, job_id: str) -> list[ImageRecord]:
    rows = await db.fetch_all("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
    return [image_from_row(row) for row in rows]


def image_file(db: Database, image: ImageRecord) -> Path:
    """Where a result image's file lives (to attach it to a reply)."""
    return db.images_dir / image.path


async def put_input(db: Database, data: bytes) -> str:
    """Store an uploaded init image or mask; returns its sha256 (what a request refers to)."""
    sha256 = await asyncio.to_thread(_sha256, data)
    path = f"{INPUTS_DIR}/{sha256[:2]}/{sha256}"
    now = db.now()
    async with db.writing() as connection:
        await asyncio.to_thread(write_atomic, db.images_dir / path, data)
        await connection.execute(
            "INSERT INTO inputs (sha256, path, bytes, created_at, last_used_at)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (sha256) DO UPDATE SET last_used_at = excluded.last_used_at",
            (sha256, path, len(data), now, now),
        )
    return sha256


async def input_path(db: Database, sha256: str) -> Path:
    """The file of a stored input; `LookupError` says it is unknown or expired."""
    row = await db.fetch_one("SELECT path FROM inputs WHERE sha256 = ?", (sha256,))
    if row is None:
        raise LookupError(f"input image {sha256} is not stored (it may have expired); upload it "
                          "again")
    return db.images_dir / row["path"]


async def referenced_paths(connection: aiosqlite.Connection, paths: list[str]) -> set[str]:
    """Which of `paths` a live row still needs: an `ok` result image or a stored input."""
    found: set[str] = set()
    for start in range(0, len(paths), _SQL_BATCH):
        batch = paths[start:start + _SQL_BATCH]
        marks = ", ".join("?" * len(batch))
        rows = await connection.execute_fetchall(
            f"SELECT path FROM images WHERE status = 'ok' AND path IN ({marks})"
            f" UNION SELECT path FROM inputs WHERE path IN ({marks})", [*batch, *batch])
        found.update(row["path"] for row in rows)
    return found
