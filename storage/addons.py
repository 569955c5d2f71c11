"""Which LoRAs and embeddings each server may use: its moderators' rules (migration 0006), each
change audited in its own transaction.

A file's own rule decides; else the server's `*` rule of that kind; else the file is allowed, so a
server without rules may use everything in the folders. An allow-list is `*` disallowed plus the
allowed files; a block-list is a few files disallowed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from storage.audit import write_audit
from storage.db import Database

AddonKind = Literal["lora", "embedding"]
#: The rule name that stands for every file of a kind.
EVERY = "*"


@dataclass(frozen=True)
class AddonRules:
    """One server's rules: (kind, name or `*`) -> allowed."""

    rules: Mapping[tuple[str, str], bool] = field(default_factory=dict)

    def allows(self, kind: str, name: str) -> bool:
        return self.rules.get((kind, name), self.rules.get((kind, EVERY), True))


async def addon_rules(db: Database, guild_id: int | None) -> AddonRules:
    """A server's rules; none in direct messages (no moderators there)."""
    if guild_id is None:
        return AddonRules()
    rows = await db.fetch_all("SELECT kind, name, allowed FROM addon_rules WHERE guild_id = ?", (guild_id,))
    return AddonRules({(row["kind"], row["name"]): bool(row["allowed"]) for row in rows})


async def set_addon_rule(
    db: Database, *, actor_id: int, guild_id: int, kind: AddonKind, name: str, allowed: bool
) -> bool:
    """Allow or disallow one file (or, with `name` `*`, every file of `kind` without a rule of its
    own); False when that rule was already in place (nothing is audited then)."""
    async with db.writing() as connection:
        rows = await connection.execute_fetchall(
            "SELECT allowed FROM addon_rules WHERE guild_id = ? AND kind = ? AND name = ?", (guild_id, kind, name))
        before = bool(rows[0]["allowed"]) if rows else None
        if before == allowed:
            return False
        await connection.execute(
            "INSERT INTO addon_rules (guild_id, kind, name, allowed, set_by, at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (guild_id, kind, name) DO UPDATE SET allowed = excluded.allowed,"
            " set_by = excluded.set_by, at = excluded.at",
            (guild_id, kind, name, allowed, actor_id, db.now()))
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="addons.allow" if allowed else "addons.disallow", target=f"{kind}:{name}",
                          before=None if before is None else {"allowed": before}, after={"allowed": allowed})
    return True


async def reset_addon_rules(db: Database, *, actor_id: int, guild_id: int) -> int:
    """Remove all of a server's rules (everything in the folders is allowed again); how many there
    were. One audit row holds the removed rules."""
    async with db.writing() as connection:
        rows = await connection.execute_fetchall(
            "SELECT kind, name, allowed FROM addon_rules WHERE guild_id = ? ORDER BY kind, name", (guild_id,))
        if not rows:
            return 0
        await connection.execute("DELETE FROM addon_rules WHERE guild_id = ?", (guild_id,))
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id, action="addons.reset",
                          target="addons", before={f"{r['kind']}:{r['name']}": bool(r["allowed"]) for r in rows},
                          after=None)
    return len(rows)
