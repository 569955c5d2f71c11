"""Guild settings, bans and blocked words: each change is audited in its own transaction, and so
is a prompt a blocked word refused (once per member and rule every `REFUSAL_AUDIT_QUIET_S`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import aiosqlite

from storage.audit import write_audit
from storage.db import Database

_MAX_PATTERN = 200
#: Characters of a refused prompt kept in its audit entry.
REFUSED_PROMPT_CHARS = 300
#: After a member's prompt is audited as refused by a rule, further refusals by the same rule
#: write nothing for this long: any member can send refused prompts, and each one is a row.
REFUSAL_AUDIT_QUIET_S = 600.0
#: Their last audited refusal by a rule, through the partial index `audit_refusals` (migration
#: 0003), which SQLite uses only when the query repeats its `action = 'prompt.refused'` literally.
_RECENT_REFUSAL = (
    "SELECT 1 FROM audit_log WHERE guild_id = ? AND actor_id = ? AND target = ? AND at > ?"
    " AND action = 'prompt.refused' LIMIT 1")


@dataclass(frozen=True)
class Ban:
    guild_id: int
    user_id: int
    reason: str
    banned_by: int
    at: float


@dataclass(frozen=True)
class BlockedWord:
    pattern: str
    is_regex: bool

    def matches(self, prompt: str) -> bool:
        """Case-insensitive: a word matches whole words only, a regular expression anywhere."""
        regex = self.pattern if self.is_regex else rf"\b{re.escape(self.pattern)}\b"
        return re.search(regex, prompt, flags=re.IGNORECASE) is not None


async def get_guild_settings(db: Database, guild_id: int) -> dict[str, Any]:
    rows = await db.fetch_all(
        "SELECT key, value FROM guild_settings WHERE guild_id = ?", (guild_id,))
    return {row["key"]: json.loads(row["value"]) for row in rows}


async def set_guild_setting(
    db: Database, *, actor_id: int, guild_id: int, key: str, value: Any
) -> None:
    """Set one JSON-serialisable setting; None removes it."""
    async with db.writing() as connection:
        rows = await connection.execute_fetchall(
            "SELECT value FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, key))
        before = json.loads(rows[0]["value"]) if rows else None
        if value is None:
            await connection.execute(
                "DELETE FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, key))
        else:
            await connection.execute(
                "INSERT INTO guild_settings (guild_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (guild_id, key) DO UPDATE SET value = excluded.value",
                (guild_id, key, json.dumps(value)))
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="setting.set", target=key, before=before, after=value)


#: The guild_settings key of a guild whose moderators paused its queue.
_PAUSED = "queue_paused"


async def set_queue_paused(db: Database, guild_id: int, paused: bool) -> None:
    """Remember that a guild's queue is paused (or not), so that a restart keeps it so. Not audited
    here: the moderator command that pauses writes its own audit row."""
    async with db.writing() as connection:
        if paused:
            await connection.execute(
                "INSERT INTO guild_settings (guild_id, key, value) VALUES (?, ?, 'true')"
                " ON CONFLICT (guild_id, key) DO NOTHING", (guild_id, _PAUSED))
        else:
            await connection.execute("DELETE FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, _PAUSED))


async def paused_guilds(db: Database) -> list[int]:
    """Guilds whose queue their moderators paused."""
    rows = await db.fetch_all("SELECT guild_id FROM guild_settings WHERE key = ? ORDER BY guild_id", (_PAUSED,))
    return [row["guild_id"] for row in rows]


async def ban(db: Database, *, actor_id: int, guild_id: int, user_id: int, reason: str) -> Ban:
    """Ban a user from generating in a guild (banning again updates the reason)."""
    async with db.writing() as connection:
        before = await _ban(connection, guild_id, user_id)
        rows = await connection.execute_fetchall(
            "INSERT INTO bans (guild_id, user_id, reason, banned_by, at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (guild_id, user_id) DO UPDATE SET reason = excluded.reason,"
            " banned_by = excluded.banned_by, at = excluded.at RETURNING *",
            (guild_id, user_id, reason, actor_id, db.now()))
        after = Ban(**dict(rows[0]))
        await write_audit(connection, at=after.at, guild_id=guild_id, actor_id=actor_id,
                          action="ban", target=f"user:{user_id}",
                          before=_ban_json(before), after=_ban_json(after))
    return after


async def unban(db: Database, *, actor_id: int, guild_id: int, user_id: int) -> bool:
    """Lift a ban; False if the user was not banned (nothing is audited then)."""
    async with db.writing() as connection:
        before = await _ban(connection, guild_id, user_id)
        if before is None:
            return False
        await connection.execute(
            "DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="unban", target=f"user:{user_id}",
                          before=_ban_json(before), after=None)
    return True


async def get_ban(db: Database, guild_id: int, user_id: int) -> Ban | None:
    row = await db.fetch_one(
        "SELECT * FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
    return Ban(**dict(row)) if row is not None else None


async def list_bans(db: Database, guild_id: int) -> list[Ban]:
    rows = await db.fetch_all("SELECT * FROM bans WHERE guild_id = ? ORDER BY at", (guild_id,))
    return [Ban(**dict(row)) for row in rows]


async def _ban(connection: aiosqlite.Connection, guild_id: int, user_id: int) -> Ban | None:
    rows = await connection.execute_fetchall(
        "SELECT * FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
    return Ban(**dict(rows[0])) if rows else None


def _ban_json(ban: Ban | None) -> dict[str, Any] | None:
    return None if ban is None else {"reason": ban.reason, "banned_by": ban.banned_by}


async def block_word(
    db: Database, *, actor_id: int, guild_id: int, pattern: str, is_regex: bool = False
) -> BlockedWord:
    """Block a word (whole-word match) or a regular expression in a guild's prompts."""
    word = _blocked(pattern, is_regex)
    if not 0 < len(word.pattern) <= _MAX_PATTERN:
        raise ValueError(f"a blocked word or pattern must be 1..{_MAX_PATTERN} characters")
    if is_regex:
        try:
            re.compile(word.pattern)
        except re.error as error:
            raise ValueError(
                f"{word.pattern!r} is not a valid regular expression: {error}") from None
    async with db.writing() as connection:
        cursor = await connection.execute(
            "INSERT OR IGNORE INTO blocked_words (guild_id, pattern, is_regex, added_by, at)"
            " VALUES (?, ?, ?, ?, ?)", (guild_id, word.pattern, is_regex, actor_id, db.now()))
        if cursor.rowcount:
            await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                              action="blocklist.add", target=_word_target(word), before=None,
                              after={"pattern": word.pattern, "is_regex": is_regex})
    return word


