"""Upscale: the tile blending is exact for pointwise work; the x4 upscaler against a transcription
of the original superresolution script's sampling; tiled x4 and hires runs give at least twice the
size, tile by tile, and run only with the checkpoint their factor needs; upscales cost the UNet work
they do, with the x4 UNet's FLOPs ratio re-measured."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from generation.images import ImageInputError
from generation.pipeline import LoadedModel, encode_conditioning, to_pixels
from generation.request import X4_UNET_FLOPS_RATIO, GenerationRequest
from generation.tiling import tile_starts, tiled
from generation.upscale import AUGMENTATION_SEED_OFFSET, upscale, x4_latents
from models.families import SD1, X4_UPSCALER, Family
from models.loading import read_state_dict
from models.unet import UNetModel
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.test_img2img import Store, assert_same, picture, start_noise, tiny_model


@pytest.fixture(scope="module")
def x4(tiny_checkpoints: TinyCheckpoints) -> LoadedModel:
    return tiny_model(tiny_checkpoints, "x4-upscaler")


def make_request(**changes) -> GenerationRequest:
    """An x4 upscale request unless `changes` say otherwise (hires: upscale_factor=2)."""
    values = dict(kind="upscale", prompt="a sharp photo", negative_prompt="", model="tiny", sampler="ddim",
                  steps=4, guidance=6.0, seed=21, width=64, height=64, init_image="0" * 64, upscale_noise_level=30,
                  upscale_factor=4)
    return GenerationRequest(**values | changes)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(64, 16, 4), (50, 16, 6), (10, 16, 4)])
def test_tile_starts_cover_with_overlap(size: int, tile: int, overlap: int) -> None:
    starts = tile_starts(size, tile, overlap)
    covered = set()
    for s in starts:
        covered |= set(range(s, min(size, s + tile)))
    assert covered == set(range(size)) and starts[0] == 0
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_blending_tiles_of_a_pointwise_function_is_exact(scale: float) -> None:
    x = torch.randn(2, 3, 40, 56)

    def pointwise(t: torch.Tensor) -> torch.Tensor:  # any per-pixel map, resized by `scale`
        out = torch.tanh(t) * 3 + 1
        return torch.nn.functional.interpolate(out, scale_factor=scale, mode="nearest") if scale != 1 else out

    calls = []

    def piece(rows: slice, cols: slice) -> torch.Tensor:
        calls.append((rows, cols))
        return pointwise(x[..., rows, cols])

    result = tiled(piece, (40, 56), 16, 4, scale)
    assert len(calls) == len(tile_starts(40, 16, 4)) * len(tile_starts(56, 16, 4)) == 15
    assert_same(result, pointwise(x), tolerance=1e-6)


@torch.no_grad()
def original_superresolution(model: LoadedModel, req: GenerationRequest, low_res: torch.Tensor,
                             low_alphas: torch.Tensor) -> torch.Tensor:
    """scripts/gradio/superresolution.py with DDIMSampler (eta 0), transcribed: the low-res image
    in [-1, 1] noised by ImageConcatWithNoiseAugmentation (q_sample at noise_level on its own
    schedule), c_concat = it, c_adm = the level, v-prediction DDIM from the seed's noise."""
    network = model.network
    level = torch.tensor([req.upscale_noise_level])
    generator = torch.Generator("cpu").manual_seed(req.seed + AUGMENTATION_SEED_OFFSET)
    noise = torch.randn((1, 3, req.height, req.width), generator=generator)
    a_low = low_alphas[level].view(-1, 1, 1, 1)
    x_aug = a_low.sqrt() * low_res + (1 - a_low).sqrt() * noise
    ac = model.schedule.alphas_cumprod
    ddim_ts = torch.arange(0, 1000, 1000 // req.steps) + 1
    alphas, alphas_prev = ac[ddim_ts], torch.cat([ac[:1], ac[ddim_ts[:-1]]])
    cond, uncond = encode_conditioning(network, [req], torch.device("cpu"))
    x = start_noise(req.seeds(), (4, req.height, req.width))
    for i, step in enumerate(ddim_ts.flip(0).tolist()):
        index = len(ddim_ts) - i - 1
        x_in = torch.cat([torch.cat([x, x]), torch.cat([x_aug, x_aug])], dim=1)
        v_uncond, v_cond = network.unet(x_in, torch.full((2,), step), torch.cat([uncond, cond]),
                                        y=level.repeat(2)).chunk(2)
        v = v_uncond + req.guidance * (v_cond - v_uncond)
        a_t, a_prev = alphas[index], alphas_prev[index]
        e = a_t.sqrt() * v + (1 - a_t).sqrt() * x  # predict_eps_from_z_and_v
        pred_x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v  # predict_start_from_z_and_v
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def test_x4_upscaler_equals_the_original(x4: LoadedModel, tiny_checkpoints: TinyCheckpoints) -> None:
    req = make_request(steps=2)
    image = picture(31)
    low_alphas = read_state_dict(tiny_checkpoints.get("x4-upscaler")[0])["low_scale_model.alphas_cumprod"]
    expected = original_superresolution(x4, req, to_pixels([image], torch.device("cpu")), low_alphas.float())
    assert_same(x4_latents(x4, [req], [image], tile=64), expected)


def count_unet_calls(model: LoadedModel) -> tuple[list[tuple[int, ...]], object]:
    calls: list[tuple[int, ...]] = []
    hook = model.network.unet.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    return calls, hook


def test_tiled_x4_upscale_is_larger_in_each_dimension(x4: LoadedModel) -> None:
    store = Store()
    req = make_request(init_image=store.add(picture(32)), steps=1, count=2)
    calls, hook = count_unet_calls(x4)
    try:
        (images,) = upscale(x4, [req], store.__getitem__, tile=32, overlap=8)
    finally:
        hook.remove()
    assert [image.size for image in images] == [(64 * x4.network.vae_scale,) * 2] * 2
    # 64 latents in tiles of 32 overlapping by 8: starts 0, 24, 32 -> 9 tiles, each one UNet call
    # for 2 images x (uncond + cond), 7 channels (latent + noised low-res image).
    assert calls == [(4, 7, 32, 32)] * 9


def test_hires_upscale_doubles_with_the_source_checkpoint(tiny_checkpoints: TinyCheckpoints) -> None:
    sd1 = tiny_model(tiny_checkpoints, "sd1")
    store = Store()
    req = make_request(init_image=store.add(picture(33)), sampler="euler", steps=2, strength=0.5, upscale_factor=2)
    calls, hook = count_unet_calls(sd1)
    try:
        (images,) = upscale(sd1, [req], store.__getitem__, tile=32, overlap=8)
    finally:
        hook.remove()
    assert [image.size for image in images] == [(128, 128)]
    # 128 pixels = 64 latents, 9 tiles of 32; int(0.5 * 2) = 1 step.
    assert calls == [(2, 4, 32, 32)] * 9
    inpainting = tiny_model(tiny_checkpoints, "sd1-inpaint")
    with pytest.raises(ImageInputError, match="needs an x4 upscaler or an ordinary checkpoint"):
        upscale(inpainting, [req], store.__getitem__)


def test_an_upscale_runs_only_on_the_checkpoint_its_factor_needs(x4: LoadedModel,
                                                                 tiny_checkpoints: TinyCheckpoints) -> None:
    store = Store()
    image = store.add(picture(34))
    with pytest.raises(ImageInputError, match="a 2x upscale needs an ordinary checkpoint .hires.; tiny is a "
                                              "x4-upscaler checkpoint"):
        upscale(x4, [make_request(init_image=image, upscale_factor=2, strength=0.3)], store.__getitem__)
    sd1 = tiny_model(tiny_checkpoints, "sd1")
    with pytest.raises(ImageInputError, match="a 4x upscale needs an x4 upscaler checkpoint; tiny is a sd1"):
        upscale(sd1, [make_request(init_image=image)], store.__getitem__)
    with pytest.raises(ValidationError, match="an upscale factor is only used by upscale, not by img2img"):
        make_request(kind="img2img", strength=0.5)


def test_cost_counts_the_pixels_the_unet_runs_on() -> None:
    txt2img = GenerationRequest(prompt="x", model="m", steps=20, guidance=7, seed=1, width=512, height=768, count=2)
    assert txt2img.cost == 2 * 20 * 1.5
    hires = make_request(width=512, height=768, steps=20, strength=0.3, upscale_factor=2)
    assert hires.cost == 6 * (1024 * 1536) / (512 * 512)  # int(0.3 * 20) steps on the 2x image
    x4 = make_request(width=512, height=768, steps=20, strength=0.3)
    # Every step (it samples from noise), on a 512x768 latent: 64 SD latents' worth per pixel.
    assert x4.cost == pytest.approx(20 * 1.5 * 64 * X4_UNET_FLOPS_RATIO)
    assert x4.cost > 10 * hires.cost
    outpaint = GenerationRequest(kind="outpaint", prompt="x", model="m", steps=20, guidance=7, seed=1, width=768,
                                 height=768, init_image="0" * 64, strength=1.0, outpaint_directions=("left", "right"))
    assert outpaint.cost == 20 * 768 * 768 / (512 * 512)  # the canvas, margins included


def unet_flops_per_latent_pixel(family: Family, side: int) -> float:
    """FLOPs of one forward of `family`'s real-size UNet on a side x side latent, per latent pixel
    (built on the meta device: shapes only, no memory, no weights)."""
    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(family.unet)
        x = torch.zeros(1, family.unet.in_channels, side, side)
        context = torch.zeros(1, 77, family.unet.context_dim)
        labels = torch.zeros(1, dtype=torch.long) if family.unet.num_classes else None
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.zeros(1), context, y=labels)
    return counter.get_total_flops() / side**2


