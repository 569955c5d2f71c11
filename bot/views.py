"""Persistent buttons: all their state lives in a versioned custom id (`atelier:v1:<action>:<job>:<i>`),
so a button works after any restart for as long as its job's images are kept. The client registers
both classes with `add_dynamic_items`; what a press does lives in `bot.commands.Gestures`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, Protocol

import discord

if TYPE_CHECKING:
    from bot.commands import Gestures

Action = Literal["upscale", "vary", "rerun", "subtle", "strong", "zoom"]

_JOB = r"(?P<job>[a-z2-7]{12})"
_PER_ROW = 5
_LABELS: dict[str, tuple[str, str | None]] = {  # action -> (label, emoji)
    "upscale": ("U{n}", None),
    "vary": ("V{n}", None),
    "rerun": ("", "🔄"),
    "subtle": ("Vary (Subtle)", None),
    "strong": ("Vary (Strong)", None),
    "zoom": ("Zoom Out", None),
}


class _HasGestures(Protocol):
    gestures: Gestures


def _gestures(interaction: discord.Interaction) -> Gestures:
    client: _HasGestures = interaction.client  # type: ignore[assignment]
    return client.gestures


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"atelier:v1:(?P<action>upscale|vary|rerun|subtle|strong|zoom):{_JOB}:(?P<index>\d{{1,2}})",
):
    """A new job made from image `index` of job `job_id` (or from its request, for a rerun)."""

    def __init__(self, action: Action, job_id: str, index: int, row: int | None = None) -> None:
        label, emoji = _LABELS[action]
        style = discord.ButtonStyle.primary if action == "rerun" else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(
            label=label.format(n=index + 1) or None, emoji=emoji, style=style,
            custom_id=f"atelier:v1:{action}:{job_id}:{index}", row=row,
        ))
        self.action: Action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> JobButton:
        return cls(match["action"], match["job"], int(match["index"]))  # type: ignore[arg-type]

    async def callback(self, interaction: discord.Interaction) -> None:
        await _gestures(interaction).press(interaction, self.action, self.job_id, self.index)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=rf"atelier:v1:cancel:{_JOB}"):
    """Cancel a queued or running job (its owner or a moderator)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.danger, custom_id=f"atelier:v1:cancel:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> CancelButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await _gestures(interaction).cancel(interaction, self.job_id)


def result_view(job_id: str, count: int, *, upscaled: bool) -> discord.ui.View:
    """U1..Un and 🔄 on one row and V1..Vn on the next under a result (Discord fits five buttons a
    row, so images past the fourth get none); Vary (Subtle), Vary (Strong), Zoom Out and 🔄 under
    an upscale."""
    view = discord.ui.View(timeout=None)
    if upscaled:
        for action in ("subtle", "strong", "zoom"):
            view.add_item(JobButton(action, job_id, 0, row=0))
    else:
        for row, action in enumerate(("upscale", "vary")):
            for index in range(min(count, _PER_ROW - 1)):
                view.add_item(JobButton(action, job_id, index, row=row))
    view.add_item(JobButton("rerun", job_id, 0, row=0))
    return view


def status_view(job_id: str) -> discord.ui.View:
    return discord.ui.View(timeout=None).add_item(CancelButton(job_id))
