"""SDXL generation (generation/sdxl.py, generation/refiner.py, `atelier generate`) against a
transcription of sgm's own sampling code, written here from `generative-models`: the
LegacyDDPMDiscretization, the DiscreteDenoiser with EpsScaling and VanillaCFG, EulerEDMSampler
and DPMPP2MSampler, the img2img and refiner discretization wrappers of its demo, and the
GeneralConditioner's concatenations. float32 on the CPU, on tiny random-weight files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from bot.cli import main
from generation.img2img import img2img
from generation.pipeline import LoadedModel, decode, encode, load_model, run_batch, sample_latents, to_pixels
from generation.refiner import refined_latents
from generation.request import GenerationRequest, Kind
from generation.schedules import DiscreteSchedule, legacy_ddpm_sigmas
from generation.sdxl import img2img_sigmas, refiner_steps
from generation.sdxl import sampler as sdxl_sampler
from generation.settings import ModelSettings
from tests.fixtures.checkpoints import TinySDXL, tiny_sdxl  # noqa: F401
from tests.fixtures.devices import StandInDevice, on_stand_in_device


def _sgm_tables(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LegacyDDPMDiscretization()(steps) (decreasing, 0 appended) and its 1000 training sigmas
    (increasing, the DiscreteDenoiser's table), as sgm computes them: float64 numpy, then float32."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    table = torch.tensor(((1 - ac) / ac) ** 0.5, dtype=torch.float32)
    ts = np.linspace(999, 0, steps, endpoint=False).astype(int)[::-1]  # generate_roughly_equally_spaced_steps
    sigmas = torch.flip(torch.tensor(((1 - ac[ts]) / ac[ts]) ** 0.5, dtype=torch.float32), (0,))
    return torch.cat([sigmas, sigmas.new_zeros(1)]), table


def _fourier(values: list[float], dim: int = 256) -> torch.Tensor:
    """sgm's timestep_embedding of each value, concatenated (ConcatTimestepEmbedderND)."""
    t = torch.tensor(values, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)


def _tokens(tower, text: str) -> torch.Tensor:
    ids = [tower.bos_id, *tower.tokenize(text), tower.eos_id]
    return torch.tensor([ids + [tower.pad_id] * (77 - len(ids))])


