"""Variations: slerp against its analytic cases, the variation seed's noise, and variation
requests built from the configured strengths."""

from __future__ import annotations

import math

import pytest
import torch

from generation.pipeline import sample_latents
from generation.request import GenerationRequest, Kind
from generation.settings import GenerationSettings
from generation.variations import slerp, variation_noise, variation_request
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.test_img2img import assert_same, start_noise, tiny_model


def make_request(**changes) -> GenerationRequest:
    values = dict(prompt="a fox", model="tiny", sampler="euler", steps=3, guidance=5.0, seed=3, width=64,
                  height=64, count=2)
    return GenerationRequest(**values | changes)


def test_slerp_analytic_cases() -> None:
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a.view(-1)[0], b.view(-1)[1] = 3.0, 3.0  # orthogonal, same norm
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    half = slerp(a, b, 0.5)
    assert torch.allclose(half, (a + b) / math.sqrt(2), atol=1e-6)  # on the circle, not the chord
    third = slerp(a, b, 1 / 3).view(-1)
    assert torch.allclose(third[:2], torch.tensor([3 * math.cos(math.pi / 6), 3 * math.sin(math.pi / 6)]))
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the straight mix


def test_variation_noise_blends_the_second_seed() -> None:
    plain, varied = make_request(), make_request(variation_seed=50, variation_strength=0.25)
    noise = start_noise([3, 4], (4, 8, 8))
    assert torch.equal(variation_noise([plain], noise), noise)
    mixed = variation_noise([varied], noise)
    other = start_noise([50, 51], (4, 8, 8))  # image i blends in variation_seed + i
    assert_same(mixed, slerp(noise, other, 0.25), tolerance=1e-6)
    both = variation_noise([plain, varied], torch.cat([noise, noise]))  # rows follow their request
    assert torch.equal(both[:2], noise) and torch.equal(both[2:], mixed)
    full = variation_noise([make_request(variation_seed=50, variation_strength=1.0)], noise)
    assert_same(full, other, tolerance=1e-5)


def test_full_variation_strength_is_the_variation_seeds_image(tiny_checkpoints: TinyCheckpoints) -> None:
    model = tiny_model(tiny_checkpoints, "sd1")
    varied = sample_latents(model, [make_request(count=1, variation_seed=9, variation_strength=1.0)])
    assert_same(varied, sample_latents(model, [make_request(count=1, seed=9)]), tolerance=1e-4)


@pytest.mark.parametrize(("amount", "strength"), [("subtle", 0.2), ("strong", 0.9)])
def test_variation_requests_use_the_configured_strength(amount: str, strength: float) -> None:
    settings = GenerationSettings(variation_subtle_strength=0.2, variation_strong_strength=0.9)
    source = make_request(variation_seed=5, variation_strength=0.5, count=4)
    varied = variation_request(source, "ab" * 32, amount, seed=1234, settings=settings)
    assert varied.kind is Kind.VARIATION and varied.strength == strength and varied.init_image == "ab" * 32
    assert (varied.prompt, varied.count, varied.seeds()) == (source.prompt, 4, [1234, 1235, 1236, 1237])
    assert varied.variation_seed is None
