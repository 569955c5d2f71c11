"""generation/pipeline.py end to end on tiny checkpoints, against diffusers' UNet and schedulers
as an independent oracle: same weights (through diffusers' own single-file converter), same noise,
same text conditioning, the reference loop written here the way diffusers' pipelines run it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

from generation.pipeline import (
    LoadedModel,
    decode,
    encode_conditioning,
    load_model,
    run_batch,
    sample_latents,
    txt2img,
)
from generation.request import GenerationRequest
from generation.samplers import Cancelled
from generation.settings import ModelSettings
from models.loading import read_state_dict
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.fixtures.devices import StandInDevice, on_stand_in_device

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_model(checkpoints: TinyCheckpoints, family: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path, yaml_path = checkpoints.get(family)
    return load_model(ModelSettings(name=family, checkpoint=path, config=yaml_path), torch.device("cpu"), dtype)


def reference_unet(checkpoints: TinyCheckpoints, family: str) -> UNet2DConditionModel:
    path, yaml_path = checkpoints.get(family)
    weights = {k: v.float() for k, v in read_state_dict(path).items()}
    config = create_unet_diffusers_config_from_ldm(yaml.safe_load(yaml_path.read_text()), weights)
    if "sd2" in family:  # tiny SD 2.x blocks have one 64-wide head or fewer; see test_models_parity
        config["attention_head_dim"] = [max(1, c // 64) for c in config["block_out_channels"]]
    unet = UNet2DConditionModel(**config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(weights, config), strict=True)
    return unet


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a (red:1.3) fox in the snow", negative_prompt="blurry", model="tiny", sampler="ddim",
                  steps=6, guidance=5.0, seed=3, width=96, height=64, count=2)
    return GenerationRequest(**values | changes)


def start_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The engine contract, written out independently."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


@torch.no_grad()
def diffusers_loop(unet, scheduler, model: LoadedModel, req: GenerationRequest, start: torch.Tensor) -> torch.Tensor:
    cond, uncond = encode_conditioning(model.network, [req] * req.count, torch.device("cpu"))
    latents = start
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = unet(x_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + req.guidance * (out_cond - out_uncond), t, latents).prev_sample
    return latents


def assert_same(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 2e-5) -> None:
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert scale > 0.1, "degenerate output proves nothing"
    assert error <= tolerance * scale, f"max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize(("family", "prediction"), [("sd1", "epsilon"), ("sd2-v", "v_prediction")])
def test_ddim_equals_the_original_ddim_through_diffusers(
    tiny_checkpoints: TinyCheckpoints, family: str, prediction: str
) -> None:
    # 5 steps: c = 200 divides 1000, where diffusers' "leading" spacing equals the original's
    # range(0, 1000, c) + 1 (for other counts the original runs ceil(1000 / c) steps).
    model, req = tiny_model(tiny_checkpoints, family), request(steps=5)
    # DDIMScheduler configured as the original DDIMSampler: timesteps 1, 1+c, ... and a last step
    # to alphas_cumprod[0]; it starts from unit noise.
    scheduler = DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading",
                              clip_sample=False, prediction_type=prediction)
    scheduler.set_timesteps(req.steps)
    expected = diffusers_loop(reference_unet(tiny_checkpoints, family), scheduler, model, req,
                              start_noise(req.seeds(), (4, 32, 48)))
    assert_same(sample_latents(model, [req]), expected)


def test_euler_equals_diffusers_euler(tiny_checkpoints: TinyCheckpoints) -> None:
    model, req = tiny_model(tiny_checkpoints, "sd1"), request(sampler="euler", steps=8)
    scheduler = EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace")
    scheduler.set_timesteps(req.steps)
    # k-diffusion and the web UIs start at noise * sigma_max (diffusers' pipelines would use
    # init_noise_sigma = sqrt(sigma_max^2 + 1)); the loop above takes the start latent as given.
    start = start_noise(req.seeds(), (4, 32, 48)) * scheduler.sigmas[0].item()
    expected = diffusers_loop(reference_unet(tiny_checkpoints, "sd1"), scheduler, model, req, start)
    assert_same(sample_latents(model, [req]), expected)


@pytest.mark.parametrize("steps", [1, 4, 6])
@torch.no_grad()
def test_lcm_equals_diffusers_lcm_scheduler(tiny_checkpoints: TinyCheckpoints, steps: int) -> None:
    """diffusers' LCMScheduler (the LCM authors' sampler) as the oracle: its timesteps, its x0 jump
    and its re-noising with the seed's generator, drawn after the start noise as BatchNoise draws.
    timestep_scaling is raised so that its boundary-condition blend c_skip(t) x (at most 7e-6 at
    the default scaling) vanishes, as in the web UIs' LCM sampler and ours."""
    model, req = tiny_model(tiny_checkpoints, "sd1"), request(sampler="lcm", steps=steps, guidance=1.5, count=1)
    scheduler = LCMScheduler(**SCHEDULE, timestep_scaling=1e6)
    scheduler.set_timesteps(steps)
    unet = reference_unet(tiny_checkpoints, "sd1")
    cond, uncond = encode_conditioning(model.network, [req], torch.device("cpu"))
    generator = torch.Generator("cpu").manual_seed(req.seed)
    latents = torch.randn((1, 4, 32, 48), generator=generator)
    for t in scheduler.timesteps:
        out_uncond, out_cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])
                                    ).sample.chunk(2)
        latents = scheduler.step(out_uncond + req.guidance * (out_cond - out_uncond), t, latents,
                                 generator=generator).prev_sample
    assert_same(sample_latents(model, [req]), latents)


