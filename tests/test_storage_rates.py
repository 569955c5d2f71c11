"""The measured batch rates survive a restart of the database."""

from __future__ import annotations

from pathlib import Path

from storage.db import Database
from storage.rates import load_rates, save_rate
from storage.settings import StorageSettings


async def test_rates_are_stored_replaced_and_loaded_after_a_reopen(tmp_path: Path) -> None:
    settings = StorageSettings(data_dir=tmp_path)
    async with Database.open(settings) as db:
        assert await load_rates(db) == {}
        await save_rate(db, ("sd15", 512, 512, 1), 30.0)
        await save_rate(db, ("sd15", 512, 512, 4), 70.0)
        await save_rate(db, ("sd15", 512, 512, 1), 33.0)  # the newer average replaces the older
    async with Database.open(settings) as db:
        assert await load_rates(db) == {("sd15", 512, 512, 1): 33.0, ("sd15", 512, 512, 4): 70.0}