async def unblock_word(
    db: Database, *, actor_id: int, guild_id: int, pattern: str, is_regex: bool = False
) -> bool:
    """Remove a blocked word or pattern; False if it was not blocked."""
    word = _blocked(pattern, is_regex)
    async with db.writing() as connection:
        cursor = await connection.execute(
            "DELETE FROM blocked_words WHERE guild_id = ? AND pattern = ? AND is_regex = ?",
            (guild_id, word.pattern, is_regex))
        if not cursor.rowcount:
            return False
        await write_audit(connection, at=db.now(), guild_id=guild_id, actor_id=actor_id,
                          action="blocklist.remove", target=_word_target(word),
                          before={"pattern": word.pattern, "is_regex": is_regex}, after=None)
    return True


async def blocked_words(db: Database, guild_id: int) -> list[BlockedWord]:
    """A guild's blocked words and patterns, in the order they were added."""
    rows = await db.fetch_all(
        "SELECT pattern, is_regex FROM blocked_words WHERE guild_id = ? ORDER BY rowid",
        (guild_id,))
    return [BlockedWord(row["pattern"], bool(row["is_regex"])) for row in rows]


def first_blocked(words: list[BlockedWord], prompt: str) -> BlockedWord | None:
    """The first blocked word or pattern found in `prompt`, if any."""
    return next((word for word in words if word.matches(prompt)), None)


async def audit_refused_prompt(
    db: Database, *, guild_id: int, user_id: int, channel_id: int, word: BlockedWord, prompt: str,
    nsfw: bool = False,
) -> bool:
    """Audit a prompt refused for `word`: the guild's blocked word, or with `nsfw` one of the
    configured words that run only in age-restricted channels. The member is the actor, the rule
    the target (`word:`, `regex:` or `nsfw:`), and the prompt is cut to `REFUSED_PROMPT_CHARS`.
    Nothing is written if this member's refusal by this rule was audited here less than
    `REFUSAL_AUDIT_QUIET_S` ago, so that retrying cannot flood the log; returns whether a row was
    written. One indexed look-up and at most one insert, as it runs inside the queue's submit lock."""
    target = f"nsfw:{word.pattern}" if nsfw else _word_target(word)
    kept = prompt if len(prompt) <= REFUSED_PROMPT_CHARS else prompt[:REFUSED_PROMPT_CHARS - 1] + "…"
    now = db.now()
    async with db.writing() as connection:
        recent = await connection.execute_fetchall(
            _RECENT_REFUSAL, (guild_id, user_id, target, now - REFUSAL_AUDIT_QUIET_S))
        if recent:
            return False
        await write_audit(connection, at=now, guild_id=guild_id, actor_id=user_id,
                          action="prompt.refused", target=target, before=None,
                          after={"prompt": kept, "channel_id": channel_id})
    return True


def _blocked(pattern: str, is_regex: bool) -> BlockedWord:
    """Words match case-insensitively, so they are stored lowercased: "Gore" and "gore" are one."""
    pattern = pattern.strip()
    return BlockedWord(pattern if is_regex else pattern.lower(), is_regex)


def _word_target(word: BlockedWord) -> str:
    return f"{'regex' if word.is_regex else 'word'}:{word.pattern}"