def test_an_image_depends_on_its_seed_not_on_its_batch(tiny_checkpoints: TinyCheckpoints) -> None:
    model = tiny_model(tiny_checkpoints, "sd1")
    alone = request(count=1, sampler="euler_a", seed=11)
    other = request(prompt="a lighthouse", negative_prompt="", guidance=9.0, seed=90, count=2, sampler="euler_a")
    solo = sample_latents(model, [alone])
    batched = sample_latents(model, [other, alone])
    assert_same(batched[2:], solo, tolerance=1e-5)
    assert (batched[:1] - solo).abs().max() > 0.1  # different seeds give different images


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_sde_karras"])
def test_a_request_cancelled_mid_batch_leaves_the_unet_batch_and_its_mates_are_unchanged(
        tiny_checkpoints: TinyCheckpoints, sampler: str) -> None:
    """Issue 12: the cancelled request's rows leave the UNet batch at the next step; the other
    images equal those of a run without the cancel (float32: the same math on a smaller batch,
    equal up to kernel rounding, far below one pixel level of the decoded image)."""
    model = tiny_model(tiny_checkpoints, "sd1")
    mate, doomed = request(sampler=sampler, steps=5, seed=21), request(sampler=sampler, steps=5, seed=7,
                                                                       count=1, prompt="a boat")
    full = sample_latents(model, [mate, doomed])
    steps, rows = [], []
    hook = model.network.unet.register_forward_pre_hook(
        lambda _module, args: rows.append((len(steps) >= 2, args[0].shape[0])))
    try:
        cut = sample_latents(model, [mate, doomed], progress=lambda step, total, x0: steps.append(step),
                             cancelled=lambda i: i == 1 and len(steps) >= 2)
    finally:
        hook.remove()
    # 3 images, cond and uncond halves, for two steps; then the mate's 2 images only.
    assert {size for after, size in rows if not after} == {6} and {size for after, size in rows if after} == {4}
    assert_same(cut[:2], full[:2], tolerance=1e-5)
    ours, reference = (np.stack([np.asarray(image) for image in decode(model, x[:2])]) for x in (cut, full))
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert (cut[2] - full[2]).abs().max() > 0.1  # the dropped image stopped changing with the others


