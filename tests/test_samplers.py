"""Samplers against three independent references: transcriptions of the original DDIM and PLMS
loops, diffusers' multistep schedulers (test-only oracle), and Gaussian data, whose exact denoiser
and exact ODE / SDE endpoints are analytic."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from generation.request import SAMPLER_NAMES, UNET_CALLS_PER_STEP
from generation.samplers import SAMPLERS, BatchNoise, Cancelled, lms_coefficients
from generation.schedules import DiscreteSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 notice

SCHEDULE = DiscreteSchedule.linear()
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (4, 16, 16)
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
STOCHASTIC = ["euler_a", "dpmpp_sde_karras"]
FIRST_ORDER = {"ddim", "euler"}
SECOND_ORDER = {"plms", "heun", "lms", "dpmpp_2m_karras"}  # asymptotically; dpmpp_2m and unipc
# are second order too, but their spacings (uniform in t) are not yet asymptotic at 192 steps

# Data: every latent value ~ N(MU, S^2); its exact denoiser is the posterior mean.
MU, S = 0.3, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def exact_ode_endpoint(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE keeps (x - MU) / sqrt(S^2 + sigma^2) constant; returned as the VP
    latent at sigma_end, as the samplers return it."""
    x_end = MU + (x_start - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2)
    return x_end / math.sqrt(1 + sigma_end**2)


def no_noise() -> torch.Tensor:
    raise AssertionError("a deterministic sampler drew noise")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def start(name: str, steps: int, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, BatchNoise]:
    """Pure-noise start of a txt2img run, its sigmas, and the per-step noise that follows."""
    sampler = SAMPLERS[name]
    sigmas = sampler.sigmas(SCHEDULE, steps)
    noise = BatchNoise(seeds, SHAPE, "cpu", torch.float32)
    return noise.initial() * sampler.start_scale(float(sigmas[0])), sigmas, noise


def test_the_table_implements_exactly_the_request_names() -> None:
    assert tuple(SAMPLERS) == SAMPLER_NAMES


# --- the original DDIM and PLMS loops, transcribed (eta 0), on a fake eps model -----------------


def fake_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed random channel-mixing map whose output depends on the timestep, as a UNet's does."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 4
    scale = (0.5 + t.float() / 1000).view(-1, 1, 1, 1)
    mixed = (w.view(1, 4, 4, 1, 1) * x.unsqueeze(1)).sum(dim=2)  # (B, 4, H, W)
    return mixed * scale + 0.1 * torch.sin(t.float() / 50).view(-1, 1, 1, 1)


def ve_denoiser(eps_model, schedule: DiscreteSchedule):
    """k-diffusion's CompVisDenoiser: VE x in, x0 out, the eps model run on the VP input."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        return x - s * eps_model(x / (1 + s**2) ** 0.5, schedule.sigma_to_t(sigma))

    return denoise


def original_loop(x_T: torch.Tensor, steps: int, plms: bool) -> torch.Tensor:
    """The update loops of ldm/models/diffusion/{ddim,plms}.py with eta 0, float32 buffers."""
    alphacums = SCHEDULE.alphas_cumprod
    ddim_timesteps = torch.tensor(list(range(0, 1000, 1000 // steps))) + 1
    ddim_timesteps = ddim_timesteps[ddim_timesteps < 1000]
    alphas = alphacums[ddim_timesteps]
    alphas_prev = torch.cat([alphacums[:1], alphacums[ddim_timesteps[:-1]]])
    sqrt_one_minus_alphas = (1.0 - alphas).sqrt()
    time_range = ddim_timesteps.flip(0)
    total = len(time_range)
    x, old_eps = x_T, []

    def x_prev_of(x: torch.Tensor, e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i, step in enumerate(time_range):
        index = total - i - 1
        ts = torch.full((x.shape[0],), int(step), dtype=torch.long)
        e_t = fake_eps(x, ts)
        if not plms:
            x = x_prev_of(x, e_t, index)
            continue
        ts_next = torch.full((x.shape[0],), int(time_range[min(i + 1, total - 1)]), dtype=torch.long)
        if len(old_eps) == 0:
            e_t_prime = (e_t + fake_eps(x_prev_of(x, e_t, index), ts_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_t_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@pytest.mark.parametrize("name", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [2, 7, 30, 50])
def test_ddim_and_plms_equal_the_original_loops(name: str, steps: int) -> None:
    x_T = BatchNoise([3, 4], SHAPE, "cpu", torch.float32).initial()  # VP noise, as the original starts
    sampler = SAMPLERS[name]
    sigmas = sampler.sigmas(SCHEDULE, steps)
    x = x_T * sampler.start_scale(float(sigmas[0]))
    ours = sampler.sample(ve_denoiser(fake_eps, SCHEDULE), x, sigmas, noise=no_noise)
    assert rel_err(ours, original_loop(x_T, steps, plms=name == "plms")) < 2e-6


# --- diffusers' multistep schedulers as oracles for DPM-Solver++(2M) and UniPC ------------------


def diffusers_loop(scheduler, steps: int, x_vp: torch.Tensor) -> torch.Tensor:
    """Run a diffusers VP scheduler with the exact Gaussian eps model at the sigma it steps from."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.step_index or 0]
        x_ve = x_vp * (1 + sigma**2) ** 0.5
        eps = (x_ve - gaussian_denoiser(x_ve, sigma.view(1))) / sigma
        x_vp = scheduler.step(eps, t, x_vp).prev_sample
    return x_vp


