"""Inpaint: the 9-channel path against a transcription of the original inpainting script's
sampling; the unchanged-pixels guarantee, exactly, in every mode; transparency as a mask; batching;
bad masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from bot.cli import main
from generation.images import ImageInputError
from generation.inpaint import NO_MASK, inpaint, repaint_latents
from generation.pipeline import LoadedModel, encode_conditioning, run_batch
from generation.request import GenerationRequest
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.test_img2img import Store, assert_same, picture, start_noise, tiny_model


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints: TinyCheckpoints) -> LoadedModel:
    return tiny_model(tiny_checkpoints, "sd1")


@pytest.fixture(scope="module")
def sd1_inpaint(tiny_checkpoints: TinyCheckpoints) -> LoadedModel:
    return tiny_model(tiny_checkpoints, "sd1-inpaint")


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (64, 64), value: int = 255) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


def make_request(**changes) -> GenerationRequest:
    values = dict(kind="inpaint", prompt="a cat", negative_prompt="", model="tiny", sampler="euler", steps=3,
                  guidance=4.0, seed=7, width=64, height=64, init_image="0" * 64, mask_image="1" * 64, mask_blur=3)
    return GenerationRequest(**values | changes)


@torch.no_grad()
def original_inpainting(model: LoadedModel, req: GenerationRequest, image: Image.Image, mask: Image.Image):
    """The original inpainting script, transcribed: image / 127.5 - 1; mask / 255 binarized at 0.5;
    masked_image = image * (mask < 0.5); c_concat = [nearest-resized mask, scale_factor * posterior
    mean of masked_image]; DDIMSampler.sample (eta 0) from the seed's noise, UNet on cat([x, c_concat])."""
    network = model.network
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    m = np.array(mask.convert("L")).astype(np.float32) / 255.0
    m[m < 0.5], m[m >= 0.5] = 0, 1
    m = torch.from_numpy(m)[None, None]
    masked_image = pixels * (m < 0.5)
    latent_size = (image.height // network.vae_scale, image.width // network.vae_scale)
    c_concat = torch.cat([F.interpolate(m, size=latent_size),
                          network.family.scale_factor * network.vae.encode(masked_image).mean], dim=1)
    ac = model.schedule.alphas_cumprod
    ddim_ts = torch.arange(0, 1000, 1000 // req.steps) + 1
    alphas, alphas_prev = ac[ddim_ts], torch.cat([ac[:1], ac[ddim_ts[:-1]]])
    cond, uncond = encode_conditioning(network, [req], torch.device("cpu"))
    x = start_noise(req.seeds(), (4, *latent_size))
    for i, step in enumerate(ddim_ts.flip(0).tolist()):
        index = len(ddim_ts) - i - 1
        x_in = torch.cat([torch.cat([x, x]), torch.cat([c_concat, c_concat])], dim=1)
        e_uncond, e_cond = network.unet(x_in, torch.full((2,), step), torch.cat([uncond, cond])).chunk(2)
        e = e_uncond + req.guidance * (e_cond - e_uncond)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def test_nine_channel_inpainting_equals_the_original(sd1_inpaint: LoadedModel) -> None:
    image = picture(11)
    mask = box_mask((10, 20, 40, 50), value=200)  # grey above 0.5: binarized to white
    req = make_request(sampler="ddim", steps=4)
    expected = original_inpainting(sd1_inpaint, req, image, mask)
    ours = repaint_latents(sd1_inpaint, [req], [image], [box_mask((10, 20, 40, 50))])
    assert_same(ours, expected)


def assert_unchanged_outside(result: Image.Image, source: Image.Image, mask: Image.Image, blur: int) -> None:
    """Every pixel where the blurred mask is 0 is the source's, exactly; the zero region covers all
    but a margin of 3 blur radii around the mask (so the check is not vacuous); inside, it changed."""
    feather = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask)
    out, src = np.asarray(result.convert("RGB")), np.asarray(source.convert("RGB"))
    keep = feather == 0
    assert np.array_equal(out[keep], src[keep])
    left, top, right, bottom = mask.getbbox()
    far = np.ones_like(keep)
    far[max(0, top - 3 * blur) : bottom + 3 * blur, max(0, left - 3 * blur) : right + 3 * blur] = False
    assert keep[far].all()
    inside = np.asarray(mask) == 255
    assert np.abs(out[inside].astype(int) - src[inside].astype(int)).mean() > 2


@pytest.mark.parametrize(("family", "only_masked"), [("sd1", False), ("sd1", True), ("sd1-inpaint", False)])
def test_pixels_outside_the_blurred_mask_are_unchanged(
    request: pytest.FixtureRequest, family: str, only_masked: bool
) -> None:
    model = request.getfixturevalue(family.replace("-", "_"))
    store = Store()
    source, mask = picture(12), box_mask((30, 8, 52, 26))
    req = make_request(init_image=store.add(source), mask_image=store.add(mask), inpaint_only_masked=only_masked,
                  inpaint_padding=6, count=2)
    results = run_batch(model, [req], store.__getitem__)[0]
    assert len(results) == 2
    for result in results:
        assert result.size == (64, 64)
        assert_unchanged_outside(result, source, mask, req.mask_blur)



def test_transparent_pixels_are_the_mask(sd1: LoadedModel) -> None:
    store = Store()
    rgba = picture(13).convert("RGBA")
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (0, 40, 24, 64))
    rgba.putalpha(alpha)
    req = make_request(init_image=store.add(rgba), mask_image=None, mask_blur=0)
    (result,) = inpaint(sd1, [req], store.__getitem__)[0]
    assert_unchanged_outside(result, rgba, box_mask((0, 40, 24, 64)), 0)


