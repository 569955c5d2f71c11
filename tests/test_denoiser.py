"""The guided denoiser on fake UNets whose exact answers are known: the VP forward process
x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho)."""

import pytest
import torch

from generation.denoiser import GuidedDenoiser, latent_preview
from generation.samplers import SAMPLERS
from generation.schedules import DiscreteSchedule
from models.families import SD_LATENT_RGB, SDXL_LATENT_RGB
from tests.fixtures.devices import StandInDevice

SCHEDULE = DiscreteSchedule.linear()
B, T, D = 3, 77, 8
SIGMA = torch.tensor([0.05, 2.0, 14.0])


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class OracleUNet:
    """Knows x0 and each row's sigma; answers the true eps or v of whatever input it is given."""

    def __init__(self, x0: torch.Tensor, prediction: str) -> None:
        self.x0, self.prediction = x0, prediction
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_in, t, context))
        copies = x_in.shape[0] // B
        a = (1 / (1 + SIGMA**2)).repeat(copies).view(-1, 1, 1, 1)
        x0 = self.x0.repeat(copies, 1, 1, 1)
        eps = (x_in - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


def denoiser(unet, guidance: list[float], prediction: str = "epsilon", **kwargs) -> GuidedDenoiser:
    cond, uncond = randn(B, T, D, seed=1), randn(B, T, D, seed=2)
    return GuidedDenoiser(unet, SCHEDULE, cond, uncond, torch.tensor(guidance), prediction, **kwargs)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("guidance", [[1.0, 1.0, 1.0], [7.5, 1.0, 0.0]])
def test_epsilon_and_v_outputs_recover_x0_exactly(prediction: str, guidance: list[float]) -> None:
    x0, eps = randn(B, 4, 8, 8, seed=3), randn(B, 4, 8, 8, seed=4)
    unet = OracleUNet(x0, prediction)
    out = denoiser(unet, guidance, prediction)(x0 + SIGMA.view(-1, 1, 1, 1) * eps, SIGMA)
    assert ((out - x0).abs().max() / x0.abs().max()).item() < 2e-6
    _, t, _ = unet.calls[0]
    assert torch.equal(t[:B], SCHEDULE.sigma_to_t(SIGMA))


class LinearUNet:
    """Output depends on input and context, so cond and uncond halves differ."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_in, t, context))
        return 0.5 * x_in[:, :4] + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_guidance_is_one_batched_call_with_per_image_scales() -> None:
    unet = LinearUNet()
    den = denoiser(unet, [7.5, 1.0, 0.0])
    x = randn(B, 4, 8, 8, seed=5)
    out = den(x, SIGMA)
    assert len(unet.calls) == 1
    x_in, t, context = unet.calls[0]
    assert x_in.shape == (2 * B, 4, 8, 8)
    assert torch.equal(context, torch.cat([den.uncond, den.cond]))
    # reference: the two halves separately, out = uncond + g (cond - uncond), x0 = x - sigma * eps
    x_scaled = x / (1 + SIGMA.view(-1, 1, 1, 1) ** 2) ** 0.5
    t_ref = SCHEDULE.sigma_to_t(SIGMA)
    eps_c, eps_u = LinearUNet()(x_scaled, t_ref, den.cond), LinearUNet()(x_scaled, t_ref, den.uncond)
    g = torch.tensor([7.5, 1.0, 0.0]).view(-1, 1, 1, 1)
    expected = x - SIGMA.view(-1, 1, 1, 1) * (eps_u + g * (eps_c - eps_u))
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("g, half", [(1.0, "cond"), (0.0, "uncond")])
def test_guidance_one_or_zero_runs_only_the_half_it_needs(g: float, half: str) -> None:
    unet = LinearUNet()
    den = denoiser(unet, [g] * B)
    x = randn(B, 4, 8, 8, seed=6)
    out = den(x, SIGMA)
    (x_in, _, context), = unet.calls
    assert x_in.shape[0] == B and torch.equal(context, getattr(den, half))
    full = GuidedDenoiser(LinearUNet(), SCHEDULE, den.cond, den.uncond, torch.tensor([g, g, 0.5]))(x, SIGMA)
    assert torch.allclose(out[:2], full[:2], rtol=1e-6, atol=1e-6)  # same as the two-half formula


def test_inpainting_channels_follow_the_scaled_latent_in_both_halves() -> None:
    unet, concat = LinearUNet(), randn(B, 5, 8, 8, seed=7)
    x = randn(B, 4, 8, 8, seed=8)
    denoiser(unet, [5.0, 5.0, 5.0], concat=concat)(x, SIGMA)
    x_in, _, _ = unet.calls[0]
    assert x_in.shape == (2 * B, 9, 8, 8)
    scaled = x / (1 + SIGMA.view(-1, 1, 1, 1) ** 2) ** 0.5
    assert torch.allclose(x_in[:, :4], torch.cat([scaled, scaled]))
    assert torch.equal(x_in[:, 4:], torch.cat([concat, concat]))


def test_cond_and_uncond_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="encode prompts and negative prompts together"):
        GuidedDenoiser(LinearUNet(), SCHEDULE, randn(B, 154, D, seed=1), randn(B, 77, D, seed=2), torch.ones(B))
    with pytest.raises(ValueError, match="one guidance value per image"):
        GuidedDenoiser(LinearUNet(), SCHEDULE, randn(B, 77, D, seed=1), randn(B, 77, D, seed=2), torch.ones(2))


def test_ddim_with_guidance_equals_the_original_guided_loop() -> None:
    """The original DDIMSampler with unconditional_guidance_scale, transcribed, on LinearUNet."""
    steps, unet = 10, LinearUNet()
    cond, uncond = randn(1, T, D, seed=1), randn(1, T, D, seed=2)
    x_T = randn(1, 4, 8, 8, seed=9)
    alphacums = SCHEDULE.alphas_cumprod
    ts = torch.arange(0, 1000, 1000 // steps) + 1
    alphas, alphas_prev = alphacums[ts], torch.cat([alphacums[:1], alphacums[ts[:-1]]])
    x = x_T
    for index in reversed(range(steps)):
        t = ts[index].float().view(1)
        e_u, e_c = unet(x, t, uncond), unet(x, t, cond)
        e_t = e_u + 7.0 * (e_c - e_u)
        pred_x0 = (x - (1 - alphas[index]).sqrt() * e_t) / alphas[index].sqrt()
        x = alphas_prev[index].sqrt() * pred_x0 + (1 - alphas_prev[index]).sqrt() * e_t
    ddim = SAMPLERS["ddim"]
    sigmas = ddim.sigmas(SCHEDULE, steps)
    den = GuidedDenoiser(LinearUNet(), SCHEDULE, cond, uncond, torch.tensor([7.0]))
    ours = ddim.sample(den, x_T * ddim.start_scale(float(sigmas[0])), sigmas, noise=lambda: torch.zeros(()))
    assert ((ours - x).abs().max() / x.abs().max()).item() < 2e-6


def test_latent_preview_is_a_linear_projection_to_uint8_rgb() -> None:
    factors = SD_LATENT_RGB
    assert torch.equal(latent_preview(torch.zeros(4, 2, 3), factors), torch.full((2, 3, 3), 128, dtype=torch.uint8))
    # the latent whose projection is pure red (1, -1, -1) in [-1, 1] previews as (255, 0, 0)
    red = torch.linalg.lstsq(torch.tensor(factors).T, torch.tensor([1.0, -1.0, -1.0])).solution
    assert latent_preview(red.view(4, 1, 1).expand(4, 2, 2), factors).tolist() == [[[255, 0, 0]] * 2] * 2
    # the same latent through SDXL's factors is another colour: each family previews its own space
    assert latent_preview(red.view(4, 1, 1), SDXL_LATENT_RGB).tolist() != [[[255, 0, 0]]]
    with pytest.raises(ValueError, match=r"shape \(4, h, w\)"):
        latent_preview(torch.zeros(1, 4, 8, 8), factors)


class GaussianDataUNet:
    """A UNet for data ~ N(0.3, 0.5^2) per value: the exact eps or v of its VP input, reading the
    noise level back from the timestep it is given."""

    def __init__(self, prediction: str) -> None:
        self.prediction = prediction

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sigma = SCHEDULE.t_to_sigma(t).view(-1, 1, 1, 1)
        a = 1 / (1 + sigma**2)
        x_ve = x_in / a.sqrt()
        x0 = (0.25 * x_ve + sigma**2 * 0.3) / (0.25 + sigma**2)
        eps = (x_ve - x0) / sigma
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler", "ddim"])
def test_sampling_through_the_unet_equals_sampling_the_exact_denoiser(prediction: str, name: str) -> None:
    """sigma -> t -> sigma, input scaling and output conversion are lossless inside a whole run."""
    sampler = SAMPLERS[name]
    sigmas = sampler.sigmas(SCHEDULE, 20)
    x = randn(B, 4, 8, 8, seed=10) * sampler.start_scale(float(sigmas[0]))

    def exact(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return (0.25 * x + s2 * 0.3) / (0.25 + s2)

    den = denoiser(GaussianDataUNet(prediction), [6.0, 1.0, 0.0], prediction)
    ours = sampler.sample(den, x, sigmas, noise=lambda: torch.zeros(()))
    reference = sampler.sample(exact, x, sigmas, noise=lambda: torch.zeros(()))
    assert ((ours - reference).abs().max() / reference.abs().max()).item() < 2e-6


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "ddim", "unipc", "euler_a"])
@pytest.mark.parametrize("guidance", [[7.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
def test_sampling_steps_never_wait_on_the_device(sampler: str, guidance: list[float]) -> None:
    # The noise source here draws on the device, so nothing at all may cross between host and device.
    meta = torch.device("meta")
    guided = GuidedDenoiser(LinearUNet(), SCHEDULE, randn(B, T, D, seed=1).to(meta),
                            randn(B, T, D, seed=2).to(meta), torch.tensor(guidance))
    chosen = SAMPLERS[sampler]
    sigmas = chosen.sigmas(SCHEDULE, 6)
    noise = lambda: torch.empty(B, 4, 8, 8, device=meta)  # noqa: E731
    with StandInDevice() as device:
        out = chosen.sample(guided, torch.empty(B, 4, 8, 8, device=meta), sigmas, noise=noise)
    assert out.shape == (B, 4, 8, 8) and device.traffic == []


@pytest.mark.parametrize("guidance", [[7.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
def test_rows_no_longer_live_leave_the_unet_batch_and_keep_their_latent(guidance: list[float]) -> None:
    """Issue 12: a cancelled job's rows are dropped from the UNet call (with their context, scale
    and concat rows); the live rows get exactly the prediction of the full batch (this UNet's
    math is per row), the dropped ones their own latent."""
    unet, concat, x = LinearUNet(), randn(B, 5, 8, 8, seed=7), randn(B, 4, 8, 8, seed=8)
    full = denoiser(unet, guidance, concat=concat)(x, SIGMA)
    live: list[int] | None = [0, 2]
    den = denoiser(unet, guidance, concat=concat, live=lambda: live)
    out = den(x, SIGMA)
    x_in, t, context = unet.calls[-1]
    copies = x_in.shape[0] // 2
    assert x_in.shape[0] == copies * 2 and torch.equal(x_in[:2, 4:], concat[[0, 2]])
    assert torch.equal(t[:2], SCHEDULE.sigma_to_t(SIGMA[[0, 2]]))
    assert torch.equal(context[-2:], den.cond[[0, 2]])
    assert torch.allclose(out[[0, 2]], full[[0, 2]], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], x[1])
    live = []  # every row dropped (cancelled between the sampler's check and this call)
    calls = len(unet.calls)
    assert torch.equal(den(x, SIGMA), x) and len(unet.calls) == calls
    live = None
    assert torch.allclose(den(x, SIGMA), full, rtol=1e-6, atol=1e-6)


class VectorUNet(LinearUNet):
    """LinearUNet that takes ADM vectors `y` too (SDXL) and records them."""

    def __init__(self) -> None:
        super().__init__()
        self.vectors: list[torch.Tensor] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.vectors.append(y)
        return super().__call__(x_in, t, context) + y.mean(dim=1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("guidance", [[7.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
def test_live_rows_are_gathered_once_per_live_set_and_again_after_another_cancel(guidance: list[float]) -> None:
    """While the live rows stay the same, every UNet call gets the very tensors gathered at the
    first (context and ADM vectors, halves already concatenated); a further cancel gathers the
    rows left, whose predictions still equal the full batch's."""
    unet, concat, x = VectorUNet(), randn(B, 5, 8, 8, seed=7), randn(B, 4, 8, 8, seed=8)
    vectors = {"vector": randn(B, 6, seed=9), "vector_uncond": randn(B, 6, seed=10)}
    full = denoiser(unet, guidance, concat=concat, **vectors)(x, SIGMA)
    live = [0, 2]
    den = denoiser(unet, guidance, concat=concat, live=lambda: live, **vectors)
    den(x, SIGMA)
    context, vector = unet.calls[-1][2], unet.vectors[-1]
    out = den(x, SIGMA)
    assert unet.calls[-1][2] is context and unet.vectors[-1] is vector
    assert torch.allclose(out[[0, 2]], full[[0, 2]], rtol=1e-6, atol=1e-6)

    live = [2]  # the second cancel
    out = den(x, SIGMA)
    x_in, _, again = unet.calls[-1]
    assert again is not context and again.shape[0] == context.shape[0] // 2
    assert torch.equal(again[-1], den.cond[2]) and torch.equal(unet.vectors[-1][-1], vectors["vector"][2])
    assert torch.equal(x_in[:1, 4:], concat[[2]])
    assert torch.allclose(out[2], full[2], rtol=1e-6, atol=1e-6) and torch.equal(out[:2], x[:2])
    den(x, SIGMA)
    assert unet.calls[-1][2] is again
