"""LoRAs and embeddings in Discord: what a server may use, the checks every request passes when it
is submitted, `/loras`, the moderators' `/addons` and the `<lora:` completion of /imagine's prompt.

A file is usable here when the server's rules allow it (`storage.addons`: by default everything in
the folders), it is not one of `[discord] nsfw_addons` outside an age-restricted channel, and it
can be read. A request is refused at submit, with every problem at once, when its prompt has a
`<lora:...>` tag in the negative prompt, a LoRA name that is not in the folder (the closest usable
names are offered), or a LoRA or embedding that is not usable here or is for another family than
the request's model: the member hears it at once, not when the runner reaches the job.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Literal

import discord
from discord import app_commands
from PIL import Image

from bot.config import DiscordSettings
from bot.moderation import ModeratorGroup, answer, fit_lines
from bot.policy import Requester
from generation.addons import LCM_GUIDANCE, LCM_STEPS, AddonInfo, AddonLibrary
from generation.prompts import PromptError, check_lora_tags, embedding_words, split_lora_tags, words_pattern
from generation.request import GenerationRequest
from storage.addons import EVERY, AddonRules, addon_rules, reset_addon_rules, set_addon_rule
from storage.db import Database
from storage.images import ImageRecord, ImageStatus, image_file
from storage.moderation import BlockedWord, audit_refused_prompt

#: Discord's limits: characters of one message, choices of one autocompletion and characters of
#: a choice's name and value.
MESSAGE_CHARS = 2000
MAX_CHOICES = 25
CHOICE_CHARS = 100
#: A `<lora:` tag being typed at the end of the prompt: its name so far.
_TYPING_TAG = re.compile(r"<lora:([^<>:]*)$", re.I)
#: Characters of one /loras line (long trigger lists and error messages are cut).
_LINE_CHARS = 300
_WHAT = {"lora": "LoRA", "embedding": "embedding"}


class Addons:
    """The bot's side of the add-on folders (`library`, shared with the engine)."""

    def __init__(self, library: AddonLibrary, db: Database, settings: DiscordSettings) -> None:
        self.library = library
        self.db = db
        self.settings = settings

    async def files(self) -> tuple[dict[str, AddonInfo], dict[str, AddonInfo]]:
        """(LoRAs, embeddings) by name, off the loop: new or changed files are read."""
        return await asyncio.to_thread(lambda: (self.library.loras(), self.library.embeddings()))

    def nsfw(self, name: str) -> bool:
        """Whether `[discord] nsfw_addons` names the file (wildcards, any case)."""
        return any(fnmatch.fnmatch(name.lower(), pattern.lower()) for pattern in self.settings.nsfw_addons)

    def why_not(self, info: AddonInfo, rules: AddonRules, requester: Requester) -> str | None:
        """Why `requester` may not use the file here, or None."""
        what = f"{_WHAT[info.kind]} {info.name}"
        if not rules.allows(info.kind, info.name):
            return f"{what} is not allowed in this server (/loras lists those that are)"
        if self.nsfw(info.name) and not requester.channel_nsfw:
            return f"{what} runs only in age-restricted channels; try it in one"
        if info.error is not None:
            return f"{what} cannot be used: {info.error}"
        return None

    async def usable(self, requester: Requester) -> tuple[list[AddonInfo], list[AddonInfo], int]:
        """(usable LoRAs, usable embeddings, how many more this server allows in age-restricted
        channels only)."""
        loras, embeddings = await self.files()
        rules = await addon_rules(self.db, requester.guild_id)
        shown: dict[str, list[AddonInfo]] = {"lora": [], "embedding": []}
        hidden = 0
        for info in (*loras.values(), *embeddings.values()):
            if not rules.allows(info.kind, info.name):
                continue
            if self.nsfw(info.name) and not requester.channel_nsfw:
                hidden += 1
            else:
                shown[info.kind].append(info)  # unreadable files too: /loras says why
        return shown["lora"], shown["embedding"], hidden

    async def problems(self, request: GenerationRequest, requester: Requester, family: str | None) -> list[str]:
        """Every reason the request's LoRAs and embeddings cannot run for `requester` here on its
        model, whose family label (`models.lora.family_label`) is `family` (None: not checked)."""
        loras, embeddings = await self.files()
        rules = await addon_rules(self.db, requester.guild_id)
        found = []
        try:
            check_lora_tags("", request.negative_prompt, ())  # tags in the negative prompt
        except PromptError as error:
            found.append(str(error))
        try:
            tags = split_lora_tags(request.prompt)[1]
        except PromptError as error:
            return [*found, str(error)]
        used = [loras.get(name, name) for name in dict.fromkeys(name for name, _ in tags)]
        used += [embeddings[n] for n in embedding_words([request.prompt, request.negative_prompt], list(embeddings))]
        # The names to offer instead of unknown ones: only looked up when a name is unknown.
        usable = [n for n, info in loras.items() if self.why_not(info, rules, requester) is None
                  ] if any(isinstance(info, str) for info in used) else []
        for info in used:
            if isinstance(info, str):  # not in the folder
                try:
                    check_lora_tags(f"<lora:{info}>", "", usable)
                except PromptError as error:
                    found.append(str(error) if usable or not loras else
                                 f"unknown LoRA {info!r}; no LoRAs can be used here")
            elif (reason := self.why_not(info, rules, requester)) is not None:
                found.append(reason)
                if requester.guild_id is not None and self.nsfw(info.name) and rules.allows(info.kind, info.name):
                    await audit_refused_prompt(  # as prompts with NSFW words are, for the moderators
                        self.db, guild_id=requester.guild_id, user_id=requester.user_id,
                        channel_id=requester.channel_id, word=BlockedWord(info.name, is_regex=False),
                        prompt=request.prompt, nsfw=True)
            elif family is not None and info.family is not None and info.family != family:
                found.append(f"{_WHAT[info.kind]} {info.name} is for {info.family}; the model {request.model} "
                             f"is {family}")
        return found

    async def complete_prompt(self, requester: Requester, current: str) -> list[app_commands.Choice[str]]:
        """When the prompt being typed ends in `<lora:partial`, the prompt completed with each
        usable LoRA whose name contains `partial` (those starting with it first), `:1>` appended.
        Discord caps a choice at 100 characters: a longer completed prompt is not offered (a tag
        typed early in the prompt still completes)."""
        typing = _TYPING_TAG.search(current)
        if typing is None:
            return []
        partial, head = typing.group(1).strip().lower(), current[:typing.start()]
        loras, _, _ = await self.usable(requester)
        names = sorted((i.name for i in loras if i.error is None and partial in i.name.lower()),
                       key=lambda n: (not n.lower().startswith(partial), n.lower()))
        values = [f"{head}<lora:{name}:1>" for name in names]
        return [app_commands.Choice(name=v, value=v) for v in values if len(v) <= CHOICE_CHARS][:MAX_CHOICES]

    def commands(self) -> list[app_commands.Command | app_commands.Group]:
        """`/loras` for everyone, `/addons` for moderators."""
        return [self._loras_command(), AddonsCommands(self)]

    def _loras_command(self) -> app_commands.Command:
        @app_commands.command(name="loras", description="The LoRAs and embeddings you can use here")
        @app_commands.describe(page="Which page of the list")
        async def loras(interaction: discord.Interaction, page: app_commands.Range[int, 1, 100] = 1) -> None:
            requester = Requester.of(interaction.user, interaction.channel)
            await interaction.response.send_message(await self.listing(requester, page), ephemeral=True)

        return loras

    async def listing(self, requester: Requester, page: int = 1) -> str:
        """Page `page` of /loras: each usable file with the family it fits and its trigger words,
        pages cut at whole lines to fit one message."""
        loras, embeddings, hidden = await self.usable(requester)
        lines = []
        if loras:
            lines.append("**LoRAs**: write `<lora:NAME:WEIGHT>` in the prompt (weight 1 if left out)")
            lines += [_line(info) for info in loras]
        if embeddings:
            lines.append("**Embeddings**: write the name as a word, in the prompt or the negative prompt")
            lines += [_line(info) for info in embeddings]
        if not lines:
            lines.append("No LoRAs or embeddings can be used here.")
        if hidden:
            lines.append(f"-# {hidden} more only in age-restricted channels.")
        pages = _pages(lines, MESSAGE_CHARS - 40)
        page = min(page, len(pages))
        if len(pages) == 1:
            return pages[0]
        more = f": /loras page:{page + 1} for more" if page < len(pages) else ""
        return f"{pages[page - 1]}\n-# Page {page} of {len(pages)}{more}."


