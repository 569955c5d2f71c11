"""img2img against a direct transcription of the original img2img script and DDIMSampler
(stochastic_encode, then decode from t_enc), batching, and the contract's edge cases."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.cli import main
from generation.images import ImageInputError
from generation.img2img import img2img
from generation.pipeline import (
    LoadedModel,
    decode,
    denoise,
    encode,
    encode_conditioning,
    load_model,
    run_batch,
    start,
    to_pixels,
)
from generation.request import GenerationRequest
from generation.samplers import SAMPLERS
from generation.settings import ModelSettings
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401


def tiny_model(checkpoints: TinyCheckpoints, family: str) -> LoadedModel:
    path, yaml_path = checkpoints.get(family)
    return load_model(ModelSettings(name=family, checkpoint=path, config=yaml_path), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints: TinyCheckpoints) -> LoadedModel:
    return tiny_model(tiny_checkpoints, "sd1")


def start_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The engine's seed contract, written out independently."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def assert_same(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 2e-5) -> None:
    """Equal in float32: max abs error below `tolerance` of the reference's magnitude."""
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert scale > 0.1, "degenerate output proves nothing"
    assert error <= tolerance * scale, f"max abs error {error:.3g} vs scale {scale:.3g}"


def assert_close_images(ours: Image.Image, reference: Image.Image) -> None:
    """The same image up to rounding of values at exactly .5 (float kernels differ in the last bit)."""
    assert ours.size == reference.size
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random RGB image (random pixels would be all high frequency)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


