"""Upscale: at least twice the input in each dimension, in bounded memory.

With an x4 upscaler checkpoint (family "x4-upscaler"), the original text-guided latent upscaler:
the low-resolution image in [-1, 1] is noise-augmented to `upscale_noise_level` on its own schedule
(sqrt(a) x + sqrt(1 - a) n), concatenated to the latent, the level is the UNet's class input, and
a latent of the image's own size is sampled from noise and decoded to vae_scale times that size.
Without one, "hires": Lanczos 2x, then img2img at a low strength with the source checkpoint. A
request's `upscale_factor` says which of the two it was made for.

Large sizes are tiled: the denoiser runs on overlapping latent tiles whose x0 predictions are
blended with linear ramps over the overlap (the prediction is per pixel, so a blend of them is a
prediction too), and the VAE encodes and decodes tile by tile the same way. A request's
width x height is the INPUT size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from generation.denoiser import GuidedDenoiser
from generation.images import ImageInputError, resize
from generation.img2img import input_images, repeat_counts
from generation.pipeline import Inputs, IsCancelled, LoadedModel, Progress, denoise, group, to_images, to_pixels
from generation.request import GenerationRequest
from generation.schedules import alphas_cumprod
from generation.tiling import OVERLAP, TILE, decode_tiled, encode_tiled, tiled
from models.families import Family

#: The x4 upscaler's noise augmentation draws from CPU generators seeded seed + i + this offset, a
#: stream apart from the start noise of seed + i (the engine contract).
AUGMENTATION_SEED_OFFSET = 2**32


@dataclass(frozen=True, eq=False)
class TiledDenoiser:
    """A guided denoiser run tile by tile (its concat channels cut to the same tile)."""

    guided: GuidedDenoiser
    tile: int
    overlap: int

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        def piece(rows: slice, cols: slice) -> Tensor:
            concat = self.guided.concat
            return self.guided.tile(x[..., rows, cols], sigma, None if concat is None else concat[..., rows, cols])

        return tiled(piece, x.shape[-2:], self.tile, self.overlap, 1.0)


@torch.inference_mode()
def upscale(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> list[list[Image.Image]]:
    """The upscaled images of each request: by the x4 upscaler for `upscale_factor` 4, by hires
    for 2; refused when `model` is not the kind of checkpoint the factor needs."""
    first, family = requests[0], model.network.family
    if first.upscale_factor != upscale_factor(family):
        needs = "an x4 upscaler checkpoint" if first.x4 else "an ordinary checkpoint (hires)"
        raise ImageInputError(f"a {first.upscale_factor}x upscale needs {needs}; {first.model} is a {family.name} "
                              "checkpoint")
    if first.x4:
        return x4_upscale(model, requests, inputs, progress, cancelled, tile, overlap)
    return hires(model, requests, inputs, progress, cancelled, tile, overlap)


def upscale_factor(family: Family) -> Literal[2, 4]:
    """The `upscale_factor` of requests a checkpoint of `family` runs: 4 for the x4 upscaler, else 2."""
    return 4 if family.conditioning == "hybrid-adm" else 2


def _wrap(tile: int, overlap: int) -> Callable[[GuidedDenoiser, Tensor], TiledDenoiser]:
    return lambda guided, _noise: TiledDenoiser(guided, tile, overlap)


def x4_upscale(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> list[list[Image.Image]]:
    """The original superresolution script's sampling, tiled; output vae_scale x the input."""
    latents = x4_latents(model, requests, input_images(requests, inputs), progress, cancelled, tile, overlap)
    return group(requests, to_images(decode_tiled(model.network, latents, tile, overlap)))


def x4_latents(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    images: Sequence[Image.Image],
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> Tensor:
    """The x4 upscaler's final latents (B, 4, h, w) for one RGB image per request at its size."""
    first, network = requests[0], model.network
    low = network.family.low_scale
    size = (first.height, first.width)  # the latent is the low-res image's size
    pixels = repeat_counts(requests, to_pixels(images, model.device))  # (B, 3, h, w)
    levels = torch.tensor([r.upscale_noise_level for r in requests for _ in range(r.count)], device=model.device)
    a = alphas_cumprod(low.linear_start, low.linear_end, 1000).to(model.device)[levels].view(-1, 1, 1, 1)
    seeds = [seed + AUGMENTATION_SEED_OFFSET for r in requests for seed in r.seeds()]
    noise = torch.cat([torch.randn((1, 3, *size), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    augmented = a.sqrt() * pixels + (1 - a).sqrt() * noise.to(model.device)  # (B, 3, h, w)
    return denoise(model, requests, size, concat=augmented, labels=levels, wrap=_wrap(tile, overlap),
                   progress=progress, cancelled=cancelled)


def hires(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> list[list[Image.Image]]:
    """Lanczos 2x, then img2img at the request's strength, tiled."""
    first, network = requests[0], model.network
    if network.family.conditioning != "crossattn":
        raise ImageInputError(
            f"upscaling needs an x4 upscaler or an ordinary checkpoint; {first.model} is a "
            f"{network.family.name} checkpoint"
        )
    f, size = network.vae_scale, (2 * first.width, 2 * first.height)
    if size[0] % f or size[1] % f:
        raise ImageInputError(f"width and height must be multiples of {f // 2} for this model")
    images = [resize(image, *size) for image in input_images(requests, inputs)]
    init = encode_tiled(network, to_pixels(images, model.device), tile, overlap)  # (R, C, h, w)
    assert first.strength is not None, "the request's validator requires it"
    latents = denoise(model, requests, (size[1] // f, size[0] // f), init=repeat_counts(requests, init),
                      strength=first.strength, wrap=_wrap(tile, overlap), progress=progress, cancelled=cancelled)
    return group(requests, to_images(decode_tiled(network, latents, tile, overlap)))
