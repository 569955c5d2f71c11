"""generation/images.py: untrusted bytes are refused with a message, never a traceback; sizes,
masks and transparency are handled as documented."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from generation.images import (
    ImageInputError,
    blur_mask,
    composite,
    fit_size,
    load_image,
    mask_box,
    prepare_mask,
    split_alpha,
)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is a few bytes (a bomb's
    shape: decoding it would be the first moment anything noticed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode(fmt: str) -> None:
    image = load_image(encoded(Image.new("RGB", (40, 30), (200, 10, 10)), fmt), max_pixels=10_000)
    assert image.size == (40, 30) and image.convert("RGB").getpixel((5, 5))[0] > 150


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text", encoded(Image.new("RGB", (8, 8)), "GIF"), encoded(Image.new("RGB", (8, 8)), "BMP")],
    ids=["empty", "text", "gif", "bmp"],
)
def test_other_bytes_are_not_images(data: bytes) -> None:
    with pytest.raises(ImageInputError, match="is not a PNG, JPEG or WebP image"):
        load_image(data, max_pixels=10_000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_damaged(fmt: str) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encoded(noisy, fmt)
    with pytest.raises(ImageInputError, match=r"(damaged|not a PNG, JPEG or WebP)"):
        load_image(data[: len(data) // 2], max_pixels=10_000)


def test_pixel_cap_is_checked_from_the_header_before_decoding() -> None:
    # 9000 x 9000 would be 243 MB decoded; the file is tiny and its data is wrong, so only a
    # check before decoding gives the size message rather than the "damaged" one.
    with pytest.raises(ImageInputError, match=r"9000x9000 = 81000000 pixels; the most allowed is 1000000"):
        load_image(png_header_only(9000, 9000), max_pixels=1_000_000)
    # Past Pillow's own hard bomb limit the header is refused while it is read.
    with pytest.raises(ImageInputError, match="far too large to open; the most allowed is 1000000 pixels"):
        load_image(png_header_only(40000, 40000), max_pixels=1_000_000)
    with pytest.raises(ImageInputError, match="the mask is 200x100 = 20000 pixels"):
        load_image(encoded(Image.new("L", (200, 100)), "PNG"), max_pixels=10_000, what="mask")


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed portrait
    data = encoded(Image.new("RGB", (60, 20)), "JPEG", exif=exif.tobytes())
    assert load_image(data, max_pixels=10_000).size == (20, 60)


def test_sizes_are_rounded_and_shrunk_with_a_note() -> None:
    assert fit_size(500, 300, max_pixels=1 << 20, max_side=2048) == (512, 320, [])
    # Within the limit as it is, but the nearest multiples (1024x1024) are not: rounded down instead.
    assert fit_size(1000, 1040, max_pixels=1_040_000, max_side=2048) == (960, 1024, [])
    width, height, notes = fit_size(4000, 3000, max_pixels=1 << 20, max_side=2048)
    assert width * height <= 1 << 20 and width % 64 == height % 64 == 0
    assert abs(width / height - 4 / 3) < 0.1
    assert notes == [f"the image is 4000x3000, over the limit (1048576 pixels, 2048 a side): "
                     f"it was scaled down to {width}x{height}"]


def test_masks_are_binarized_resized_and_refused_when_black() -> None:
    grey = Image.new("L", (32, 32), 0)
    grey.paste(127, (0, 0, 16, 32))
    grey.paste(128, (16, 0, 32, 32))
    mask, notes = prepare_mask(grey, (32, 32))
    assert notes == [] and set(np.unique(np.asarray(mask))) == {0, 255}
    assert np.asarray(mask)[:, :16].max() == 0 and np.asarray(mask)[:, 16:].min() == 255
    resized, notes = prepare_mask(grey.convert("RGB"), (64, 64))
    assert resized.size == (64, 64)
    assert notes == ["the mask is 32x32 but the image is 64x64: the mask was resized to fit"]
    with pytest.raises(ImageInputError, match="^the mask is all black, so there is nothing to repaint; "
                                              "paint the area to change in white$"):
        prepare_mask(Image.new("L", (32, 32), 100), (32, 32))


def test_transparent_pixels_become_the_mask() -> None:
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 5, 20))
    rgb, mask = split_alpha(rgba)
    assert rgb.mode == "RGB" and mask.getbbox() == (0, 0, 5, 20)
    assert split_alpha(Image.new("RGBA", (4, 4), (1, 2, 3, 255)))[1] is None
    assert split_alpha(Image.new("RGB", (4, 4)))[1] is None


def test_composite_keeps_every_pixel_outside_the_blurred_mask() -> None:
    original = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    generated = Image.new("RGB", (40, 40), (255, 0, 0))
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (15, 15, 25, 25))
    feather = blur_mask(mask, 2)
    result = np.asarray(composite(generated, original, feather))
    outside = np.asarray(feather) == 0
    assert outside.sum() > 1000 and np.array_equal(result[outside], np.asarray(original)[outside])
    assert (result[np.asarray(feather) == 255] == (255, 0, 0)).all()


def test_mask_box_pads_to_the_aspect_and_stays_inside() -> None:
    mask = Image.new("L", (100, 60), 0)
    mask.paste(255, (40, 20, 50, 30))
    assert mask_box(mask, 5, 1.0) == (35, 15, 55, 35)
    left, top, right, bottom = mask_box(mask, 5, 2.0)
    assert (right - left) == 2 * (bottom - top) and left <= 35 and right >= 55
    assert mask_box(mask, 50, 100 / 60) == (0, 0, 100, 60)