def _line(info: AddonInfo) -> str:
    """`- name` · family · what else helps to use it."""
    parts = [f"- `{info.name}`", info.family or "family unknown"]
    if info.error is not None:
        parts.append(f"cannot be used: {info.error}")
    if info.lcm:
        parts.append(f"LCM: defaults to sampler lcm, {LCM_STEPS} steps, guidance {LCM_GUIDANCE:g}")
    if info.kind == "embedding" and info.vectors is not None:
        parts.append(f"{info.vectors} token{'s' if info.vectors != 1 else ''}")
    elif info.triggers:
        parts.append("triggers: " + ", ".join(discord.utils.escape_markdown(t) for t in info.triggers))
    line = " · ".join(parts)
    return line if len(line) <= _LINE_CHARS else line[:_LINE_CHARS - 1] + "…"


def _pages(lines: list[str], size: int) -> list[str]:
    """Lines joined into pages of at most `size` characters, cut between lines."""
    pages = [""]
    for line in lines:
        if pages[-1] and len(pages[-1]) + 1 + len(line) > size:
            pages.append("")
        pages[-1] += ("\n" if pages[-1] else "") + line
    return pages


class AddonsCommands(ModeratorGroup, name="addons",
                     description="Which LoRAs and embeddings this server may use"):
    """Rules per file, or `*` for all files of a kind; changes are audited (/audit kind:add-ons)."""

    def __init__(self, addons: Addons) -> None:
        super().__init__(addons.settings)
        self._addons = addons
        self._db = addons.db

    async def _targets(self, name: str, kind: Literal["lora", "embedding"] | None) -> list[tuple[str, str]]:
        """The (kind, name) rules `name` means: `*` every kind (or `kind`), a file name the kinds
        that have such a file; ValueError naming the closest files when there is none."""
        name = name.strip()
        kinds = (kind,) if kind else ("lora", "embedding")
        if name == EVERY:
            return [(k, EVERY) for k in kinds]
        loras, embeddings = await self._addons.files()
        folders = {"lora": loras, "embedding": embeddings}
        found = [(k, name) for k in kinds if name in folders[k]]
        if not found:
            known = [n for k in kinds for n in folders[k]]
            close = ", ".join(f"`{n}`" for n in get_close_matches(name, known, n=3, cutoff=0.5))
            raise ValueError(f"There is no {' or '.join(_WHAT[k] for k in kinds)} named `{name}`"
                             + (f"; did you mean {close}?" if close else "; /loras lists the files."))
        return found

    async def _set(self, interaction: discord.Interaction, name: str, kind: str | None, allowed: bool) -> None:
        assert interaction.guild_id is not None
        try:
            targets = await self._targets(name, kind)  # type: ignore[arg-type]
        except ValueError as error:
            await answer(interaction, str(error))
            return
        lines = []
        for target_kind, target in targets:
            changed = await set_addon_rule(self._db, actor_id=interaction.user.id, guild_id=interaction.guild_id,
                                           kind=target_kind, name=target, allowed=allowed)  # type: ignore[arg-type]
            what = f"every {_WHAT[target_kind]} without a rule of its own" if target == EVERY else \
                f"{_WHAT[target_kind]} `{target}`"
            state = "allowed" if allowed else "not allowed"
            lines.append(f"{what[:1].upper()}{what[1:]}: {state}{'' if changed else ' already'}.")
        await answer(interaction, "\n".join(lines))

    @app_commands.command(name="allow", description="Allow a LoRA or embedding here (* = all without a rule)")
    @app_commands.describe(name="A file name, or * for every file without a rule of its own",
                           kind="LoRA or embedding (both if left out)")
    async def allow(self, interaction: discord.Interaction, name: str,
                    kind: Literal["lora", "embedding"] | None = None) -> None:
        await self._set(interaction, name, kind, True)

    @app_commands.command(name="disallow", description="Refuse a LoRA or embedding here (* = all without "
                                                       "a rule: an allow-list)")
    @app_commands.describe(name="A file name, or * for every file without a rule of its own",
                           kind="LoRA or embedding (both if left out)")
    async def disallow(self, interaction: discord.Interaction, name: str,
                       kind: Literal["lora", "embedding"] | None = None) -> None:
        await self._set(interaction, name, kind, False)

    @allow.autocomplete("name")
    @disallow.autocomplete("name")
    async def _complete_name(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        loras, embeddings = await self._addons.files()
        names = [EVERY, *dict.fromkeys([*loras, *embeddings])]
        return [app_commands.Choice(name=n, value=n) for n in names
                if current.lower() in n.lower() and len(n) <= CHOICE_CHARS][:MAX_CHOICES]

    @app_commands.command(name="show", description="This server's rules for LoRAs and embeddings")
    async def show(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        rules = (await addon_rules(self._db, interaction.guild_id)).rules
        lines = []
        for kind in ("lora", "embedding"):
            default = rules.get((kind, EVERY), True)
            own = sorted((n, a) for (k, n), a in rules.items() if k == kind and n != EVERY)
            lines.append(f"**{_WHAT[kind]}s**: {'allowed' if default else 'not allowed'} unless listed")
            lines += [f"- `{n}`: {'allowed' if a else 'not allowed'}" for n, a in own]
        patterns = ", ".join(f"`{p}`" for p in self._addons.settings.nsfw_addons)
        if patterns:
            lines.append(f"-# Only in age-restricted channels (`[discord] nsfw_addons`): {patterns}")
        await answer(interaction, fit_lines(lines))

    @app_commands.command(name="reset", description="Remove this server's rules: everything in the folders "
                                                    "is allowed again")
    async def reset(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        removed = await reset_addon_rules(self._db, actor_id=interaction.user.id, guild_id=interaction.guild_id)
        await answer(interaction, f"Removed {removed} rule{'s' if removed != 1 else ''}: every LoRA and "
                                   "embedding in the folders is allowed here." if removed else
                      "This server has no rules: every LoRA and embedding in the folders is allowed here.")


#: The x4 upscaler's prompt when a request's prompt held nothing but add-ons.
UPSCALER_FALLBACK_PROMPT = "high quality"


async def without_addons(request: GenerationRequest, addons: Addons) -> GenerationRequest:
    """An x4 upscale of an image drawn with LoRAs or embeddings: the upscaler is another model, so
    its prompts lose the `<lora:...>` tags and embedding words (its ancestors keep them: buttons
    pressed on the upscaled image start again from the drawing model's request)."""
    _, embeddings = await addons.files()
    words = words_pattern(list(embeddings))

    def strip(text: str) -> str:
        text = split_lora_tags(text)[0]
        return " ".join((words.sub("", text) if words else text).split()).strip(" ,")

    return request.model_copy(update=dict(prompt=strip(request.prompt) or UPSCALER_FALLBACK_PROMPT,
                                          negative_prompt=strip(request.negative_prompt)))


#: The web UIs' add-on fields in a PNG's `parameters` text, as the engine writes them.
_HASH_FIELDS = re.compile(r'\b(Lora hashes|TI hashes): "([^"]*)"')


async def stored_hashes(db: Database, images: Sequence[ImageRecord]) -> str | None:
    """`Lora hashes: ...; TI hashes: ...` of a job, as its first stored image carries them (the
    files' versions it was made with), for /show; None without add-ons or images."""
    image = next((i for i in images if i.status is ImageStatus.OK), None)
    if image is None:
        return None
    try:
        parameters = await asyncio.to_thread(_parameters, image_file(db, image))
    except (OSError, ValueError):  # gone, or not an image any more: /show says so for the files
        return None
    fields = _HASH_FIELDS.findall(parameters)
    return "; ".join(f"{key}: {value}" for key, value in fields) or None


def _parameters(path: Path) -> str:
    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))
