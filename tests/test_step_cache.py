"""generation/step_cache.py through the pipeline: interval 1 is bitwise the exact path; interval N
runs a full call that keeps the deep feature on the first call and every N-th one after, shallow
calls between (calls counted, not steps); a cancelled request leaving the batch forces the next
call full; tiled runs (upscales) are never cached. (The split itself: tests/test_models_unet.py;
the compiled keys: tests/test_compiled.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest
import torch
from PIL import Image
from torch import Tensor

from generation.pipeline import LoadedModel, load_model, run_batch, sample_latents
from generation.request import GenerationRequest
from generation.settings import GenerationSettings, ModelSettings
from generation.step_cache import StepCache, UNetCalls
from tests.fixtures.checkpoints import TinyCheckpoints, TinySDXL, tiny_checkpoints, tiny_sdxl  # noqa: F401


class Recording:
    """`UNetCalls` of a model, recording which call each was ("exact", "keep", "shallow") and its rows."""

    def __init__(self, calls: UNetCalls) -> None:
        self.calls = calls
        self.kinds: list[str] = []
        self.rows: list[int] = []

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 deep: Tensor | None = None, keep: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        self.kinds.append("shallow" if deep is not None else "keep" if keep else "exact")
        self.rows.append(x.shape[0])
        return self.calls(x, timesteps, context, y, deep=deep, keep=keep)


def recorded(model: LoadedModel, interval: int) -> tuple[LoadedModel, Recording]:
    recording = Recording(UNetCalls(model.network.unet))
    return dataclasses.replace(model, unet=recording, step_cache_interval=interval), recording


def request(**changes: object) -> GenerationRequest:
    values = dict(prompt="a red fox", negative_prompt="blurry", model="tiny", sampler="euler", steps=7,
                  guidance=5.0, seed=7, width=64, height=64, count=1)
    return GenerationRequest(**values | changes)


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints: TinyCheckpoints) -> LoadedModel:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    return load_model(ModelSettings(name="tiny", checkpoint=path, config=yaml_path), torch.device("cpu"),
                      torch.float32)


def test_interval_one_is_bitwise_the_exact_path(sd1: LoadedModel) -> None:
    """The exact path as it was before cached steps: the UNet module's own forward, nothing else."""
    unet = sd1.network.unet

    def plain(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, deep: None = None,
              keep: bool = False) -> Tensor:
        assert deep is None and not keep
        return unet(x, t, context, y)

    model, recording = recorded(sd1, 1)
    got = sample_latents(model, [request()])
    assert recording.kinds == ["exact"] * 7
    assert torch.equal(got, sample_latents(dataclasses.replace(sd1, unet=plain), [request()]))
    assert torch.equal(got, sample_latents(sd1, [request()]))  # the default model: interval 1, eager


@pytest.mark.parametrize(("sampler", "steps", "interval", "calls"), [
    ("euler", 7, 3, "KSSKSSK"),
    ("euler", 5, 2, "KSKSK"),
    # Heun calls the model twice per step but the last: 2 * 4 - 1 calls, counted as calls
    ("heun", 4, 3, "KSSKSSK"),
])
def test_every_nth_call_is_full_and_the_others_shallow(
        sd1: LoadedModel, sampler: str, steps: int, interval: int, calls: str) -> None:
    model, recording = recorded(sd1, interval)
    exact = sample_latents(sd1, [request(sampler=sampler, steps=steps)])
    got = sample_latents(model, [request(sampler=sampler, steps=steps)])
    assert "".join(kind[0].upper() for kind in recording.kinds) == calls
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max() > 1e-4  # approximate: not the exact path's latents


def test_a_cancel_mid_batch_makes_the_next_call_full(sd1: LoadedModel) -> None:
    """Two requests share the batch (2 images, guided: 4 UNet rows); the second is cancelled
    after the 2nd call: the 3rd call, a shallow one on the old rows' feature otherwise, is full on
    the 2 remaining rows, and the schedule counts on from it."""
    model, recording = recorded(sd1, 3)
    requests = [request(), request(prompt="a blue bird", seed=100)]
    latents = sample_latents(model, requests, cancelled=lambda i: i == 1 and len(recording.kinds) >= 2)
    assert "".join(kind[0].upper() for kind in recording.kinds) == "KSKSSKS"
    assert recording.rows == [4, 4, 2, 2, 2, 2, 2]
    alone, _ = recorded(sd1, 3)
    first = sample_latents(alone, [request()])
    # the first request's schedule but for the full 3rd call: not its solo run's latents
    assert torch.isfinite(latents).all() and latents.shape == (2, 4, 32, 32)
    assert not torch.equal(latents[:1], first)


def test_a_call_of_another_shape_is_full() -> None:
    """(Not reached by the pipelines, whose whole-latent calls keep one shape per run.)"""
    kinds: list[str] = []

    def unet(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, deep: Tensor | None = None,
             keep: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        kinds.append("S" if deep is not None else "K")
        return (x, x) if keep else x

    cache, rows = StepCache(3), object()
    for side in (8, 8, 16, 16, 16, 16):
        x = torch.zeros(2, 4, side, side)
        assert cache(unet, rows, x, torch.zeros(2), torch.zeros(2, 7, 8)) is x
    assert "".join(kinds) == "KSKSSK"


def test_sdxl_runs_cached_steps_with_its_adm_vectors(tiny_sdxl: TinySDXL) -> None:  # noqa: F811
    path, yaml_path = tiny_sdxl.get("sdxl")
    xl = load_model(ModelSettings(name="xl", checkpoint=path, config=yaml_path), torch.device("cpu"), torch.float32)
    model, recording = recorded(xl, 2)
    got = sample_latents(model, [request(model="xl", steps=4)])
    assert "".join(kind[0].upper() for kind in recording.kinds) == "KSKS" and torch.isfinite(got).all()


def test_upscales_run_on_tiles_and_are_never_cached(sd1: LoadedModel) -> None:
    """hires: img2img over tiles; `GuidedDenoiser.tile` never uses the run's step cache."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    stored = {hashlib.sha256(buffer.getvalue()).hexdigest(): buffer.getvalue()}
    model, recording = recorded(sd1, 3)
    upscale = request(kind="upscale", init_image=next(iter(stored)), upscale_factor=2, strength=0.5, width=64,
                      height=64, steps=4)
    (images,) = run_batch(model, [upscale], stored.__getitem__)
    assert images[0].size == (128, 128) and recording.kinds and set(recording.kinds) == {"exact"}


def test_the_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="step cache interval must be 1 to 5, got 6"):
        StepCache(6)
    assert GenerationSettings().step_cache_interval == 1  # off by default: the exact path
    with pytest.raises(ValueError, match="less than or equal to 5"):
        GenerationSettings(step_cache_interval=6)
