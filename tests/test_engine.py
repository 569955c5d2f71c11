"""generation/engine.py: queue jobs in, PNGs with their parameters out, the same pixels as the
txt2img pipeline (checked against diffusers in test_pipeline) whatever the batch."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from generation.engine import Engine
from generation.metadata import parameters_text
from generation.pipeline import sample_latents, txt2img
from generation.queue import Job
from generation.request import GenerationRequest, Kind
from generation.settings import ModelSettings
from models.loading import inspect_checkpoint
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: TinyCheckpoints) -> Engine:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    settings = ModelSettings(name="tiny", checkpoint=path, config=yaml_path)
    return Engine([settings], "float32", INPUTS.__getitem__, preview=True)


def png_of(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


#: Stored input images by sha256, as storage hands them to the engine.
SOURCE = png_of((30, 120, 200))
INPUTS = {hashlib.sha256(SOURCE).hexdigest(): SOURCE}


def job(job_id: str, **changes: object) -> Job:
    values = dict(prompt="a red fox", negative_prompt="blurry", model="tiny", sampler="euler", steps=3,
                  guidance=5.0, seed=7, width=64, height=64, count=2)
    return Job(job_id, GenerationRequest(**values | changes), owner_id=1, guild_id=None, weight=1.0, seq=0)


def decoded(image: Image.Image) -> tuple[np.ndarray, str]:
    return np.asarray(image.convert("RGB")), image.info["parameters"]


def test_batch_gives_each_job_the_pipelines_pixels_and_its_parameters(engine: Engine) -> None:
    model = engine.load("tiny", "cpu")
    first, second = job("aaaaaaaaaaaa"), job("bbbbbbbbbbbb", prompt="a blue bird", seed=100, count=1)
    steps: list[tuple[str, int, int, tuple[int, int]]] = []
    results = engine.run(model, "cpu", [first, second],
                         lambda j, s, t, p: steps.append((j, s, t, p.size)), lambda _: False)

    assert [r.job_id for r in results] == [first.id, second.id]
    assert [r.seeds for r in results] == [(7, 8), (100,)]
    for result, queued in zip(results, (first, second), strict=True):
        (alone,) = txt2img(model, [queued.request])  # the job run by itself
        assert result.error is None and len(result.images) == queued.request.count
        for result_image, image, seed in zip(result.images, alone, result.seeds, strict=True):
            pixels, parameters = decoded(result_image)
            assert np.abs(pixels.astype(int) - np.asarray(image).astype(int)).max() <= 1
            assert parameters == parameters_text(queued.request, seed, model.short_hash)
    # Latent previews (64 px / the tiny VAE's factor 2) after every step, for both jobs.
    assert steps == [(j, s, 3, (32, 32)) for s in (1, 2, 3) for j in (first.id, second.id)]


def test_previews_are_read_back_from_the_device_at_most_once_per_interval(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    now = [0.0]
    engine = Engine([ModelSettings(name="tiny", checkpoint=path, config=yaml_path)], "float32",
                    INPUTS.__getitem__, preview=True, preview_every_s=10.0, clock=lambda: now[0])
    model = engine.load("tiny", "cpu")
    previews: list[tuple[int, Image.Image]] = []

    def progress(job_id: str, step: int, total: int, preview: Image.Image) -> None:
        previews.append((step, preview))
        now[0] += 4.0  # each step takes 4 s: fresh previews at steps 1 and 4 (0 s and 12 s)

    engine.run(model, "cpu", [job("eeeeeeeeeeee", steps=5, count=1)], progress, lambda _: False)
    fresh = [step for (step, preview), (_, before) in zip(previews, [(0, None), *previews]) if preview is not before]
    assert fresh == [1, 4] and [step for step, _ in previews] == [1, 2, 3, 4, 5]
    assert previews[1][1] is previews[0][1] and previews[4][1] is previews[3][1]


def test_cancelled_batch_stops_and_img2img_reads_its_stored_input(engine: Engine) -> None:
    model = engine.load("tiny", "cpu")
    calls: list[int] = []
    results = engine.run(model, "cpu", [job("cccccccccccc")], lambda *a: calls.append(a[1]), lambda _: True)
    assert results == [] and calls == []

    sha = next(iter(INPUTS))
    remix = job("dddddddddddd", kind=Kind.IMG2IMG, init_image=sha, strength=0.5, steps=4, count=1)
    (result,) = engine.run(model, "cpu", [remix], lambda *a: None, lambda _: False)
    pixels, parameters = decoded(result.images[0])
    assert result.error is None and pixels.shape == (64, 64, 3)
    assert parameters == parameters_text(remix.request, 7, model.short_hash)
    assert "Denoising strength: 0.5" in parameters


def test_cancelling_every_job_of_one_strength_leaves_the_other_strengths_running(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """`run_batch` runs one UNet batch per strength; those whose jobs were all cancelled stop, and
    the others finish with the images they would have had alone (the queue never batches two
    strengths today; without previews, which assume one UNet batch)."""
    path, yaml_path = tiny_checkpoints.get("sd1")
    engine = Engine([ModelSettings(name="tiny", checkpoint=path, config=yaml_path)], "float32", INPUTS.__getitem__)
    model, sha = engine.load("tiny", "cpu"), next(iter(INPUTS))
    remixes = [job(job_id, kind=Kind.IMG2IMG, init_image=sha, strength=strength, steps=4, count=1)
               for job_id, strength in (("ffffffffffff", 0.5), ("gggggggggggg", 0.75))]
    results = engine.run(model, "cpu", remixes, lambda *a: None, lambda job_id: job_id == "gggggggggggg")
    (alone,) = engine.run(model, "cpu", remixes[:1], lambda *a: None, lambda _: False)
    assert [r.job_id for r in results] == ["ffffffffffff"]
    assert np.array_equal(decoded(results[0].images[0])[0], decoded(alone.images[0])[0])


def test_size_counts_every_weight_byte_and_unknown_models_are_named(engine: Engine) -> None:
    model = engine.load("tiny", "cpu")
    expected = sum(p.numel() * 4 for p in model.network.state_dict().values() if p.dtype == torch.float32)
    assert Engine.size(model) >= expected > 0
    with pytest.raises(KeyError, match="unknown model 'nope'; configured: tiny"):
        engine.load("nope", "cpu")


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_native_size_read_from_the_file_matches_the_loaded_model(
        tiny_checkpoints: TinyCheckpoints, family: str) -> None:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get(family)
    settings = ModelSettings(name=family, checkpoint=path, config=yaml_path)
    loaded = Engine([settings], "float32", INPUTS.__getitem__).load(family, "cpu")
    assert inspect_checkpoint(path, yaml_path).native_size == loaded.native_size == {"sd1": 128, "sd2-v": 192}[family]


def test_jobs_with_a_lora_are_refused_or_drawn_with_their_hashes(tiny_checkpoints: TinyCheckpoints,  # noqa: F811
                                                                 tmp_path) -> None:
    from generation.addons import AddonError, AddonLibrary
    from tests.fixtures.addons import lora_modules, random_lora, write_lora
    from tests.fixtures.checkpoints import tiny_family

    write_lora(tmp_path / "style.safetensors", random_lora(lora_modules(tiny_family("sd1"))))
    library = AddonLibrary(tmp_path, None)
    path, yaml_path = tiny_checkpoints.get("sd1")
    engine = Engine([ModelSettings(name="tiny", checkpoint=path, config=yaml_path)], "float32",
                    INPUTS.__getitem__, addons=library)
    model = engine.load("tiny", "cpu")
    (result,) = engine.run(model, "cpu", [job("cccccccccccc", prompt="a fox <lora:style:0.5>", count=1)],
                           lambda *_: None, lambda _: False)
    hash_ = library.short_hash(library.loras()["style"])
    assert decoded(result.images[0])[1].endswith(f', Lora hashes: "style: {hash_}"')
    with pytest.raises(AddonError, match="unknown LoRA 'stlye'; did you mean style"):
        engine.run(model, "cpu", [job("dddddddddddd", prompt="<lora:stlye>")], lambda *_: None, lambda _: False)


def test_fuse_projections_reaches_the_loaded_unet_and_keeps_the_pixels(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd2-v")
    settings = ModelSettings(name="tiny", checkpoint=path, config=yaml_path)
    fused, plain = (Engine([settings], "float32", INPUTS.__getitem__, fuse_projections=fuse).load("tiny", "cpu")
                    for fuse in (True, False))
    assert fused.network.unet.fused_rows() and not plain.network.unet.fused_rows()
    assert Engine.size(fused) == Engine.size(plain)
    request = job("a", count=1).request
    fused_latents, plain_latents = (sample_latents(model, [request]) for model in (fused, plain))
    torch.testing.assert_close(fused_latents, plain_latents, rtol=0, atol=1e-5)


def test_cached_steps_reach_the_run_and_are_named_in_the_parameters(
        tiny_checkpoints: TinyCheckpoints, engine: Engine) -> None:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    settings = ModelSettings(name="tiny", checkpoint=path, config=yaml_path)
    cached = Engine([settings], "float32", INPUTS.__getitem__, step_cache_interval=3).load("tiny", "cpu")
    exact = engine.load("tiny", "cpu")
    assert cached.step_cache_interval == 3 and exact.step_cache_interval == 1
    (with_cache,), (without,) = (e.run(m, "cpu", [job("a", count=1)], lambda *_: None, lambda _: False)
                                 for e, m in ((engine, cached), (engine, exact)))
    assert with_cache.images[0].info["parameters"].endswith("Model: tiny, Step cache: 3")
    assert "Step cache" not in without.images[0].info["parameters"]
    assert not np.array_equal(decoded(with_cache.images[0])[0], decoded(without.images[0])[0])
