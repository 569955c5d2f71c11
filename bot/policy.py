"""Who is asking, and whether they may: bans, blocked words, age-restricted prompts, DMs and the
moderators' usage limits, checked on the bot's side before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass

import discord


@dataclass(frozen=True)
class Requester:
    """The member (or DM user) behind a request, with what the checks need to know about them."""

    user_id: int
    #: None in direct messages.
    guild_id: int | None
    channel_id: int
    role_ids: tuple[int, ...] = ()
    role_names: tuple[str, ...] = ()
    #: Has the Manage Server permission in this guild.
    manage_guild: bool = False
    #: The channel is age-restricted (NSFW).
    channel_nsfw: bool = False

    @classmethod
    def of(cls, user: discord.User | discord.Member, channel: object) -> Requester:
        """From the author of a message or interaction and the channel it happened in."""
        roles = [r for r in getattr(user, "roles", []) if not r.is_default()]
        permissions = getattr(user, "guild_permissions", None)
        guild = getattr(user, "guild", None)
        return cls(
            user_id=user.id,
            guild_id=guild.id if guild is not None else None,
            channel_id=getattr(channel, "id", 0),
            role_ids=tuple(r.id for r in roles),
            role_names=tuple(r.name for r in roles),
            manage_guild=bool(permissions and permissions.manage_guild),
            channel_nsfw=bool(getattr(channel, "is_nsfw", lambda: False)()),
        )