def test_progress_cancel_and_batch_rules(tiny_checkpoints: TinyCheckpoints) -> None:
    model, req = tiny_model(tiny_checkpoints, "sd1"), request(steps=4, count=1)
    seen = []
    images = txt2img(model, [req], progress=lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    assert seen == [(i, 4, (1, 4, 32, 48)) for i in range(1, 5)]
    assert [image.size for image in images[0]] == [(96, 64)]

    calls = []
    with pytest.raises(Cancelled):
        sample_latents(model, [req], cancelled=lambda i: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="differ in width"):
        sample_latents(model, [req, request(width=64)])


def test_generate_command_same_seed_same_png(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    checkpoint, _ = tiny_checkpoints.get("sd2-v")
    atelier = Path(sys.executable).with_name("atelier")
    common = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a red fox", "--steps", "3",
              "--width", "64", "--height", "64", "--count", "2", "--device", "cpu", "--config", "/dev/null"]
    # Separate processes with the same thread count: bit-exact repeats on the CPU need the same
    # kernels and reduction order, not only the same seed.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([str(atelier), *common, "--seed", seed, "--out", str(tmp_path / f"{name}.png")],
                           capture_output=True, text=True, timeout=300, env=env)
            for name, seed in (("a", "7"), ("b", "7"), ("c", "8"))]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout.split() == [str(tmp_path / "a-1.png"), str(tmp_path / "a-2.png")]
    a1, a2, b1, c1 = ((tmp_path / n).read_bytes() for n in ("a-1.png", "a-2.png", "b-1.png", "c-1.png"))
    assert a1 == b1 and a1 != a2
    assert c1 == a2  # image 2 of seed 7 is made from seed 8


def test_large_images_decode_in_vae_tiles(tiny_checkpoints: TinyCheckpoints) -> None:
    model = tiny_model(tiny_checkpoints, "sd1")
    latents = torch.randn(1, 4, 40, 300, generator=torch.Generator().manual_seed(0))  # (1, 4, h, w)
    calls = []
    model.network.vae.decoder.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    (whole,) = decode(model, latents)
    assert calls == [(1, 3, 80, 600)]
    calls.clear()
    (tiles,) = decode(dataclasses.replace(model, vae_tile_above_pixels=80 * 300), latents)
    assert len(calls) == 3 and all(shape[-1] <= 256 for shape in calls)  # 128-latent tiles
    assert tiles.size == whole.size == (600, 80)
    difference = np.abs(np.asarray(tiles, dtype=float) - np.asarray(whole, dtype=float))
    assert difference.mean() < 8  # the same picture; GroupNorm statistics differ per tile


