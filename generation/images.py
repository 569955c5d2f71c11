"""Input images and masks from users: untrusted bytes in, validated RGB images and binary masks out.

Pillow only (no torch), so the bot can check an upload when it is submitted and tell the user what
is wrong before anything is queued. Every problem a user can cause raises `ImageInputError`,
whose message is written to be shown as is; fixes we apply silently would surprise, so each
adjustment (downscaling, mask resizing) comes back as a note the bot can show."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

#: What users may upload: the formats whose decoders everyone ships and fuzzes.
FORMATS = ("PNG", "JPEG", "WEBP")


class ImageInputError(ValueError):
    """An input image or mask is unusable; the message says why and what is allowed."""


def load_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode `data` (PNG, JPEG or WebP) with its EXIF orientation applied, refusing anything over
    `max_pixels` from the header's size BEFORE the pixels are decoded (decompression bombs)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise ImageInputError(f"the {what} is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"the {what} is far too large to open; the most allowed is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"the {what} is damaged and cannot be read ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(
            f"the {what} is {width}x{height} = {width * height} pixels; the most allowed is {max_pixels}"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"the {what} is damaged and cannot be read ({image.format}: {exc})") from None


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, mask) where the mask is white where the image is transparent (alpha < 128:
    transparent = repaint), or None when no pixel is transparent."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image.convert("RGB"), None
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] >= 128:
        return rgba.convert("RGB"), None
    return rgba.convert("RGB"), alpha.point(lambda a: 255 if a < 128 else 0)


def fit_size(
    width: int, height: int, max_pixels: int, max_side: int, multiple: int = 64
) -> tuple[int, int, list[str]]:
    """A working size for an image of width x height: the same aspect ratio, each side rounded to
    the nearest multiple of `multiple` (down where nearest would break a limit), within max_pixels
    and max_side (scaled down when over; a note says so)."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)), max_side / max(width, height))
    w, h = (max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))
    if w * h > max_pixels or max(w, h) > max_side:
        w, h = (max(multiple, int(side * scale) // multiple * multiple) for side in (width, height))
    notes = []
    if scale < 1.0:
        notes.append(f"the image is {width}x{height}, over the limit ({max_pixels} pixels, {max_side} a side): "
                     f"it was scaled down to {w}x{h}")
    return w, h, notes


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos resize (a no-op copy at the same size)."""
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), Image.Resampling.LANCZOS)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """The mask as mode "L", `size`, binarized at half intensity (white = repaint); a mask of
    another size is resized (a note says so); an all-black mask is refused."""
    notes = []
    gray = mask.convert("L")
    if gray.size != size:
        notes.append(f"the mask is {gray.size[0]}x{gray.size[1]} but the image is {size[0]}x{size[1]}: "
                     "the mask was resized to fit")
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    binary = gray.point(lambda v: 255 if v >= 128 else 0)
    if binary.getextrema()[1] == 0:
        raise ImageInputError("the mask is all black, so there is nothing to repaint; "
                              "paint the area to change in white")
    return binary, notes


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """The feathered mask the result is blended with; the blur spreads outwards as well, so the
    seam gets `radius` pixels of blend and every pixel where it is 0 stays the input's."""
    if radius == 0:
        return mask.copy()
    return mask.filter(ImageFilter.GaussianBlur(radius))


def composite(generated: Image.Image, original: Image.Image, blurred_mask: Image.Image) -> Image.Image:
    """generated where the mask is white, original where it is black, blended in between; where
    the mask is 0 the original's bytes are copied exactly."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), blurred_mask)


def mask_box(mask: Image.Image, padding: int, aspect: float) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) around the mask's white pixels, grown by `padding` and
    then to the aspect ratio width / height = `aspect` of the size it will be processed at,
    clamped to the image."""
    width, height = mask.size
    left, top, right, bottom = mask.getbbox()  # callers refuse all-black masks first
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(width, right + padding), min(height, bottom + padding)
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < aspect:
        box_w = min(width, math.ceil(box_h * aspect))
    else:
        box_h = min(height, math.ceil(box_w / aspect))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(0, round(cx - box_w / 2)), width - box_w))
    top = int(min(max(0, round(cy - box_h / 2)), height - box_h))
    return left, top, left + box_w, top + box_h