def _sgm_conditioning(model: LoadedModel, text: str, size: tuple[int, int], zero: bool = False,
                      aesthetic: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GeneralConditioner: crossattn = towers' outputs side by side, vector = pooled then the size
    embedders' features in YAML order; force_zero_embeddings=["txt"] zeroes the text parts."""
    conditioner = model.network.conditioner
    towers = conditioner.texts
    context = torch.cat([tower(_tokens(tower, text)) for tower in towers], dim=-1)
    pooled = towers[-1].forward_pooled(_tokens(towers[-1], text))[1]
    if zero:
        context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    h, w = size
    values = {"original_size_as_tuple": [h, w], "crop_coords_top_left": [0, 0], "target_size_as_tuple": [h, w],
              "aesthetic_score": [aesthetic]}
    vector = torch.cat([pooled] + [_fourier(values[key]) for key in conditioner.config.sizes], dim=1)
    return context, vector


def _sgm_denoiser(model: LoadedModel, cond, uncond, scale: float, table: torch.Tensor):
    """DiscreteDenoiser(EpsScaling) under VanillaCFG: sigma quantized to the nearest training
    sigma, whose index is the timestep; uncond first in the doubled batch."""
    unet = model.network.unet

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        x_in = torch.cat([x, x])
        s_in = torch.full((2 * x.shape[0],), sigma)
        idx = (s_in - table[:, None]).abs().argmin(dim=0)
        s = table[idx].view(-1, 1, 1, 1)
        context = torch.cat([uncond[0], cond[0]]).repeat_interleave(x.shape[0], 0)
        vector = torch.cat([uncond[1], cond[1]]).repeat_interleave(x.shape[0], 0)
        out = unet(x_in * (1 / (s**2 + 1) ** 0.5), idx, context, vector) * -s + x_in
        u, c = out.chunk(2)
        return u + scale * (c - u)

    return denoise


def _sgm_sample(sampler: str, denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EulerEDMSampler (s_churn 0) or DPMPP2MSampler over `sigmas`, from x at sigmas[0] (VE)."""
    old = None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, float(sigma))
        if sampler == "euler":
            x = x + (nxt - sigma) * (x - denoised) / sigma
            continue
        t, t_next = -sigma.log(), -nxt.log()
        h = t_next - t
        mult1, mult2 = (-t_next).exp() / (-t).exp(), (-h).expm1()
        x_standard = mult1 * x - mult2 * denoised
        if old is None or nxt < 1e-14:
            x = x_standard
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = mult1 * x - mult2 * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old)
        old = denoised
    return x


def _model(tiny_sdxl: TinySDXL, name: str) -> LoadedModel:
    path, yaml_path = tiny_sdxl.get(name)
    return load_model(ModelSettings(name=name, checkpoint=path, config=yaml_path), torch.device("cpu"), torch.float32)


def _request(**changes) -> GenerationRequest:
    values = dict(prompt="a red fox in the snow", model="sdxl", sampler="euler", steps=5, guidance=5.0, seed=3,
                  width=96, height=64, count=1)
    return GenerationRequest(**values | changes)


def _seed_noise(req: GenerationRequest, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in req.seeds()])


def _assert_same(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 rounding (measured: about 2e-6 of the latents' scale)."""
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert scale > 1e-3 and error <= rel * scale, f"max abs error {error:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------ discretization


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_legacy_ddpm_sigmas_are_sgms_and_diffusers_euler_on_the_same_timesteps(steps: int) -> None:
    ours = legacy_ddpm_sigmas(DiscreteSchedule.linear(), steps)
    sgm, _ = _sgm_tables(steps)
    torch.testing.assert_close(ours, sgm, rtol=2e-6, atol=0)
    timesteps = [int(x) for x in np.linspace(999, 0, steps, endpoint=False)]
    assert timesteps[:3] == [999, 949, 899][: len(timesteps)] or steps != 20
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(timesteps=timesteps)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-5, atol=0)  # diffusers: float32 table


def test_karras_samplers_keep_karras_spacing_over_the_sdxl_range_and_the_others_sgms() -> None:
    schedule = DiscreteSchedule.linear()
    sgm, table = _sgm_tables(12)
    for name in ("euler", "dpmpp_2m", "euler_a", "heun", "lms", "ddim", "unipc"):
        assert sdxl_sampler(name).vp_start
        torch.testing.assert_close(sdxl_sampler(name).sigmas(schedule, 12), sgm, rtol=2e-6, atol=0)
    # k-diffusion's get_sigmas_karras(12, sigma_min, sigma_max, rho=7) over the training table's range
    ramp = np.linspace(0, 1, 12)
    lo, hi = float(table[0]) ** (1 / 7), float(table[-1]) ** (1 / 7)
    karras = torch.tensor(np.append((hi + ramp * (lo - hi)) ** 7, 0.0), dtype=torch.float32)
    for name in ("dpmpp_2m_karras", "dpmpp_sde_karras"):
        sigmas = sdxl_sampler(name).sigmas(schedule, 12)
        torch.testing.assert_close(sigmas, karras, rtol=2e-5, atol=0)  # float32 table ends
        assert not torch.allclose(sigmas[:-1], sgm[:-1], rtol=1e-2)


def test_img2img_and_refiner_wrappers_prune_as_sgms_demo() -> None:
    sigmas = torch.arange(10.0, -1.0, -1.0)  # K = 10 steps: 11 levels, 0 last
    assert img2img_sigmas(sigmas, 0.5).tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]  # int(0.5 * 11) = 5 levels
    assert img2img_sigmas(sigmas, 0.01).tolist() == [0.0]  # at least one
    assert img2img_sigmas(sigmas, 1.0).tolist() == sigmas.tolist()
    # Txt2Noisy prunes clamp(int(r (K + 1)) - 1, 0, K) levels; the refiner's Img2Img keeps p + 1
    assert [refiner_steps(10, r) for r in (0.0, 0.05, 0.15, 0.5, 1.0)] == [0, 0, 0, 4, 10]
    assert refiner_steps(40, 0.15) == 5