def gpu_model(checkpoints: TinyCheckpoints, family: str, dtype: torch.dtype) -> LoadedModel:
    path, yaml_path = checkpoints.get(family)
    return load_model(ModelSettings(name=family, checkpoint=path, config=yaml_path), torch.device("cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_a_seed_gives_the_cpus_image_on_a_gpu_in_every_dtype(
        tiny_checkpoints: TinyCheckpoints, family: str, dtype: torch.dtype) -> None:  # noqa: F811
    """The engine contract across devices (noise drawn on the CPU, ancestral noise included);
    half precision may move pixels a little but never gives NaN (black) or blank images."""
    req = request(sampler="euler_a", steps=8)
    on_cpu = txt2img(tiny_model(tiny_checkpoints, family), [req])[0]
    on_gpu = txt2img(gpu_model(tiny_checkpoints, family, dtype), [req])[0]
    for expected, image in zip(on_cpu, on_gpu, strict=True):
        a, b = np.asarray(expected).astype(float), np.asarray(image).astype(float)
        assert b.std() > 1.0, "a blank image"
        assert np.abs(a - b).mean() <= (1.0 if dtype is torch.float32 else 6.0)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a", "ddim"])
def test_cuda_sampling_steps_never_synchronize(tiny_checkpoints: TinyCheckpoints, sampler: str) -> None:  # noqa: F811
    """After the first step nothing reads the GPU back: the CPU queues kernels ahead of the GPU."""
    model = gpu_model(tiny_checkpoints, "sd1", torch.float16)

    def progress(step: int, total: int, x0: torch.Tensor) -> None:
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        latents = sample_latents(model, [request(sampler=sampler, steps=6)], progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(latents).all()


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SOURCE, MASK = png_of(Image.new("RGB", (64, 64), (30, 120, 200))), png_of(Image.new("L", (64, 64), 255))
SOURCE_SHA, MASK_SHA = hashlib.sha256(SOURCE).hexdigest(), hashlib.sha256(MASK).hexdigest()
STORED = {SOURCE_SHA: SOURCE, MASK_SHA: MASK}
IMAGE = dict(init_image=SOURCE_SHA, width=64, height=64, count=2)


@pytest.mark.parametrize(("family", "changes", "size"), [
    ("sd1", dict(sampler="dpmpp_2m_karras"), (96, 64)),
    ("sd2-v", dict(sampler="unipc"), (96, 64)),
    ("sd1", dict(kind="img2img", strength=0.5, **IMAGE), (64, 64)),
    ("sd1", dict(kind="img2img", strength=0.5, sampler="euler_a", **IMAGE), (64, 64)),
    ("sd1", dict(kind="inpaint", mask_image=MASK_SHA, strength=1.0, **IMAGE), (64, 64)),
    ("sd1-inpaint", dict(kind="inpaint", mask_image=MASK_SHA, strength=1.0, inpaint_only_masked=True, **IMAGE),
     (64, 64)),
    ("sd1", dict(kind="outpaint", strength=1.0, outpaint_directions=("left",), outpaint_pixels=16, **IMAGE | {"width": 80}),
     (80, 64)),
    ("sd1", dict(kind="variation", strength=0.6, variation_seed=5, variation_strength=0.3, **IMAGE), (64, 64)),
    ("sd1", dict(kind="upscale", strength=0.5, **IMAGE), (128, 128)),
    ("x4-upscaler", dict(kind="upscale", upscale_factor=4, **IMAGE), (128, 128)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_pipeline_runs_on_a_device_and_its_steps_never_wait_on_it(
        tiny_checkpoints: TinyCheckpoints, family: str, changes: dict, size: tuple[int, int],  # noqa: F811
        dtype: torch.dtype) -> None:
    """On the meta device standing in for a GPU (tests/fixtures/devices.py): no tensor is left on
    the wrong device, float16 weights beside the float32 VAE meet no input of another dtype in a
    convolution (meta convolutions refuse the mix, as CUDA's do), and between the first step and
    the last nothing is read back; only the ancestral samplers' noise, drawn on the CPU by the
    engine contract, is copied over."""
    model = on_stand_in_device(tiny_model(tiny_checkpoints, family, dtype))
    req = request(**{"model": family, "steps": 6} | changes)  # img2img-like kinds: at least 3 steps
    crossings_at_step: list[int] = []
    with StandInDevice() as device:
        (images,) = run_batch(model, [req], STORED.__getitem__,
                              lambda step, total, x0: crossings_at_step.append(len(device.traffic)))
    assert [image.size for image in images] == [size] * req.count and len(crossings_at_step) >= 3
    between_steps = device.traffic[crossings_at_step[0]:crossings_at_step[-1]]
    allowed = {"copy to device"} if req.sampler == "euler_a" else set()
    assert set(between_steps) <= allowed, between_steps


def encoder_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one at every forward call of `module`."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_prepared_batch_takes_its_text_and_noise_and_gives_the_same_images(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """The runner prepares the batch queued behind the running one (`prepare_batch`); its run then
    encodes nothing, and its images are those of an unprepared run, ancestral noise included (the
    prepared noise source continues where its start noise left the seeds' generators)."""
    from generation.pipeline import prepare_batch

    model = tiny_model(tiny_checkpoints, "sd1")
    batch = [request(sampler="euler_a", steps=4), request(prompt="a cat", sampler="euler_a", steps=4, seed=9, count=1)]
    calls = encoder_calls(model.network.text_encoder)
    unprepared = run_batch(model, batch, lambda sha: b"")
    assert len(calls) == 1  # every text of the batch in one call

    prepare_batch(model, batch)
    assert len(calls) == 2
    prepared = run_batch(model, batch, lambda sha: b"")
    assert len(calls) == 2  # the run took what was prepared
    assert [[np.array(i).tobytes() for i in r] for r in prepared] == [[np.array(i).tobytes() for i in r] for r in unprepared]

    prepare_batch(model, [request(prompt="a boat")])  # prepared, but another batch runs
    again = run_batch(model, batch, lambda sha: b"")
    assert len(calls) == 4
    assert [[np.array(i).tobytes() for i in r] for r in again] == [[np.array(i).tobytes() for i in r] for r in unprepared]
