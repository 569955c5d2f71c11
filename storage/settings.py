"""Settings owned by `storage/`: where data lives (`[storage]`) and the default moderator limits
(`[limits]`). Frozen pydantic models; `bot/config.py` reads the file and assembles them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageSettings(_Settings):
    """The database and the image folder."""

    #: Folder for the database and the images (relative paths resolve against the config file).
    data_dir: Path = Path("data")
    #: The SQLite file; defaults to `<data_dir>/atelier.sqlite3`.
    database: Path | None = None
    #: Delete images older than this many days (None keeps them forever).
    max_age_days: float | None = Field(default=None, gt=0)
    #: Delete the oldest images once the folder holds more than this many bytes (None: no cap).
    max_bytes: int | None = Field(default=None, gt=0)
    #: Delete audit log entries (moderator actions, refused prompts) older than this many days
    #: (None keeps them forever).
    audit_max_age_days: float | None = Field(default=365.0, gt=0)
    #: Image files with no database row are removed once older than this (a write may be in flight).
    orphan_grace_s: float = Field(default=3600.0, ge=0)

    @property
    def database_path(self) -> Path:
        return self.database if self.database is not None else self.data_dir / "atelier.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


class LimitsSettings(_Settings):
    """Defaults for moderator limits; moderators override them per server, role and user.

    None means unlimited (up to the engine's hard limits in `[generation]`)."""

    #: Length of the rolling usage window, in hours.
    window_hours: float = Field(default=24.0, gt=0)
    daily_images: int | None = Field(default=100, ge=0)
    #: Cost units per window; one unit is one 512x512 image-step (a 25-step image costs 25).
    daily_cost: float | None = Field(default=None, ge=0)
    max_queued: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=64 * 64)
    max_count: int | None = Field(default=None, ge=1)