# ------------------------------------------------------------------ txt2img, img2img, refiner


@pytest.mark.parametrize(("sampler", "negative"), [("euler", ""), ("dpmpp_2m", ""), ("dpmpp_2m", "blurry, dark")])
def test_txt2img_is_sgms_sampling(tiny_sdxl: TinySDXL, sampler: str, negative: str) -> None:
    model = _model(tiny_sdxl, "sdxl")
    req = _request(sampler=sampler, negative_prompt=negative, count=2 if sampler == "euler" else 1)
    with torch.inference_mode():
        ours = sample_latents(model, [req])
        sigmas, table = _sgm_tables(req.steps)
        size = (req.height, req.width)
        cond = _sgm_conditioning(model, req.prompt, size)
        uncond = _sgm_conditioning(model, negative, size, zero=negative == "")
        x = _seed_noise(req, (4, 32, 48)) * torch.sqrt(1.0 + sigmas[0] ** 2.0)  # prepare_sampling_loop
        expected = _sgm_sample(sampler, _sgm_denoiser(model, cond, uncond, req.guidance, table), x, sigmas)
    _assert_same(ours, expected)


def test_a_cancelled_request_leaves_an_sdxl_batch_with_its_adm_vectors(tiny_sdxl: TinySDXL) -> None:
    """Per-request cancellation: the dropped rows take their ADM vectors with them, so the mate's
    latents equal those of a run without the cancel (its prompt, negative and sizes its own)."""
    model = _model(tiny_sdxl, "sdxl")
    mate, doomed = _request(steps=4, seed=21, negative_prompt="dark"), _request(steps=4, seed=7, prompt="a boat")
    with torch.inference_mode():
        full = sample_latents(model, [mate, doomed])
        steps: list[int] = []
        cut = sample_latents(model, [mate, doomed], progress=lambda step, total, x0: steps.append(step),
                             cancelled=lambda i: i == 1 and len(steps) >= 2)
    _assert_same(cut[:1], full[:1])
    assert (cut[1] - full[1]).abs().max() > 0.1


def test_img2img_is_sgms_img2img(tiny_sdxl: TinySDXL) -> None:
    model = _model(tiny_sdxl, "sdxl")
    image = Image.radial_gradient("L").resize((96, 64)).convert("RGB")
    stored = {"a" * 64: _png(image)}
    req = _request(kind=Kind.IMG2IMG, init_image="a" * 64, strength=0.6, sampler="dpmpp_2m", steps=6)
    with torch.inference_mode():
        (ours,) = img2img(model, [req], stored.__getitem__)
        z = encode(model.network, to_pixels([image], model.device))  # 0.13025 x the posterior mean
        sigmas, table = _sgm_tables(req.steps)
        sigmas = sigmas[-int(0.6 * len(sigmas)) :]  # Img2ImgDiscretizationWrapper: 4 of 7 levels
        noised = (z + _seed_noise(req, (4, 32, 48)) * sigmas[0]) / torch.sqrt(1.0 + sigmas[0] ** 2.0)
        x = noised * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        size = (req.height, req.width)
        denoise = _sgm_denoiser(model, _sgm_conditioning(model, req.prompt, size),
                                _sgm_conditioning(model, "", size, zero=True), req.guidance, table)
        expected = decode(model, _sgm_sample("dpmpp_2m", denoise, x, sigmas))
    assert np.abs(np.asarray(ours[0], dtype=int) - np.asarray(expected[0], dtype=int)).max() <= 1


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("strength", "negative"), [(0.5, ""), (0.34, "blurry")])
def test_refiner_finishes_the_base_as_sgms_demo(tiny_sdxl: TinySDXL, strength: float, negative: str) -> None:
    base, refiner = _model(tiny_sdxl, "sdxl"), _model(tiny_sdxl, "sdxl-refiner")
    req = _request(steps=5, negative_prompt=negative)
    with torch.inference_mode():
        ours = refined_latents(base, refiner, [req], {}.__getitem__, strength)
        p = refiner_steps(req.steps, strength)
        assert p == {0.5: 2, 0.34: 1}[strength]
        sigmas, table = _sgm_tables(req.steps)
        size = (req.height, req.width)
        base_cond = _sgm_conditioning(base, req.prompt, size)
        base_uncond = _sgm_conditioning(base, negative, size, zero=negative == "")
        x = _seed_noise(req, (4, 32, 48)) * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        # Txt2NoisyDiscretizationWrapper: the base stops p levels early
        x = _sgm_sample("euler", _sgm_denoiser(base, base_cond, base_uncond, req.guidance, table), x, sigmas[: len(sigmas) - p])
        # the refiner: Img2ImgDiscretizationWrapper(r) keeps p + 1 levels, starts from x as it is;
        # its negative prompt is encoded, never zeroed, with aesthetic scores 6 / 2.5
        tail = sigmas[-(p + 1) :]
        cond = _sgm_conditioning(refiner, req.prompt, size, aesthetic=6.0)
        uncond = _sgm_conditioning(refiner, negative, size, aesthetic=2.5)
        expected = _sgm_sample("euler", _sgm_denoiser(refiner, cond, uncond, req.guidance, table), x, tail)
    _assert_same(ours, expected)


