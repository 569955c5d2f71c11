"""Cached steps (DeepCache, Ma et al. 2023), opt-in (`[generation] step_cache_interval`): the
UNet's deep features change little from one sampler call to the next, so of a run's UNet calls
every `interval`-th is full and keeps the deep feature, and the calls in between run only the
shallow blocks on it (`models.unet.UNetModel.forward_shallow`). Approximate: the images differ
from the exact path's; `atelier bench engine --step-cache N` prints by how much (PSNR) and what
it saves.

`UNetCalls` puts the UNet's three calls under one signature, so that one `CompiledCall` keys
them apart like any other argument; `StepCache` is one run's schedule and kept feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.unet import UNetModel

#: The intervals allowed: 1 is off (the exact path); DeepCache's paper measures up to 5 for SD.
INTERVALS = range(1, 6)


class SteppedUNet(Protocol):
    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 deep: Tensor | None = None, keep: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """`UNetCalls`' contract: the output; with `keep`, (output, deep feature); given `deep`,
        the output of the shallow blocks on it."""
        ...


@dataclass(frozen=True, eq=False)
class UNetCalls:
    """The exact call (`forward`), the full call that also returns the deep feature (`keep`), and
    the shallow call on a kept one (`deep`)."""

    unet: UNetModel

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 deep: Tensor | None = None, keep: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if deep is not None:
            return self.unet.forward_shallow(x, timesteps, context, y, deep)
        if keep:
            return self.unet.forward_deep(x, timesteps, context, y)
        return self.unet(x, timesteps, context, y)


class StepCache:
    """One run's cached steps: the first call, and every `interval`-th call after a full one, is
    full and keeps the deep feature; the others run shallow on it. Calls are counted, not steps
    (second-order samplers call the model more than once per step). A call for other rows than
    the kept feature's (`rows` is not the kept one: a cancelled request left the batch), or of
    another shape, is full.
    Mutable, one per run: never share it between runs or threads."""

    def __init__(self, interval: int) -> None:
        if interval not in INTERVALS:
            raise ValueError(f"step cache interval must be {INTERVALS.start} to {INTERVALS.stop - 1}, got {interval}")
        self.interval = interval
        self._rows: object = None
        self._shape: torch.Size | None = None
        self._deep: Tensor | None = None
        self._shallow_calls = 0  # since the last full call

    def __call__(self, unet: SteppedUNet, rows: object, x: Tensor, timesteps: Tensor, context: Tensor,
                 y: Tensor | None = None) -> Tensor:
        """The UNet's output for x; `rows` names the set of batch rows x holds (compared by
        identity)."""
        same = rows is self._rows and x.shape == self._shape
        if self._deep is not None and same and self._shallow_calls < self.interval - 1:
            self._shallow_calls += 1
            return unet(x, timesteps, context, y, deep=self._deep)
        out, self._deep = unet(x, timesteps, context, y, keep=True)
        self._rows, self._shape, self._shallow_calls = rows, x.shape, 0
        return out