@pytest.mark.parametrize("steps", [4, 12, 25])
@pytest.mark.parametrize(
    "name, scheduler",
    [
        ("dpmpp_2m_karras", lambda: DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)),
        ("unipc", lambda: UniPCMultistepScheduler(**SD)),
    ],
)
def test_multistep_samplers_equal_diffusers(name: str, scheduler, steps: int) -> None:
    x_vp = BatchNoise([11, 12], SHAPE, "cpu", torch.float32).initial()
    sigmas = SAMPLERS[name].sigmas(SCHEDULE, steps)
    ours = SAMPLERS[name].sample(gaussian_denoiser, x_vp * (1 + sigmas[0] ** 2) ** 0.5, sigmas, noise=no_noise)
    assert rel_err(ours, diffusers_loop(scheduler(), steps, x_vp)) < 1e-5


# --- Gaussian data: known answers ----------------------------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name: str) -> None:
    """Error at 12, 48, 192 steps. Schedules ending at 0 are stopped at their last nonzero sigma:
    their final jump sigma_min -> 0 is a fixed first-order step (x = D(x, sigma_min)) that no step
    count refines, so it would hide the solver's convergence."""
    errors = []
    for steps in (12, 48, 192):
        x, sigmas, _ = start(name, steps, [0, 1])
        sigmas = sigmas[:-1] if sigmas[-1] == 0 else sigmas
        out = SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=no_noise)
        errors.append(rel_err(out, exact_ode_endpoint(x, float(sigmas[0]), float(sigmas[-1]))))
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    if name in SECOND_ORDER:
        assert errors[1] > 8 * errors[2], errors
    assert errors[2] < (1.5e-2 if name in FIRST_ORDER else 6e-3), errors


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_run_on_a_tail_of_their_schedule(name: str) -> None:
    """img2img: the last 200 of 400 steps, from x0 + sigma * noise; multistep methods must start
    without history. Stopped at the last nonzero sigma, as in the convergence test."""
    sigmas = SAMPLERS[name].sigmas(SCHEDULE, 400)[-201:]
    sigmas = sigmas[:-1] if sigmas[-1] == 0 else sigmas
    noise = BatchNoise([5], SHAPE, "cpu", torch.float32)
    x = MU + S * noise.initial() + float(sigmas[0]) * noise()
    out = SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=no_noise)
    error = rel_err(out, exact_ode_endpoint(x, float(sigmas[0]), float(sigmas[-1])))
    assert error < (1e-2 if name in FIRST_ORDER else 3e-3), error


@pytest.mark.parametrize(
    "name, step_counts, final_bias",
    [("euler_a", (10, 40, 160), 0.025), ("dpmpp_sde_karras", (4, 8, 16, 64), 0.005)],
)
def test_stochastic_samplers_converge_to_the_data_distribution(
    name: str, step_counts: tuple[int, ...], final_bias: float
) -> None:
    """The exact reverse SDE from N(0, sigma_max^2) ends at N(MU (1 - k), S^2 (1 - k^2)) with
    k = S^2 / (S^2 + sigma_max^2) (Gaussian algebra). Ancestral steps are weakly first order: the
    std's bias must shrink with the step count and end within final_bias (plus 4 standard errors;
    16384 samples). euler_a's bias is 0.15 at 10 steps; the mean is right at every count."""
    seeds = list(range(100, 116))
    std_errors = []
    for steps in step_counts:
        x, sigmas, noise = start(name, steps, seeds)
        out = SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=noise)
        k = S**2 / (S**2 + float(sigmas[0]) ** 2)
        mean, std = MU * (1 - k), S * math.sqrt(1 - k**2)
        standard_error = std / math.sqrt(out.numel())
        assert abs(out.mean().item() - mean) < 4 * standard_error, steps
        std_errors.append(abs(out.std().item() - std))
    assert std_errors[0] > std_errors[1] > std_errors[2], std_errors  # biases well above sampling error
    assert std_errors[-1] < 4 * standard_error / math.sqrt(2) + final_bias, std_errors


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_use_the_noise_they_are_given(name: str) -> None:
    x, sigmas, noise = start(name, 10, [1])
    _, _, other_noise = start(name, 10, [2])
    first = SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=noise)
    assert not torch.allclose(first, SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=other_noise))