# ------------------------------------------------------------------ the command and every pipeline


def test_generate_repeats_a_seed_byte_for_byte_with_and_without_the_refiner(tiny_sdxl: TinySDXL, tmp_path: Path) -> None:
    base, base_yaml = tiny_sdxl.get("sdxl")
    refiner, refiner_yaml = tiny_sdxl.get("sdxl-refiner")
    distilled, _ = tiny_sdxl.get("sdxl-distilled")
    common = ["generate", "--prompt", "a red fox", "--seed", "5", "--steps", "3", "--guidance", "6",
              "--width", "96", "--height", "64", "--device", "cpu", "--config", "/dev/null"]
    runs = {
        "base": ["--checkpoint", str(base), "--model-config", str(base_yaml), "--sampler", "euler"],
        "distilled": ["--checkpoint", str(distilled), "--sampler", "dpmpp_2m"],
        "refined": ["--checkpoint", str(base), "--sampler", "dpmpp_2m", "--refiner", str(refiner),
                    "--refiner-config", str(refiner_yaml), "--refiner-strength", "0.5"],
    }
    outputs = {}
    for name, options in runs.items():
        for attempt in ("a", "b"):
            out = tmp_path / f"{name}-{attempt}.png"
            assert main([*common, *options, "--out", str(out)]) == 0
        first, repeat = ((tmp_path / f"{name}-{n}.png").read_bytes() for n in "ab")
        assert first == repeat
        with Image.open(tmp_path / f"{name}-a.png") as image:
            assert image.size == (96, 64)
            pixels = np.asarray(image)
            parameters = image.info["parameters"]
        assert pixels.std() > 1  # not a flat (black) image
        if name == "refined":  # p = int(0.5 * 4) - 1 = 1 of the 3 steps on the refiner
            assert f", Refiner: {refiner.stem} [" in parameters and parameters.endswith("Refiner switch at: 0.6667")
        else:
            assert "Refiner" not in parameters
        outputs[name] = pixels
    assert not np.array_equal(outputs["base"], outputs["distilled"])


def test_generate_refuses_a_refiner_that_is_not_one(tiny_sdxl: TinySDXL, tmp_path: Path, capsys) -> None:
    base, _ = tiny_sdxl.get("sdxl")
    args = ["generate", "--checkpoint", str(base), "--prompt", "x", "--steps", "2", "--width", "96", "--height", "64",
            "--device", "cpu", "--config", "/dev/null", "--out", str(tmp_path / "x.png")]
    assert main([*args, "--refiner", str(base)]) != 0
    assert "needs an SDXL base and an SDXL refiner, got sdxl and sdxl" in capsys.readouterr().err
    assert main([*args, "--refiner-strength", "0.3"]) != 0
    assert "--refiner-config and --refiner-strength need --refiner" in capsys.readouterr().err


