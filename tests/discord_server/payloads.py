"""The JSON shapes Discord sends, built from `state` objects, complete enough for discord.py's models."""

from __future__ import annotations

from typing import Any

from .state import Attachment, Channel, Guild, Interaction, Member, Message, Role, User, snowflake_time


def user(u: User) -> dict[str, Any]:
    return {
        "id": str(u.id),
        "username": u.name,
        "global_name": None if u.bot else u.name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": u.bot,
        "public_flags": 0,
        "flags": 0,
        "banner": None,
        "accent_color": None,
    }


def role(r: Role) -> dict[str, Any]:
    return {
        "id": str(r.id),
        "name": r.name,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": r.position,
        "permissions": str(r.permissions),
        "managed": False,
        "mentionable": True,
        "flags": 0,
    }


def member(m: Member, *, channel: Channel | None = None, with_user: bool = True) -> dict[str, Any]:
    """A guild member; `channel` adds the `permissions` string interactions carry."""
    data: dict[str, Any] = {
        "nick": m.nick,
        "avatar": None,
        "roles": [str(r.id) for r in m.roles],
        "joined_at": m.joined_at,
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
        "communication_disabled_until": None,
    }
    if with_user:
        data["user"] = user(m.user)
    if channel is not None:
        data["permissions"] = str(m.permissions(channel))
    return data


def channel(c: Channel) -> dict[str, Any]:
    if c.guild is None:
        assert c.recipient is not None
        return {"id": str(c.id), "type": 1, "last_message_id": None, "recipients": [user(c.recipient)], "flags": 0}
    return {
        "id": str(c.id),
        "type": 0,
        "guild_id": str(c.guild.id),
        "name": c.name,
        "position": c.guild.channels.index(c),
        "permission_overwrites": [
            {"id": str(member_id), "type": 1, "allow": "0", "deny": str(bits)} for member_id, bits in c.denied.items()
        ],
        "nsfw": c.nsfw,
        "topic": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "parent_id": None,
        "flags": 0,
    }


def guild_create(g: Guild) -> dict[str, Any]:
    """The full GUILD_CREATE payload (the bot's own member included, as Discord does)."""
    return {
        "id": str(g.id),
        "name": g.name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "banner": None,
        "description": None,
        "owner_id": str(g.owner.id),
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "preferred_locale": "en-US",
        "system_channel_id": None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "public_updates_channel_id": None,
        "features": [],
        "roles": [role(r) for r in g.roles],
        "emojis": [],
        "stickers": [],
        "channels": [channel(c) for c in g.channels],
        "threads": [],
        "members": [member(m) for m in g.members.values()],
        "member_count": len(g.members),
        "presences": [],
        "voice_states": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
        "joined_at": snowflake_time(g.id),
        "large": False,
        "unavailable": False,
        "lazy": True,
        "application_id": None,
        "max_members": 500000,
        "vanity_url_code": None,
        "premium_progress_bar_enabled": False,
    }


def attachment(a: Attachment) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(a.id),
        "filename": a.filename,
        "size": a.size,
        "url": a.url,
        "proxy_url": a.url,
        "content_type": a.content_type,
        "description": a.description,
        "ephemeral": a.ephemeral,
        "flags": 0,
    }
    if a.width is not None:
        data["width"], data["height"] = a.width, a.height
    return data


def message(m: Message, *, referenced: bool = True) -> dict[str, Any]:
    """A message as REST returns it and MESSAGE_CREATE carries it (guild_id and the author's member included)."""
    guild = m.channel.guild
    data: dict[str, Any] = {
        "id": str(m.id),
        "channel_id": str(m.channel.id),
        "author": user(m.author),
        "content": m.content,
        "timestamp": snowflake_time(m.id),
        "edited_timestamp": m.edited_timestamp,
        "tts": False,
        "mention_everyone": False,
        "mentions": [_mentioned(u, guild) for u in m.mentions],
        "mention_roles": [],
        "attachments": [attachment(a) for a in m.attachments],
        "embeds": m.embeds,
        "components": m.components,
        "pinned": False,
        "type": _message_type(m),
        "flags": m.flags,
    }
    if guild is not None:
        data["guild_id"] = str(guild.id)
        if m.webhook_id is None and m.author.id in guild.members:
            data["member"] = member(guild.members[m.author.id], with_user=False)
    if m.webhook_id is not None:
        data["webhook_id"] = str(m.webhook_id)
        data["application_id"] = str(m.webhook_id)
    if m.interaction is not None:
        data["interaction_metadata"] = interaction_metadata(m.interaction)
    if m.reference is not None:
        data["message_reference"] = {
            "type": 0,
            "message_id": str(m.reference.id),
            "channel_id": str(m.reference.channel.id),
            **({"guild_id": str(guild.id)} if guild is not None else {}),
        }
        if referenced:
            data["referenced_message"] = None if m.reference.deleted else message(m.reference, referenced=False)
    return data


def message_for_bot(m: Message, bot: User, content_intent: bool) -> dict[str, Any]:
    """`message(m)` as the bot receives it, in gateway events and REST alike: without the
    message-content intent, Discord empties the content fields of `m` and of the message it replies
    to, except in the bot's own messages, DMs and messages that mention the bot."""
    data = message(m)
    if content_intent:
        return data
    if not content_visible(m, bot):
        data |= _blank_content()
    replied = m.reference
    if data.get("referenced_message") is not None and replied is not None and not content_visible(replied, bot):
        data["referenced_message"] |= _blank_content()
    return data


def content_visible(m: Message, bot: User) -> bool:
    """Whether a bot without the message-content intent sees what `m` says and carries."""
    return m.author is bot or m.channel.guild is None or bot in m.mentions


def _blank_content() -> dict[str, Any]:
    return {"content": "", "embeds": [], "attachments": [], "components": []}


def interaction_metadata(i: Interaction) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(i.id),
        "type": i.type,
        "user": user(i.user),
        "authorizing_integration_owners": integration_owners(i.channel),
    }
    if i.original is not None:
        data["original_response_message_id"] = str(i.original.id)
    if i.type == 3:
        data["interacted_message_id"] = i.payload["message"]["id"]
    if i.type == 2 and "target_id" in i.payload["data"]:
        data["target_message_id"] = i.payload["data"]["target_id"]
    return data


def integration_owners(c: Channel) -> dict[str, str]:
    """The app is installed to guilds: keyed "0" by the guild's id, or "0" in the bot's DMs."""
    return {"0": str(c.guild.id) if c.guild is not None else "0"}


def _mentioned(u: User, guild: Guild | None) -> dict[str, Any]:
    data = user(u)
    if guild is not None and u.id in guild.members:
        data["member"] = member(guild.members[u.id], with_user=False)
    return data


def _message_type(m: Message) -> int:
    """DEFAULT 0, REPLY 19, CHAT_INPUT_COMMAND 20, CONTEXT_MENU_COMMAND 23 (the original response to a command)."""
    i = m.interaction
    if i is not None and i.type == 2 and m is i.original:
        return 23 if i.payload["data"]["type"] != 1 else 20
    return 19 if m.reference is not None else 0
