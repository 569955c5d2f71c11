"""The runner's measured batch rates (cost units per second) by model, size and images per batch,
kept so the queue's ETAs start from what the GPU did before a restart, not from a guess."""

from __future__ import annotations

from generation.request import RateKey
from storage.db import Database


async def load_rates(db: Database) -> dict[RateKey, float]:
    rows = await db.fetch_all("SELECT model, width, height, images, rate FROM batch_rates")
    return {(r["model"], r["width"], r["height"], r["images"]): r["rate"] for r in rows}


async def save_rate(db: Database, key: RateKey, rate: float) -> None:
    """Store the latest moving average of one kind of batch (replacing the one before)."""
    async with db.writing() as connection:
        await connection.execute(
            "INSERT INTO batch_rates (model, width, height, images, rate, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, width, height, images) DO UPDATE SET"
            " rate = excluded.rate, updated_at = excluded.updated_at",
            (*key, rate, db.now()))