def test_vae_stays_in_a_dtype_the_family_allows(tiny_sdxl: TinySDXL) -> None:
    path, _ = tiny_sdxl.get("sdxl")
    model = load_model(ModelSettings(name="x", checkpoint=path), torch.device("cpu"), torch.float16)
    family = model.network.family
    assert family.vae_dtypes == ("float32", "bfloat16")
    assert str(next(model.network.vae.parameters()).dtype).removeprefix("torch.") in family.vae_dtypes
    latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0)) * 4
    (image,) = decode(model, latents)
    assert np.asarray(image).std() > 1


_MASK = Image.new("L", (96, 64))
_MASK.paste(255, (24, 16, 72, 48))
_STORED = {"a" * 64: _png(Image.radial_gradient("L").resize((96, 64)).convert("RGB")), "b" * 64: _png(_MASK)}

#: kind-specific request fields, and the family that runs them.
_PIPELINES = {
    "txt2img": ("sdxl", {}),
    "img2img": ("sdxl", dict(kind=Kind.IMG2IMG, init_image="a" * 64, strength=0.7)),
    "variation": ("sdxl", dict(kind=Kind.VARIATION, init_image="a" * 64, strength=0.7, variation_seed=9,
                               variation_strength=0.3)),
    "inpaint": ("sdxl", dict(kind=Kind.INPAINT, init_image="a" * 64, mask_image="b" * 64, strength=1.0)),
    "inpaint-9ch": ("sdxl-inpaint", dict(kind=Kind.INPAINT, init_image="a" * 64, mask_image="b" * 64, strength=1.0)),
    "outpaint": ("sdxl", dict(kind=Kind.OUTPAINT, init_image="a" * 64, outpaint_directions=("left",),
                              outpaint_pixels=16, width=112, strength=1.0)),
    "hires": ("sdxl-distilled", dict(kind=Kind.UPSCALE, init_image="a" * 64, strength=0.7, upscale_factor=2)),
}


@pytest.mark.parametrize("pipeline", _PIPELINES)
def test_every_pipeline_runs_sdxl_on_the_stand_in_device_without_syncing(tiny_sdxl: TinySDXL, pipeline: str) -> None:
    family, fields = _PIPELINES[pipeline]
    model = on_stand_in_device(_model(tiny_sdxl, family))
    req = _request(**{"steps": 6, "count": 1, "sampler": "dpmpp_2m"} | fields)  # img2img-like: 3 steps or more
    crossings: list[int] = []
    with StandInDevice() as device:
        (images,) = run_batch(model, [req], _STORED.__getitem__, lambda step, total, x0: crossings.append(len(device.traffic)))
    scale = 2 if pipeline == "hires" else 1
    assert [image.size for image in images] == [(req.width * scale, req.height * scale)]
    assert len(crossings) >= 3
    assert device.traffic[crossings[0] : crossings[-1]] == []


# ------------------------------------------------------------------ what the bot charges


