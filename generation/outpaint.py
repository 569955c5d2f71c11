"""Outpaint: the "zoom out" (all four sides) and "pan" (one side) gestures. The image is placed on
a larger canvas whose new margins are an edge-aware fill (edge pixels replicated outwards, then
blurred, so the sampler starts from the image's own colours), and the margins are inpainted.

A request's width x height is the size of the result: `outpaint_size` computes it at submit time
within the limits, and the input image is resized to the canvas minus the margins."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from generation.images import ImageInputError
from generation.img2img import input_images
from generation.inpaint import inpaint_images
from generation.pipeline import Inputs, IsCancelled, LoadedModel, Progress
from generation.request import GenerationRequest


def margins(directions: Sequence[str], pixels: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels added."""
    return tuple(pixels if side in directions else 0 for side in ("left", "up", "right", "down"))


def outpaint_size(
    width: int, height: int, directions: Sequence[str], pixels: int, max_pixels: int, max_side: int
) -> tuple[int, int, list[str]]:
    """The canvas (result) size for a width x height image extended by `pixels` on each of
    `directions`, multiples of 8 within max_pixels and max_side: over the limit the image is
    shrunk to make room (a note says so); refused when too little of it would remain."""
    left, top, right, bottom = margins(directions, pixels)
    canvas_w, canvas_h = width + left + right, height + top + bottom
    scale = min(1.0, (max_pixels / (canvas_w * canvas_h)) ** 0.5, max_side / max(canvas_w, canvas_h))
    if scale == 1.0:
        return canvas_w // 8 * 8, canvas_h // 8 * 8, []
    fit_w, fit_h = int(canvas_w * scale) // 8 * 8, int(canvas_h * scale) // 8 * 8
    if fit_w - left - right < 64 or fit_h - top - bottom < 64:
        raise ImageInputError(
            f"extending by {pixels} pixels would leave less than 64 pixels of the image within the limit "
            f"({max_pixels} pixels, {max_side} a side); extend by fewer pixels"
        )
    note = (f"the result would be {canvas_w}x{canvas_h}, over the limit ({max_pixels} pixels, {max_side} a side): "
            f"the image was shrunk so that the result is {fit_w}x{fit_h}")
    return fit_w, fit_h, [note]


def extend(image: Image.Image, directions: Sequence[str], pixels: int) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image with edge-replicated, blurred margins, and white over the margins."""
    left, top, right, bottom = margins(directions, pixels)
    padded = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(max(1, pixels // 4)))
    canvas.paste(image, (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


@torch.inference_mode()
def outpaint(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """The width x height results of each outpaint request, all in one UNet batch."""
    canvases, masks = [], []
    for request in requests:
        left, top, right, bottom = margins(request.outpaint_directions, request.outpaint_pixels)
        inner = (request.width - left - right, request.height - top - bottom)
        if min(inner) < 8:
            raise ImageInputError(
                f"a {request.width}x{request.height} result has no room for the image after adding "
                f"{request.outpaint_pixels} pixels on {', '.join(request.outpaint_directions)}"
            )
        (image,) = input_images([request], inputs, size=inner)
        canvas, mask = extend(image, request.outpaint_directions, request.outpaint_pixels)
        canvases.append(canvas)
        masks.append(mask)
    return inpaint_images(model, requests, canvases, masks, progress, cancelled)