def test_several_inpaint_requests_run_in_one_unet_batch(sd1_inpaint: LoadedModel) -> None:
    store = Store()
    first = make_request(init_image=store.add(picture(14)), mask_image=store.add(box_mask((0, 0, 20, 20))))
    second = make_request(init_image=store.add(picture(15)), mask_image=store.add(box_mask((30, 30, 64, 64))), seed=2)
    calls = []
    hook = sd1_inpaint.network.unet.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    try:
        results = inpaint(sd1_inpaint, [first, second], store.__getitem__)
    finally:
        hook.remove()
    assert calls == [(4, 9, 32, 32)] * 3  # 3 steps, 2 images x (uncond + cond), 9 input channels
    assert [len(images) for images in results] == [1, 1]


def test_masks_that_leave_nothing_to_do_are_refused(sd1: LoadedModel) -> None:
    store = Store()
    source = store.add(picture(16))
    with pytest.raises(ImageInputError, match="the mask is all black, so there is nothing to repaint"):
        inpaint(sd1, [make_request(init_image=source, mask_image=store.add(box_mask((0, 0, 1, 1), value=60)))],
                store.__getitem__)
    with pytest.raises(ImageInputError) as error:
        inpaint(sd1, [make_request(init_image=source, mask_image=None)], store.__getitem__)
    assert str(error.value) == NO_MASK


def test_generate_command_inpaint_end_to_end(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _ = tiny_checkpoints.get("sd1-inpaint")
    source = picture(17)
    source.save(tmp_path / "in.png")
    box_mask((8, 8, 24, 24), size=(32, 32)).save(tmp_path / "mask.png")  # half size: resized, said so
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a cat", "--steps", "2", "--seed", "1",
            "--device", "cpu", "--config", "/dev/null", "--init-image", str(tmp_path / "in.png"),
            "--mask", str(tmp_path / "mask.png"), "--mask-blur", "2", "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    assert "note: the mask is 32x32 but the image is 64x64: the mask was resized to fit" in capsys.readouterr().err
    assert_unchanged_outside(Image.open(tmp_path / "out.png"), source, box_mask((16, 16, 48, 48)), 2)
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    args[args.index(str(tmp_path / "mask.png"))] = str(tmp_path / "black.png")
    assert main(args) == 2
    assert "the mask is all black, so there is nothing to repaint" in capsys.readouterr().err
