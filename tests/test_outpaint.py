"""Outpaint: result sizes within the limits, the edge-aware canvas and its mask, and a run whose
untouched part is the input's, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bot.cli import main
from generation.images import ImageInputError
from generation.outpaint import extend, outpaint_size
from generation.pipeline import run_batch
from generation.request import GenerationRequest
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.test_img2img import Store, picture, tiny_model


def test_result_sizes_and_limits() -> None:
    assert outpaint_size(512, 512, ("left", "right", "up", "down"), 128, 1 << 20, 2048) == (768, 768, [])
    assert outpaint_size(512, 384, ("right",), 256, 1 << 20, 2048) == (768, 384, [])
    width, height, notes = outpaint_size(1024, 1024, ("left", "right"), 256, 1 << 20, 2048)
    assert width * height <= 1 << 20 and width % 8 == height % 8 == 0 and width > height
    assert notes == [f"the result would be 1536x1024, over the limit (1048576 pixels, 2048 a side): "
                     f"the image was shrunk so that the result is {width}x{height}"]
    assert outpaint_size(1024, 512, ("up",), 512, 1 << 22, 1024)[:2] == (1024, 1024)
    with pytest.raises(ImageInputError, match="would leave less than 64 pixels of the image"):
        outpaint_size(512, 512, ("left", "right"), 1024, 1 << 20, 2048)


def test_canvas_is_the_image_with_filled_margins_and_a_mask_over_them() -> None:
    image = picture(41, (40, 24))
    canvas, mask = extend(image, ("left", "down"), 16)
    assert canvas.size == mask.size == (56, 40)
    assert np.array_equal(np.asarray(canvas)[:24, 16:], np.asarray(image))
    m = np.asarray(mask)
    assert (m[:24, 16:] == 0).all() and (m[:, :16] == 255).all() and (m[24:, :] == 255).all()
    # Edge-aware: the margin next to the image continues its edge colours (blurred), not black.
    edge = np.asarray(image)[:, 0].astype(int)
    assert np.abs(np.asarray(canvas)[:24, 15].astype(int) - edge).mean() < 40
    assert np.asarray(canvas)[24:, :].mean() > 20


def test_outpaint_keeps_the_image_outside_the_seam(tiny_checkpoints: TinyCheckpoints) -> None:
    model = tiny_model(tiny_checkpoints, "sd1")
    store = Store()
    source = picture(42)
    req = GenerationRequest(kind="outpaint", prompt="a landscape", model="tiny", sampler="euler", steps=2,
                            guidance=3.0, seed=4, width=96, height=64, init_image=store.add(source),
                            outpaint_directions=("right",), outpaint_pixels=32, mask_blur=2)
    (result,) = run_batch(model, [req], store.__getitem__)[0]
    assert result.size == (96, 64)
    mask = Image.new("L", (96, 64), 255)
    mask.paste(0, (0, 0, 64, 64))
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0
    assert keep[:, :58].all()  # all but the seam's last blur radii
    canvas = np.zeros((64, 96, 3), dtype=np.uint8)
    canvas[:, :64] = np.asarray(source)
    assert np.array_equal(np.asarray(result)[keep], canvas[keep])


def test_generate_command_outpaint_and_upscale(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    picture(43, (64, 64)).save(tmp_path / "in.png")
    common = ["--prompt", "a landscape", "--steps", "1", "--device", "cpu", "--config", "/dev/null",
              "--init-image", str(tmp_path / "in.png")]
    sd1, _ = tiny_checkpoints.get("sd1")
    assert main(["generate", "--checkpoint", str(sd1), *common, "--outpaint", "left,up", "--by", "16",
                 "--out", str(tmp_path / "wide.png")]) == 0
    assert Image.open(tmp_path / "wide.png").size == (80, 80)
    x4, _ = tiny_checkpoints.get("x4-upscaler")
    assert main(["generate", "--checkpoint", str(x4), *common, "--upscale", "--out", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size == (128, 128)  # the tiny upscaler's VAE scales by 2
