"""The record of what the bot did, in order, and waiting on it with failures that say what did happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .state import Interaction, Message

ActionKind = Literal["callback", "message", "edit", "delete"]
CALLBACK_NAMES = {
    4: "reply",
    5: "defer (thinking)",
    6: "defer (update)",
    7: "update message",
    8: "autocomplete choices",
    9: "modal",
}


@dataclass(frozen=True)
class Action:
    """One effect of the bot: an interaction callback, or a message created, edited or deleted.

    `message` is the live stored message (later edits show through); `content` is its text when the
    action happened. `interaction` is set when the action answered one (responses, followups).
    `at` (time.monotonic()) lets tests check pacing, e.g. how often progress is edited.
    """

    kind: ActionKind
    message: Message | None = None
    interaction: Interaction | None = None
    callback_type: int | None = None
    content: str | None = None
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        parts = [self.kind]
        if self.callback_type is not None:
            parts.append(f"type {self.callback_type} ({CALLBACK_NAMES.get(self.callback_type, '?')})")
        if self.interaction is not None:
            name = self.interaction.payload.get("data", {}).get("name") or self.interaction.payload.get("data", {}).get(
                "custom_id"
            )
            parts.append(f"to interaction {self.interaction.id} ({name})")
        if self.message is not None:
            m = self.message
            flags = " ephemeral" if m.ephemeral else ""
            parts.append(
                f"message {m.id} in #{m.channel.name}{flags}: {self.content!r}"
                f" files={[a.filename for a in m.attachments]} buttons={m.custom_ids()}"
            )
        return " ".join(parts)


class ActionLog:
    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.refusals: list[str] = []  # API errors the bot's requests earned (expired token, missing permission...)
        self.server_errors: list[str] = []  # routes this server lacks and its own exceptions: a gap to fill here
        self._changed = asyncio.Event()

    def append(self, action: Action) -> None:
        self.actions.append(action)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[Action], bool], *, timeout: float, since: int) -> Action:
        """The first action from index `since` on matching `predicate`, waiting up to `timeout` seconds for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        checked = since
        while True:
            for action in self.actions[checked:]:
                if predicate(action):
                    return action
            checked = max(checked, len(self.actions))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(self._timeout_message(predicate, timeout, since))
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def _timeout_message(self, predicate: Callable[[Action], bool], timeout: float, since: int) -> str:
        name = getattr(predicate, "__doc__", None) or getattr(predicate, "__name__", repr(predicate))
        seen = [f"  {n}. {a}" for n, a in enumerate(self.actions) if n >= since] or ["  (nothing)"]
        lines = [f"no bot action matched {name} within {timeout}s; since #{since} the bot did:", *seen]
        if self.refusals:
            lines += ["requests refused with an API error:", *(f"  {r}" for r in self.refusals)]
        if self.server_errors:
            lines += ["requests this server could not serve:", *(f"  {e}" for e in self.server_errors)]
        return "\n".join(lines)
