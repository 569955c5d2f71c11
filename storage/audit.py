"""The audit log: every moderator action, who did it and what changed, and the prompts blocked
words refused, who tried them and which rule matched.

Moderation functions call `write_audit` with their own open transaction, so an action and its
audit row are committed together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aiosqlite

from storage.db import Database


@dataclass(frozen=True)
class AuditEntry:
    id: int
    guild_id: int
    actor_id: int
    action: str
    target: str
    before: Any
    after: Any
    at: float


async def write_audit(
    connection: aiosqlite.Connection,
    *,
    at: float,
    guild_id: int,
    actor_id: int,
    action: str,
    target: str,
    before: Any,
    after: Any,
) -> None:
    """Append one entry inside the caller's transaction; None means "did not exist"."""
    await connection.execute(
        "INSERT INTO audit_log (guild_id, actor_id, action, target, before_json, after_json, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (guild_id, actor_id, action, target, _json_or_null(before), _json_or_null(after), at),
    )


async def audit_log(
    db: Database,
    guild_id: int,
    *,
    actions: Collection[str] | None = None,
    user_id: int | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """A guild's audit entries, newest first; pass the last entry's id as `before_id` to page.
    `actions` keeps only those actions, `user_id` only the entries by that user or about them:
    target `user:<id>`, or a job of theirs (a moderator's `queue.cancel` keeps the job's owner
    in its before value, the target being the job)."""
    where = ["guild_id = ?", "id < ?"]
    params: list[Any] = [guild_id, before_id if before_id is not None else 2**63 - 1]
    if actions is not None:
        where.append(f"action IN ({', '.join('?' * len(actions))})")
        params += actions
    if user_id is not None:
        where.append("(actor_id = ? OR target = ? OR json_extract(before_json, '$.owner') = ?)")
        params += [user_id, f"user:{user_id}", user_id]
    rows = await db.fetch_all(
        f"SELECT * FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [
        AuditEntry(
            id=row["id"], guild_id=row["guild_id"], actor_id=row["actor_id"],
            action=row["action"], target=row["target"], at=row["at"],
            before=_load_or_none(row["before_json"]), after=_load_or_none(row["after_json"]),
        )
        for row in rows
    ]


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _load_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)