def _flops_per_latent_pixel(config, side: int) -> float:
    """The measurement itself, written out here: FlopCounterMode over a meta-device UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import UNetModel

    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(config)
        y = torch.zeros(1, config.adm_in_channels) if config.adm_in_channels else None
        with FlopCounterMode(display=False) as counter:
            unet(torch.zeros(1, 4, side, side), torch.zeros(1), torch.zeros(1, 77, config.context_dim), y=y)
    return counter.get_total_flops() / side**2


def test_sdxl_cost_counts_its_unet_flops_as_measured() -> None:
    from models.families import SD1, SD2_V, SDXL, SDXL_REFINER
    from models.flops import unet_flops_ratio

    sd1 = _flops_per_latent_pixel(SD1.unet, 64)  # the 512x512 cost unit
    ratio = unet_flops_ratio(SDXL.unet, 128)  # at 1024x1024
    assert ratio == pytest.approx(_flops_per_latent_pixel(SDXL.unet, 128) / sd1, rel=1e-9)
    assert ratio == pytest.approx(2.10, abs=0.01)
    assert unet_flops_ratio(SDXL_REFINER.unet, 128) == pytest.approx(2.27, abs=0.01)
    # an SSD-1B-like layout (input depths 0, 0, 2, 2, 4, 4 and the outputs' alike, a ResBlock
    # middle) is "sdxl" by family but does 0.6 of the base's work: 1.25 times SD's
    ssd = dataclasses.replace(SDXL.unet, transformer_depth=(0, 0, 2, 2, 4, 4), transformer_depth_middle=0)
    distilled = unet_flops_ratio(ssd, 128)
    assert distilled == pytest.approx(_flops_per_latent_pixel(ssd, 128) / sd1, rel=1e-9)
    assert distilled == pytest.approx(1.25, abs=0.01) and distilled < 0.6 * ratio
    assert unet_flops_ratio(SD1.unet, 64) == unet_flops_ratio(SD2_V.unet, 96) == 1.0  # the unit
    sd = _request(width=1024, height=1024, steps=10)
    xl = sd.model_copy(update={"unet_flops_ratio": ratio})
    assert xl.cost == pytest.approx(ratio * sd.cost) and sd.cost == pytest.approx(40)


async def test_the_bot_sizes_and_charges_sdxl_requests_by_their_unets_flops(tiny_sdxl: TinySDXL) -> None:
    from types import SimpleNamespace

    from bot.commands import Gestures, Options
    from bot.config import AppConfig
    from generation.addons import AddonLibrary
    from models.families import SD1
    from models.loading import inspect_checkpoint

    (path, yaml_path), (distilled, _) = tiny_sdxl.get("sdxl"), tiny_sdxl.get("sdxl-distilled")
    config = AppConfig(models=(ModelSettings(name="xl", checkpoint=path, config=yaml_path),
                               ModelSettings(name="small", checkpoint=distilled)))
    studio = SimpleNamespace(config=config, db=None, addons=AddonLibrary(None, None))
    gestures = Gestures(None, studio, None)  # type: ignore[arg-type]
    request = await gestures.request(Options(prompt="a cat", aspect="2:3", seed=1, count=1))
    # the tiny SDXL's native side is 256 (1024 x its 2x VAE / 8): SDXL's 2:3 bucket, scaled
    assert (request.width, request.height) == (192, 320)
    small = await gestures.request(Options(prompt="a cat", aspect="2:3", seed=1, count=1, model="small"))
    # each is charged its own UNet's counted work at its native latent (32: the tiny files' 256 / 8)
    sd1 = _flops_per_latent_pixel(SD1.unet, 64)
    for req, file in ((request, path), (small, distilled)):
        unet = inspect_checkpoint(file, None).unet
        assert req.unet_flops_ratio == pytest.approx(_flops_per_latent_pixel(unet, 32) / sd1, rel=1e-9)
    assert inspect_checkpoint(distilled, None).family == "sdxl" and small.unet_flops_ratio != request.unet_flops_ratio


# ------------------------------------------------------------------ a configured refiner


def test_a_configured_refiner_is_loaded_with_its_model_and_finishes_its_images(tiny_sdxl: TinySDXL) -> None:
    from generation.engine import Engine
    from generation.settings import check_models

    (base, _), (refiner, _) = tiny_sdxl.get("sdxl"), tiny_sdxl.get("sdxl-refiner")
    models = check_models((ModelSettings(name="xl", checkpoint=base, refiner="ref", refiner_strength=0.5),
                           ModelSettings(name="ref", checkpoint=refiner)))
    engine = Engine(models, "float32", _STORED.__getitem__)
    model = engine.load("xl", "cpu")
    assert model.refiner is not None and model.refiner.network.family.name == "sdxl-refiner"
    assert engine.size(model) == engine.size(dataclasses.replace(model, refiner=None)) + engine.size(model.refiner)
    req = _request(steps=3)
    with torch.inference_mode():
        (ours,) = run_batch(model, [req], _STORED.__getitem__)
        expected = decode(model.refiner, refined_latents(model, model.refiner, [req], {}.__getitem__, 0.5))
        (plain,) = run_batch(dataclasses.replace(model, refiner=None), [req], _STORED.__getitem__)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(expected[0]))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(plain[0]))
    # the engine's PNG names the refiner as A1111 does: p = int(0.5 * 4) - 1 = 1 of 3 steps refined
    from generation.queue import Job

    (result,) = engine.run(model, "cpu", [Job("aaaaaaaaaaaa", req, owner_id=1, guild_id=None, weight=1.0, seq=0)],
                           lambda *_: None, lambda _: False)
    parameters = result.images[0].info["parameters"]
    assert parameters.endswith(f", Refiner: ref [{model.refiner.short_hash}], Refiner switch at: 0.6667")
    for bad in ("xl", "nope"):
        with pytest.raises(ValueError, match=f"refiner '{bad}' must name another"):
            check_models((ModelSettings(name="xl", checkpoint=base, refiner=bad),))


def test_models_report_names_the_refiner_and_refuses_a_wrong_one(tiny_sdxl: TinySDXL) -> None:
    from bot.model_report import describe_models

    (base, _), (refiner, _) = tiny_sdxl.get("sdxl"), tiny_sdxl.get("sdxl-refiner")
    good = (ModelSettings(name="xl", checkpoint=base, refiner="ref"), ModelSettings(name="ref", checkpoint=refiner))
    report, ok = describe_models(good)
    assert ok and "xl (refiner: ref, strength 0.15): " in report and "\n  sdxl-refiner, epsilon" in report
    wrong = (ModelSettings(name="xl", checkpoint=base, refiner="other"), ModelSettings(name="other", checkpoint=base))
    report, ok = describe_models(wrong)
    assert not ok and "error: xl: refiner 'other' is an sdxl checkpoint for an sdxl one" in report


# ------------------------------------------------------------------ live previews


def test_sdxl_previews_use_the_sdxl_latent_rgb_factors(tiny_sdxl: TinySDXL) -> None:
    from generation.denoiser import latent_preview
    from generation.engine import Engine
    from generation.queue import Job
    from models.families import SD_LATENT_RGB, SDXL_LATENT_RGB

    path, yaml_path = tiny_sdxl.get("sdxl")
    engine = Engine([ModelSettings(name="sdxl", checkpoint=path, config=yaml_path)], "float32", {}.__getitem__,
                    preview=True)
    model = engine.load("sdxl", "cpu")
    assert model.network.family.latent_rgb == SDXL_LATENT_RGB
    req = _request(count=1, steps=3)
    previews: list[Image.Image] = []
    engine.run(model, "cpu", [Job("aaaaaaaaaaaa", req, owner_id=1, guild_id=None, weight=1.0, seq=0)],
               lambda job, step, total, preview: previews.append(preview), lambda _: False)
    # euler's last step lands on its x0 prediction: the last preview is the final latent's
    (final,) = sample_latents(model, [req])
    last = np.asarray(previews[-1])
    assert np.array_equal(last, latent_preview(final, SDXL_LATENT_RGB).numpy())
    assert not np.array_equal(last, latent_preview(final, SD_LATENT_RGB).numpy())


def test_a_prepared_sdxl_batch_takes_its_text_and_noise_and_gives_the_same_latents(tiny_sdxl: TinySDXL) -> None:
    """As for SD (tests/test_pipeline.py): both towers, the pooled embedding and the ADM vectors
    are made ahead, and the run equals an unprepared one."""
    from generation.pipeline import prepare_batch

    model = _model(tiny_sdxl, "sdxl")
    batch = [_request(sampler="euler_a", count=2, negative_prompt="dark"), _request(prompt="a boat", sampler="euler_a", seed=8)]
    calls: list[int] = []
    for tower in model.network.conditioner.texts:
        tower.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        unprepared = sample_latents(model, batch)
        encoded = len(calls)
        prepare_batch(model, batch)
        assert len(calls) == 2 * encoded
        prepared = sample_latents(model, batch)
    assert len(calls) == 2 * encoded and torch.equal(prepared, unprepared)
