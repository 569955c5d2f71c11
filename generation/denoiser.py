"""The UNet as a sampler's `Denoiser`: VE input scaling, sigma -> timestep, classifier-free guidance
in one batched UNet call, and the model's epsilon or v output turned into an x0 prediction; rows
whose job was cancelled leave the UNet batch at the next call; cached steps (opt-in,
`generation.step_cache`) run most calls through the UNet's shallow blocks only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from generation.schedules import DiscreteSchedule
from generation.step_cache import StepCache
from generation.transfer import upload

Prediction = Literal["epsilon", "v"]


class UNet(Protocol):
    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **extra: Tensor) -> Tensor:
        """(N, C_in, h, w) VP-scaled latents, (N,) float timesteps, (N, T, D) text -> (N, 4, h, w)."""
        ...


@dataclass(frozen=True, eq=False)
class _Batch:
    """The per-image UNet inputs of a set of rows, gathered (and the halves concatenated) once."""

    keep: Tensor | None  # (N,) the rows' index in the full batch; None: every row
    context: Tensor  # (copies * N, T, D)
    vector: Tensor | None  # (copies * N, adm) or (copies * N,)
    scale: Tensor  # (N, 1, 1, 1)
    concat: Tensor | None  # (N, c, h, w): the whole latent's concat channels of these rows


@dataclass(frozen=True, eq=False)
class GuidedDenoiser:
    """out = uncond + g * (cond - uncond) on the model output, per image, in one UNet call of 2B.

    When every g is 1 only the conditional half runs, when every g is 0 only the unconditional one:
    the formula then equals that half exactly, at half the cost. cond and uncond must have the
    same token length: encode them together with `generation.prompts.encode_prompts`, which pads
    every prompt to a common number of 77-token chunks with the empty prompt's chunk.

    Steps never wait on the device: which halves to run, the guidance scales and the schedule are
    settled on the device once, here. On CUDA a value read back or copied from pageable host memory
    stalls the kernel queue until the GPU catches up, and at every step that costs real time.

    `live()`, asked before every UNet call, names the rows still wanted (None: all). The others
    leave the UNet batch, so a job cancelled inside a shared batch stops costing GPU time at once:
    their prediction is their own latent, which the samplers then barely move (their result is
    discarded), and the live rows are computed as before, each image's math being its own.

    `step_cache`: this run's cached steps (`unet` then takes `UNetCalls`' arguments), for calls
    on the whole latent only: the tiles of a tiled run share no deep feature, so `tile` never
    uses it. Rows leaving the batch make the next call full."""

    unet: UNet
    schedule: DiscreteSchedule
    cond: Tensor  # (B, T, D)
    uncond: Tensor  # (B, T, D)
    guidance: Tensor  # (B,), best on the CPU: it is read once, here
    prediction: Prediction = "epsilon"
    #: Extra input channels concatenated after the scaled latent, unscaled (inpainting: mask and
    #: masked-image latent, (B, 5, h, w)), the same for both halves.
    concat: Tensor | None = None
    live: Callable[[], Sequence[int] | None] | None = None
    #: The UNet's class input `y` of the conditional and unconditional halves, per image: SDXL's
    #: ADM vectors (B, adm) (pooled text and size features), or the x4 upscaler's noise levels (B,).
    vector: Tensor | None = None
    vector_uncond: Tensor | None = None
    step_cache: StepCache | None = None

    def __post_init__(self) -> None:
        if self.cond.shape != self.uncond.shape:
            raise ValueError(
                f"cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} differ; "
                "encode prompts and negative prompts together so they share a chunk count"
            )
        if self.guidance.shape != self.cond.shape[:1]:
            raise ValueError(
                f"need one guidance value per image ({self.cond.shape[0]}), got {tuple(self.guidance.shape)}"
            )
        if (self.vector is None) != (self.vector_uncond is None):
            raise ValueError("give both ADM vectors (vector, vector_uncond) or neither")
        if self.prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {self.prediction!r}")
        scales = self.guidance.tolist()
        halves = "cond" if all(g == 1 for g in scales) else "uncond" if all(g == 0 for g in scales) else "both"
        object.__setattr__(self, "_halves", halves)
        object.__setattr__(self, "_scale", upload(self.guidance, self.cond.device, torch.float32).view(-1, 1, 1, 1))
        object.__setattr__(self, "_schedule", self.schedule.to(self.cond.device))
        object.__setattr__(self, "_all", self._batch(None))
        object.__setattr__(self, "_live_batch", None)  # (the live rows, their _Batch), once a row is dropped

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x (B, C, h, w) at noise levels sigma (B,) -> guided x0 prediction (B, C, h, w)."""
        return self._predict(x, sigma, self.concat, self.step_cache)

    def tile(self, x: Tensor, sigma: Tensor, concat: Tensor | None) -> Tensor:
        """The prediction for a tile x of the latent, with `concat` cut to the same tile."""
        return self._predict(x, sigma, concat, None)

    def _predict(self, x: Tensor, sigma: Tensor, concat: Tensor | None, cache: StepCache | None) -> Tensor:
        rows = None if self.live is None else self.live()
        if rows is None or len(rows) == x.shape[0]:
            return self._guided(x, sigma, concat, self._all, cache)
        out = x.clone()  # the dropped rows' "prediction": themselves
        if rows:
            batch = self._rows(tuple(rows))
            keep = batch.keep
            if concat is self.concat:
                concat = batch.concat
            elif concat is not None:  # a tile's cut, gathered here
                concat = concat[keep]
            out[keep] = self._guided(x[keep], sigma[keep], concat, batch, cache)
        return out

    def _rows(self, rows: tuple[int, ...]) -> _Batch:
        """The _Batch of the live rows, gathered again only when they change (a further cancel)."""
        cached = self._live_batch
        if cached is None or cached[0] != rows:
            cached = rows, self._batch(upload(list(rows), self.cond.device))
            object.__setattr__(self, "_live_batch", cached)
        return cached[1]

    def _batch(self, keep: Tensor | None) -> _Batch:
        """The UNet inputs of rows `keep` (None: all) for the halves that run, uncond first."""
        pick = lambda t: t if t is None or keep is None else t[keep]  # noqa: E731
        cond, uncond = pick(self.cond), pick(self.uncond)
        vector, vector_uncond = pick(self.vector), pick(self.vector_uncond)
        if self._halves == "cond":
            context, y = cond, vector
        elif self._halves == "uncond":
            context, y = uncond, vector_uncond
        else:
            context, y = torch.cat([uncond, cond]), None if vector is None else torch.cat([vector_uncond, vector])
        return _Batch(keep, context, y, pick(self._scale), pick(self.concat))

    def _guided(
        self, x: Tensor, sigma: Tensor, concat: Tensor | None, batch: _Batch, cache: StepCache | None
    ) -> Tensor:
        """The guided x0 prediction of rows x (N, C, h, w) with the inputs of their `batch` and
        `concat` cut to the same rows and tile; through `cache` when given (keyed by `batch`:
        one per set of rows)."""
        out = self._run(x, sigma, batch, concat, cache)
        if self._halves == "both":
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + batch.scale * (out_cond - out_uncond)
        return self._x0(x, sigma.view(-1, 1, 1, 1), out)

    def _run(self, x: Tensor, sigma: Tensor, batch: _Batch, concat: Tensor | None, cache: StepCache | None) -> Tensor:
        """One UNet call on as many copies of (x, sigma) as the batch's context has rows."""
        context = batch.context
        copies = context.shape[0] // x.shape[0]
        c_in = (sigma**2 + 1) ** -0.5  # (B,)
        x_in = (x * c_in.view(-1, 1, 1, 1)).repeat(copies, 1, 1, 1)  # (copies * B, C, h, w)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in).repeat(copies, 1, 1, 1)], dim=1)
        t = self._schedule.sigma_to_t(sigma).repeat(copies)  # (copies * B,)
        if cache is not None:
            return cache(self.unet, batch, x_in, t, context, batch.vector).to(x.dtype)
        extra = {} if batch.vector is None else {"y": batch.vector}
        return self.unet(x_in, t, context, **extra).to(x.dtype)

    def _x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        if self.prediction == "epsilon":
            return x - sigma * out
        # v = alpha * eps - sigma_vp * x0 (Salimans & Ho); k-diffusion's VDenoiser, sigma_data 1
        c_skip, c_out = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        return c_skip * x + c_out * out


def latent_preview(x0: Tensor, factors: Sequence[Sequence[float]]) -> Tensor:
    """A cheap RGB preview of one latent (C, h, w) -> uint8 (h, w, 3) on the CPU; no VAE, only
    `factors`, the family's linear latent -> RGB approximation (`Family.latent_rgb`, one row
    per latent channel)."""
    if x0.dim() != 3 or x0.shape[0] != len(factors):
        raise ValueError(f"need one latent of shape ({len(factors)}, h, w), got {tuple(x0.shape)}")
    weights = torch.tensor(factors, dtype=torch.float32, device=x0.device)  # (C, 3)
    rgb = torch.einsum("chw,cr->hwr", x0.float(), weights)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
