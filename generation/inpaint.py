"""Inpaint: repaint the white part of a mask (or the transparent part of the image).

Three ways, one guarantee. A 9-channel inpainting checkpoint runs exactly as the original
inpainting script: mask binarized at 0.5, masked_image = image * (mask < 0.5), UNet input
cat([x, mask resized (nearest) to the latent, scale_factor * posterior mean of masked_image]).
An ordinary checkpoint blends latents: at every model call the known region is the input's latent
re-noised to the current level, and its x0 prediction is the input's latent. Either can work on
the whole image or, with `inpaint_only_masked`, on a crop around the mask at full resolution that
is pasted back. Whatever the way, the result is composited in pixels with the blurred mask, so
every pixel where the blurred mask is 0 is the input's, bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from generation.images import (
    ImageInputError,
    blur_mask,
    composite,
    load_image,
    mask_box,
    prepare_mask,
    resize,
    split_alpha,
)
from generation.img2img import RUN_TIME_MAX_PIXELS, repeat_counts
from generation.pipeline import (
    Inputs, IsCancelled, LoadedModel, Progress, decode, denoise, encode, group, latent_size, to_pixels
)
from generation.request import GenerationRequest
from generation.samplers import Denoiser

NO_MASK = ("inpaint needs a mask (white = repaint, black = keep) or an image with transparent "
           "pixels (transparent = repaint)")


@dataclass(frozen=True, eq=False)
class KnownRegion:
    """Latent blending around any denoiser: where keep is 1 the sampler sees the input's latent
    noised to the current sigma with the run's own start noise, and is told its x0 is that latent."""

    inner: Denoiser
    known: Tensor  # (B, C, h, w) clean latents of the input
    noise: Tensor  # (B, C, h, w)
    keep: Tensor  # (B, 1, h, w) in [0, 1]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        noised = self.known + sigma.view(-1, 1, 1, 1) * self.noise
        x = self.keep * noised + (1 - self.keep) * x
        return self.keep * self.known + (1 - self.keep) * self.inner(x, sigma)


def request_inputs(request: GenerationRequest, inputs: Inputs) -> tuple[Image.Image, Image.Image]:
    """(RGB image, binary mask) of one inpaint request at its width x height."""
    if request.init_image is None:
        raise ImageInputError("inpaint needs an input image")
    rgb, alpha_mask = split_alpha(load_image(inputs(request.init_image), RUN_TIME_MAX_PIXELS))
    if request.mask_image is not None:
        mask = load_image(inputs(request.mask_image), RUN_TIME_MAX_PIXELS, what="mask")
    elif alpha_mask is not None:
        mask = alpha_mask
    else:
        raise ImageInputError(NO_MASK)
    size = (request.width, request.height)
    return resize(rgb, *size), prepare_mask(mask, size)[0]


@torch.inference_mode()
def inpaint(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """The images of each inpaint request, all in one UNet batch."""
    images, masks = zip(*(request_inputs(r, inputs) for r in requests), strict=True)
    return inpaint_images(model, requests, list(images), list(masks), progress, cancelled)


def inpaint_images(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    images: Sequence[Image.Image],
    masks: Sequence[Image.Image],
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """Repaint each request's binary mask (L, white = repaint) on its RGB image, both at the
    request's width x height; the results are those images with only the (blurred) mask changed."""
    size = (requests[0].width, requests[0].height)
    boxes = [
        mask_box(mask, r.inpaint_padding, size[0] / size[1]) if r.inpaint_only_masked else (0, 0, *size)
        for r, mask in zip(requests, masks, strict=True)
    ]
    work_images = [resize(image.crop(box), *size) for image, box in zip(images, boxes, strict=True)]
    work_masks = [prepare_mask(mask.crop(box), size)[0] for mask, box in zip(masks, boxes, strict=True)]
    latents = repaint_latents(model, requests, work_images, work_masks, progress, cancelled)
    generated = group(requests, decode(model, latents))
    results = []
    for request, image, mask, box, outputs in zip(requests, images, masks, boxes, generated, strict=True):
        feather = blur_mask(mask, request.mask_blur)
        pasted = []
        for output in outputs:
            full = image.copy()
            full.paste(resize(output, box[2] - box[0], box[3] - box[1]), box[:2])
            pasted.append(composite(full, image, feather))
        results.append(pasted)
    return results


def repaint_latents(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    images: Sequence[Image.Image],
    masks: Sequence[Image.Image],
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> Tensor:
    """The final latents (B, C, h, w) of every image of every request, before decoding and
    compositing; images RGB and masks binary L, one per request, at the request's size."""
    first, network = requests[0], model.network
    size = latent_size(model, first)
    pixels = to_pixels(images, model.device)  # (R, 3, H, W)
    binary = np.stack([np.asarray(mask, dtype=np.float32) / 255 for mask in masks])
    mask = torch.from_numpy(binary)[:, None].to(model.device)  # (R, 1, H, W) in {0, 1}
    strength = first.strength or 1.0
    init = repeat_counts(requests, encode(network, pixels))  # (B, C, h, w)
    if network.family.conditioning == "hybrid":
        masked = encode(network, pixels * (mask < 0.5))  # (R, C, h, w)
        concat = repeat_counts(requests, torch.cat([F.interpolate(mask, size=size), masked], dim=1))
        latents = denoise(model, requests, size, init=init if strength < 1 else None, strength=strength,
                          concat=concat, progress=progress, cancelled=cancelled)
    else:
        keep = 1 - repeat_counts(requests, F.interpolate(mask, size=size, mode="area"))  # (B, 1, h, w)
        latents = denoise(model, requests, size, init=init, strength=strength,
                          wrap=lambda guided, noise: KnownRegion(guided, init, noise, keep),
                          progress=progress, cancelled=cancelled)
        latents = keep * init + (1 - keep) * latents
    return latents