def test_the_x4_flops_ratio_of_the_cost_is_what_the_networks_measure() -> None:
    sd1 = unet_flops_per_latent_pixel(SD1, 64)  # the cost unit: a 512x512 image
    for side in (64, 128):  # a small input and the upscaler's tile
        assert unet_flops_per_latent_pixel(X4_UPSCALER, side) / sd1 == pytest.approx(X4_UNET_FLOPS_RATIO, rel=0.1)


def test_an_x4_upscale_cancelled_in_a_shared_batch_leaves_it_and_its_mate_is_unchanged(x4: LoadedModel) -> None:
    """Issue 12 for the x4 upscaler: each row carries its own noise level, so a cancelled request's
    rows leave the UNet batch like any other's (tiled: at every tile's call)."""
    mate, doomed = make_request(seed=21, upscale_noise_level=30), make_request(seed=5, upscale_noise_level=60)
    images = [picture(40), picture(41)]
    full = x4_latents(x4, [mate, doomed], images, tile=32, overlap=8)
    steps, calls = [], []
    hook = x4.network.unet.register_forward_pre_hook(lambda _m, args: calls.append((len(steps) >= 2, args[0].shape[0])))
    try:
        cut = x4_latents(x4, [mate, doomed], images, progress=lambda step, total, x0: steps.append(step),
                         cancelled=lambda i: i == 1 and len(steps) >= 2, tile=32, overlap=8)
    finally:
        hook.remove()
    assert {rows for after, rows in calls if not after} == {4} and {rows for after, rows in calls if after} == {2}
    assert_same(cut[:1], full[:1], tolerance=1e-5)
    assert (cut[1] - full[1]).abs().max() > 0.1
