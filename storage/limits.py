"""Moderator limits per guild, role and user, and the usage ledger they are checked against.

Resolution, field by field: defaults, then the guild's override, then the user's roles, then
the user's own override. Among several roles that set a field the most generous value wins
(None, unlimited, beats any number; otherwise the largest), the way Discord permissions add
up: giving someone an extra role never takes an allowance away. Overrides store only the fields
they set, so "unlimited" (null) and "inherit" (absent) stay distinct.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiosqlite
from pydantic import ValidationError

from storage.audit import write_audit
from storage.db import Database
from storage.settings import LimitsSettings

#: Fields a moderator may override (the window length is server-wide configuration).
OVERRIDABLE = ("daily_images", "daily_cost", "max_queued", "max_steps", "max_pixels", "max_count")


class Scope(StrEnum):
    GUILD = "guild"
    ROLE = "role"
    USER = "user"


Override = Mapping[str, Any]


@dataclass(frozen=True)
class Usage:
    """What a user spent in the rolling window: cost units, images and finished jobs."""

    cost: float
    images: int
    jobs: int


def validate_override(values: Override, defaults: LimitsSettings) -> None:
    """Check a moderator's override; the error names the allowed fields and bounds."""
    unknown = sorted(set(values) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown limit {', '.join(unknown)}; allowed: {', '.join(OVERRIDABLE)}")
    try:
        LimitsSettings.model_validate({**defaults.model_dump(), **values})
    except ValidationError as error:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
        raise ValueError(f"invalid limit ({problems}); None means unlimited") from None


def resolve_limits(
    defaults: LimitsSettings,
    guild: Override | None,
    roles: Iterable[Override],
    user: Override | None,
) -> LimitsSettings:
    """Apply the overrides in order (see the module docstring); pure, so easy to reason about."""
    merged = defaults.model_dump()
    merged.update(guild or {})
    merged.update(_most_generous(roles))
    merged.update(user or {})
    return LimitsSettings.model_validate(merged)


def _most_generous(roles: Iterable[Override]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for role in roles:
        for field, value in role.items():
            if field not in best:
                best[field] = value
            elif best[field] is not None:
                best[field] = None if value is None else max(best[field], value)
    return best


async def effective_limits(
    db: Database,
    guild_id: int | None,
    user_id: int,
    role_ids: Iterable[int],
    defaults: LimitsSettings,
) -> LimitsSettings:
    """The limits that apply to `user_id` with `role_ids` in a guild (defaults in DMs)."""
    if guild_id is None:
        return defaults
    roles = sorted(set(role_ids))
    rows = await db.fetch_all(
        "SELECT scope, limits_json FROM limits WHERE guild_id = ? AND (scope = 'guild'"
        f" OR (scope = 'role' AND target_id IN ({', '.join('?' * len(roles))}))"
        " OR (scope = 'user' AND target_id = ?))",
        (guild_id, *roles, user_id),
    )
    by_scope: dict[str, list[Override]] = {scope.value: [] for scope in Scope}
    for row in rows:
        by_scope[row["scope"]].append(json.loads(row["limits_json"]))
    guild = by_scope["guild"][0] if by_scope["guild"] else None
    user = by_scope["user"][0] if by_scope["user"] else None
    return resolve_limits(defaults, guild, by_scope["role"], user)


async def set_limits(
    db: Database,
    *,
    actor_id: int,
    guild_id: int,
    scope: Scope,
    target_id: int,
    values: Override,
    defaults: LimitsSettings,
) -> None:
    """Merge `values` into the override of one guild, role or user (audited)."""
    validate_override(values, defaults)
    async with db.writing() as connection:
        before = await _override(connection, guild_id, scope, target_id)
        after = {**(before or {}), **values}  # fields are checked one by one, so still valid
        await connection.execute(
            "INSERT INTO limits (guild_id, scope, target_id, limits_json) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (guild_id, scope, target_id) DO UPDATE SET"
            " limits_json = excluded.limits_json",
            (guild_id, scope.value, target_id, json.dumps(after, sort_keys=True)),
        )
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="limits.set", target=f"{scope.value}:{target_id}",
                          before=before, after=after)


async def clear_limits(
    db: Database, *, actor_id: int, guild_id: int, scope: Scope, target_id: int
) -> bool:
    """Remove an override entirely (audited); False if there was none."""
    async with db.writing() as connection:
        before = await _override(connection, guild_id, scope, target_id)
        if before is None:
            return False
        await connection.execute(
            "DELETE FROM limits WHERE guild_id = ? AND scope = ? AND target_id = ?",
            (guild_id, scope.value, target_id))
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="limits.clear", target=f"{scope.value}:{target_id}",
                          before=before, after=None)
    return True


async def _override(connection: aiosqlite.Connection, guild_id: int, scope: Scope,
                    target_id: int) -> dict[str, Any] | None:
    rows = await connection.execute_fetchall(
        "SELECT limits_json FROM limits WHERE guild_id = ? AND scope = ? AND target_id = ?",
        (guild_id, scope.value, target_id))
    return json.loads(rows[0]["limits_json"]) if rows else None


async def usage(db: Database, user_id: int, guild_id: int | None, window_hours: float) -> Usage:
    """A user's spending in one guild (or in DMs) over the last `window_hours`."""
    row = await db.fetch_one(
        "SELECT coalesce(sum(cost), 0) AS cost, coalesce(sum(images), 0) AS images,"
        " count(*) AS jobs FROM usage WHERE user_id = ? AND guild_id IS ? AND at > ?",
        (user_id, guild_id, db.now() - window_hours * 3600),
    )
    assert row is not None  # an aggregate always yields one row
    return Usage(cost=row["cost"], images=row["images"], jobs=row["jobs"])


async def guild_overrides(db: Database, guild_id: int) -> dict[tuple[Scope, int], Override]:
    """Every override in one guild, by (scope, target id), for the moderators' /limits show."""
    rows = await db.fetch_all(
        "SELECT scope, target_id, limits_json FROM limits WHERE guild_id = ?", (guild_id,))
    return {(Scope(r["scope"]), r["target_id"]): json.loads(r["limits_json"]) for r in rows}


async def usage_times(
    db: Database, user_id: int, guild_id: int | None, window_hours: float
) -> list[tuple[float, float, int]]:
    """(when, cost, images) of each usage row in the window, oldest first: when each frees up."""
    rows = await db.fetch_all(
        "SELECT at, cost, images FROM usage WHERE user_id = ? AND guild_id IS ? AND at > ? ORDER BY at",
        (user_id, guild_id, db.now() - window_hours * 3600),
    )
    return [(row["at"], row["cost"], row["images"]) for row in rows]