# --- seeds: the noise contract and batch-composition independence --------------------------------


def test_batch_noise_follows_the_seed_contract() -> None:
    noise = BatchNoise([7, 42], (4, 8, 8), "cpu", torch.float64)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (7, 42)]
    first = [torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32) for g in generators]
    second = [torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32) for g in generators]
    initial, step = noise.initial(), noise()
    assert initial.dtype == torch.float64 and initial.shape == (2, 4, 8, 8)
    assert torch.equal(initial, torch.cat(first).double())
    assert torch.equal(step, torch.cat(second).double())


@pytest.mark.parametrize("name", STOCHASTIC)
def test_an_image_depends_on_its_seed_not_on_its_batch(name: str) -> None:
    def render(seeds: list[int]) -> torch.Tensor:
        x, sigmas, noise = start(name, 8, seeds)
        return SAMPLERS[name].sample(gaussian_denoiser, x, sigmas, noise=noise)

    alone = render([6])[0]
    assert torch.equal(render([5, 6])[1], alone)
    assert torch.equal(render([6, 9, 1])[0], alone)
    assert not torch.equal(render([5])[0], alone)


# --- cancellation and progress -------------------------------------------------------------------


class CountingDenoiser:
    def __init__(self) -> None:
        self.calls = 0
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.outputs.append(gaussian_denoiser(x, sigma))
        return self.outputs[-1]


@pytest.mark.parametrize("name, calls_per_step", [("euler", 1), ("heun", 2), ("dpmpp_sde_karras", 2), ("unipc", 1)])
def test_cancellation_is_checked_before_every_model_call(name: str, calls_per_step: int) -> None:
    denoiser = CountingDenoiser()
    x, sigmas, noise = start(name, 10, [1])
    with pytest.raises(Cancelled):
        SAMPLERS[name].sample(denoiser, x, sigmas, noise=noise, cancelled=lambda: denoiser.calls >= calls_per_step + 1)
    assert denoiser.calls == calls_per_step + 1  # stopped inside the second step, not at its end


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_the_queue_charges_each_sampler_for_the_unet_calls_it_makes(name: str) -> None:
    denoiser = CountingDenoiser()
    x, sigmas, noise = start(name, 10, [1])
    SAMPLERS[name].sample(denoiser, x, sigmas, noise=noise)
    assert round(denoiser.calls / (len(sigmas) - 1)) == UNET_CALLS_PER_STEP.get(name, 1)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_progress_reports_every_step_with_its_x0_prediction(name: str) -> None:
    denoiser, reports = CountingDenoiser(), []
    x, sigmas, noise = start(name, 5, [2])
    SAMPLERS[name].sample(denoiser, x, sigmas, noise=noise, progress=lambda i, n, x0: reports.append((i, n, x0)))
    total = len(sigmas) - 1
    assert [(i, n) for i, n, _ in reports] == [(i, total) for i in range(1, total + 1)]
    # each step reports the prediction of its first model call, in order
    calls = [next(k for k, o in enumerate(denoiser.outputs) if o is x0) for _, _, x0 in reports]
    assert calls[0] == 0 and calls == sorted(set(calls))


# --- linear multistep coefficients ----------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_polynomials_exactly(order: int) -> None:
    s = [14.6, 9.1, 5.3, 2.2, 0.9, 0.0]
    i = 4
    for degree in range(order):
        p = lambda u: u**degree  # noqa: E731
        exact = (s[i + 1] ** (degree + 1) - s[i] ** (degree + 1)) / (degree + 1)
        quadrature = sum(c * p(s[i - j]) for j, c in enumerate(lms_coefficients(s, i, order)))
        assert quadrature == pytest.approx(exact, rel=1e-12, abs=1e-12)