class Store(dict):
    """sha256 -> PNG bytes, as storage hands inputs to the pipelines."""

    def add(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        self[digest] = buffer.getvalue()
        return digest


def request(**changes) -> GenerationRequest:
    values = dict(kind="img2img", prompt="a (red:1.3) fox", negative_prompt="blurry", model="tiny", sampler="ddim",
                  steps=5, guidance=5.0, seed=3, width=64, height=64, count=1, strength=0.6, init_image="0" * 64)
    return GenerationRequest(**values | changes)


@torch.no_grad()
def original_img2img(model: LoadedModel, req: GenerationRequest, x0: torch.Tensor) -> torch.Tensor:
    """scripts/img2img.py with DDIMSampler (eta 0), transcribed: make_schedule's ddim_alphas and
    alphas_prev, stochastic_encode(x0, t_enc) at ddim_timesteps[t_enc], then decode() runs
    p_sample_ddim over ddim_timesteps[:t_enc] reversed with index = t_enc - i - 1."""
    ac = model.schedule.alphas_cumprod  # the model's registered float32 buffer
    ddim_ts = torch.arange(0, 1000, 1000 // req.steps) + 1
    alphas, alphas_prev = ac[ddim_ts], torch.cat([ac[:1], ac[ddim_ts[:-1]]])
    t_enc = int(req.strength * req.steps)
    noise = start_noise(req.seeds(), tuple(x0.shape[1:]))
    x = alphas[t_enc].sqrt() * x0 + (1 - alphas[t_enc]).sqrt() * noise
    cond, uncond = encode_conditioning(model.network, [req] * req.count, torch.device("cpu"))
    for i, step in enumerate(ddim_ts[:t_enc].flip(0).tolist()):
        index = t_enc - i - 1
        t = torch.full((2 * x.shape[0],), step)
        e_uncond, e_cond = model.network.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        e = e_uncond + req.guidance * (e_cond - e_uncond)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    return x


def test_ddim_img2img_equals_the_original_script(sd1: LoadedModel) -> None:
    store = Store()
    source = picture(1)
    req = request(init_image=store.add(source), count=2)
    x0 = encode(sd1.network, to_pixels([source], torch.device("cpu")))  # (1, 4, 32, 32)
    expected = original_img2img(sd1, req, x0.expand(2, -1, -1, -1))
    ours = denoise(sd1, [req], (32, 32), init=x0.expand(2, -1, -1, -1), strength=req.strength)
    assert_same(ours, expected)
    images = img2img(sd1, [req], store.__getitem__)[0]
    reference = decode(sd1, expected)
    for image, ref in zip(images, reference, strict=True):
        assert_close_images(image, ref)
    assert np.asarray(images[0]).std() > 5  # not a flat image


def test_start_points_of_other_samplers(sd1: LoadedModel) -> None:
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for name in ("euler", "dpmpp_2m_karras", "unipc"):  # as the web UIs: x0 + sigma * noise, at the tail's top
        sigmas = SAMPLERS[name].sigmas(sd1.schedule, 10)
        tail, x = start(SAMPLERS[name], sigmas, 10, noise, x0, strength=0.35)
        assert torch.equal(tail, sigmas[-4:])  # t_enc = 3 steps are sampled
        assert torch.allclose(x, x0 + sigmas[-4].item() * noise, atol=1e-6)
        # Strength 1: the whole schedule from x0 + sigma_max * noise (mostly noise).
        full, x = start(SAMPLERS[name], sigmas, 10, noise, x0, strength=1.0)
        assert torch.equal(full, sigmas) and torch.allclose(x, x0 + sigmas[0].item() * noise)
    # ddim/plms keep the original's off-by-one: the VP latent one level above the tail, read as
    # being at the tail's top; at strength 1 there is no level above: txt2img's start.
    sigmas = SAMPLERS["plms"].sigmas(sd1.schedule, 10)
    tail, x = start(SAMPLERS["plms"], sigmas, 10, noise, x0, strength=0.35)
    alpha = 1 / (1 + sigmas[-5].item() ** 2)
    assert torch.allclose(x / (1 + tail[0] ** 2) ** 0.5, alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise, atol=1e-6)
    full, x = start(SAMPLERS["plms"], sigmas, 10, noise, x0, strength=1.0)
    assert torch.equal(full, sigmas) and torch.equal(x, noise * (1 + sigmas[0].item() ** 2) ** 0.5)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        start(SAMPLERS["euler"], sigmas, 10, noise, x0, strength=1.5)


def test_several_requests_run_in_one_unet_batch(sd1: LoadedModel) -> None:
    store = Store()
    first = request(init_image=store.add(picture(2)), sampler="euler", steps=4, strength=0.5, seed=5)
    second = request(init_image=store.add(picture(3)), sampler="euler", steps=4, strength=0.5, seed=9,
                     prompt="a lighthouse", negative_prompt="", count=2)
    calls = []
    hook = sd1.network.unet.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        together = img2img(sd1, [first, second], store.__getitem__)
    finally:
        hook.remove()
    assert calls == [6, 6]  # int(0.5 * 4) = 2 steps, 3 images x (uncond + cond) per call
    alone = img2img(sd1, [second], store.__getitem__)
    for batched, solo in zip(together[1], alone[0], strict=True):
        assert_close_images(batched, solo)
    assert len(together[0]) == 1 and together[0][0].size == (64, 64)


def test_missing_strength_is_a_clear_error(sd1: LoadedModel) -> None:
    store = Store()
    req = request(init_image=store.add(picture(4)), strength=None)
    with pytest.raises(ImageInputError, match=r"needs a strength in \(0, 1\]"):
        img2img(sd1, [req], store.__getitem__)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        request(strength=1.5)


def test_generate_command_img2img_end_to_end(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _ = tiny_checkpoints.get("sd1")
    picture(5, (100, 70)).save(tmp_path / "in.png")
    common = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a red fox", "--steps", "2", "--sampler",
              "ddim", "--seed", "3", "--device", "cpu", "--config", "/dev/null",
              "--init-image", str(tmp_path / "in.png")]
    assert main([*common, "--strength", "0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--strength", "0.5", "--out", str(tmp_path / "b.png")]) == 0
    out = Image.open(tmp_path / "a.png")
    assert out.size == (128, 64)  # no size given: the image's own, rounded to multiples of 64
    assert "Denoising strength: 0.5" in out.info["parameters"]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    assert main([*common, "--strength", "1.5", "--out", str(tmp_path / "c.png")]) == 2
    assert "--strength: Input should be less than or equal to 1 (got 1.5)" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "c.png")]) == 2
    assert "--init-image without --mask needs --strength in (0, 1]" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main([*common[:-1], str(tmp_path / "bad.png"), "--strength", "0.5", "--out", str(tmp_path / "c.png")]) == 2
    assert "the image is not a PNG, JPEG or WebP image" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_run_batch_splits_strengths_and_keeps_order(sd1: LoadedModel) -> None:
    store = Store()
    weak = request(init_image=store.add(picture(6)), sampler="euler", steps=4, strength=0.25, seed=1)
    strong = request(init_image=store.add(picture(7)), sampler="euler", steps=4, strength=0.5, seed=2)
    calls = []
    hook = sd1.network.unet.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        results = run_batch(sd1, [weak, strong, weak.model_copy(update=dict(seed=3))], store.__getitem__)
    finally:
        hook.remove()
    assert calls == [4, 2, 2]  # the two weak ones together for 1 step, then the strong one for 2
    alone = run_batch(sd1, [strong], store.__getitem__)
    assert_close_images(results[1][0], alone[0][0])
    with pytest.raises(ValueError, match="requests of one batch differ in width"):
        run_batch(sd1, [weak, request(width=128)], store.__getitem__)


def test_a_prepared_batch_keeps_its_later_strengths_while_the_next_one_is_prepared(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """Strengths run one after another; the runner prepares the next batch during the first: the
    second strength still takes what was prepared for it, and the images are an unprepared run's."""
    from generation.pipeline import prepare_batch, run_batch

    model = tiny_model(tiny_checkpoints, "sd1")
    store = Store()
    batch = [request(init_image=store.add(picture(2)), sampler="euler", steps=4, strength=0.5, seed=5),
             request(init_image=store.add(picture(3)), sampler="euler", steps=4, strength=0.75, seed=9,
                     prompt="a lighthouse")]
    following = [request(init_image=store.add(picture(4)), prompt="a boat", sampler="euler", steps=4, strength=0.5)]
    calls: list[int] = []
    model.network.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    unprepared = run_batch(model, batch, store.__getitem__)
    prepare_batch(model, batch)
    encoded = len(calls)
    steps: list[int] = []

    def progress(step: int, total: int, x0: torch.Tensor) -> None:
        if not steps:  # during the first strength's first step, as the runner does
            prepare_batch(model, following)
        steps.append(step)

    prepared = run_batch(model, batch, store.__getitem__, progress=progress)
    assert len(calls) == encoded + 1  # only the following batch's text: both strengths took theirs
    assert [[np.array(i).tobytes() for i in r] for r in prepared] == [[np.array(i).tobytes() for i in r] for r in unprepared]
