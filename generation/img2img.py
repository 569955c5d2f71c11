"""img2img (and the V buttons' variations, which are img2img with new seeds): each request's input
image, resized to the request's size, encoded, noised to the strength's point of the schedule and
sampled from there (the contract is in `generation.pipeline.start`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from generation.images import ImageInputError, load_image, resize, split_alpha
from generation.pipeline import (
    Inputs, IsCancelled, LoadedModel, Progress, decode, denoise, encode, group, latent_size, to_pixels
)
from generation.request import GenerationRequest

#: Largest input image decoded at run time; the bot applies the configured, smaller limits at
#: submit time, so this only guards the worker against files that bypassed that check.
RUN_TIME_MAX_PIXELS = 8192 * 8192


def input_images(
    requests: Sequence[GenerationRequest], inputs: Inputs, size: tuple[int, int] | None = None
) -> list[Image.Image]:
    """Each request's init image as RGB, resized to `size` (default: the request's width x height)."""
    images = []
    for request in requests:
        if request.init_image is None:
            raise ImageInputError(f"a {request.kind} request needs an input image")
        rgb, _ = split_alpha(load_image(inputs(request.init_image), RUN_TIME_MAX_PIXELS))
        images.append(resize(rgb, *(size or (request.width, request.height))))
    return images


def strength_of(requests: Sequence[GenerationRequest]) -> float:
    """The batch's img2img strength; refused with a clear message when missing."""
    strength = requests[0].strength
    if strength is None:
        raise ImageInputError(f"a {requests[0].kind} request needs a strength in (0, 1]")
    return strength


def init_latents(model: LoadedModel, requests: Sequence[GenerationRequest], inputs: Inputs) -> torch.Tensor:
    """The clean latents (B, C, h, w) img2img starts from: each request's input image encoded,
    repeated for its images."""
    return repeat_counts(requests, encode(model.network, to_pixels(input_images(requests, inputs), model.device)))


def repeat_counts(requests: Sequence[GenerationRequest], x: torch.Tensor) -> torch.Tensor:
    """One row per request (R, ...) -> one row per image (B, ...), request i repeated count_i times
    (the output size given, so the GPU is not asked for it)."""
    counts = torch.tensor([r.count for r in requests], device=x.device)
    return x.repeat_interleave(counts, dim=0, output_size=sum(r.count for r in requests))


@torch.inference_mode()
def img2img(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """The images of each img2img or variation request, all in one UNet batch."""
    strength = strength_of(requests)
    size = latent_size(model, requests[0])
    latents = denoise(
        model,
        requests,
        size,
        init=init_latents(model, requests, inputs),
        strength=strength,
        progress=progress,
        cancelled=cancelled,
    )
    return group(requests, decode(model, latents))
