"""Schedules and step spacings against diffusers' schedulers (test-only oracle) and the original
numpy formula."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from generation.schedules import (
    DiscreteSchedule,
    alphas_cumprod,
    ddim_sigmas,
    ddim_timesteps,
    discrete_sigmas,
    karras_sigmas,
    uniform_sigmas,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 notice

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative equality. diffusers accumulates alphas_cumprod in float32, the original in float64;
    sigma = sqrt((1 - a) / a) amplifies that 1e-6 by 1 / (1 - a) near t = 0, hence 1e-5 for sigmas."""
    actual, expected = actual.double(), torch.as_tensor(np.asarray(expected)).double()
    assert actual.shape == expected.shape
    err = ((actual - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
    assert err < rtol, f"max relative error {err}"


def test_alphas_cumprod_is_the_original_numpy_formula() -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    expected = np.cumprod(1.0 - betas).astype(np.float32)
    assert torch.equal(alphas_cumprod(0.00085, 0.012, 1000), torch.from_numpy(expected))


def test_alphas_cumprod_match_diffusers(schedule: DiscreteSchedule) -> None:
    # diffusers multiplies in float32, the original in float64: equal up to float32 rounding
    assert_rel(schedule.alphas_cumprod, DDIMScheduler(**SD).alphas_cumprod, rtol=2e-6)


def test_bad_schedule_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="linear_start < linear_end"):
        alphas_cumprod(0.012, 0.00085, 1000)


@pytest.mark.parametrize("steps", [1, 8, 20, 50, 100])
def test_ddim_timesteps_and_alphas_match_diffusers_leading(schedule: DiscreteSchedule, steps: int) -> None:
    ref = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    ref.set_timesteps(steps)
    assert ddim_timesteps(schedule, steps).flip(0).tolist() == ref.timesteps.tolist()
    alphas = torch.cat([ref.alphas_cumprod[ref.timesteps], ref.final_alpha_cumprod.reshape(1)])
    assert_rel(ddim_sigmas(schedule, steps), ((1 - alphas) / alphas) ** 0.5)


def test_ddim_timesteps_are_the_original_uniform_discretization(schedule: DiscreteSchedule) -> None:
    assert ddim_timesteps(schedule, 50).tolist() == list(range(1, 1000, 20))
    # c = 33 does not divide 1000: the original runs 31 steps for 30
    assert ddim_timesteps(schedule, 30).tolist() == list(range(1, 1000, 33))
    # c = 333 divides 999: the original would index alphas_cumprod[1000]; that timestep is dropped
    assert ddim_timesteps(schedule, 3).tolist() == [1, 334, 667]
    assert ddim_timesteps(schedule, 1000).tolist() == list(range(1, 1000))


@pytest.mark.parametrize("steps", [10, 28, 38])
def test_discrete_sigmas_match_diffusers_euler_linspace_at_integer_timesteps(
    schedule: DiscreteSchedule, steps: int
) -> None:
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    assert_rel(discrete_sigmas(schedule, steps)[:-1], ref.sigmas[:-1])
    assert discrete_sigmas(schedule, steps)[-1] == 0 == ref.sigmas[-1]


def test_discrete_sigmas_interpolate_log_sigma_between_timesteps(schedule: DiscreteSchedule) -> None:
    sigmas = discrete_sigmas(schedule, 25)  # t = 999, 957.375, ... mostly fractional
    t = torch.linspace(999, 0, 25, dtype=torch.float64)
    log_s = schedule.sigmas.double().log()
    lo, hi = t.floor().long(), t.ceil().long()
    expected = ((1 - t.frac()) * log_s[lo] + t.frac() * log_s[hi]).exp()
    assert_rel(sigmas[:-1], expected, rtol=1e-6)


@pytest.mark.parametrize("steps", [5, 25, 60])
def test_karras_sigmas_match_diffusers_dpm_solver(schedule: DiscreteSchedule, steps: int) -> None:
    ref = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    assert_rel(karras_sigmas(schedule, steps)[:-1], ref.sigmas[:-1])
    assert karras_sigmas(schedule, steps)[-1] == 0 == ref.sigmas[-1]


@pytest.mark.parametrize("steps", [2, 20, 33])
def test_uniform_sigmas_match_diffusers_unipc_default(schedule: DiscreteSchedule, steps: int) -> None:
    ref = UniPCMultistepScheduler(**SD)
    ref.set_timesteps(steps)
    assert_rel(uniform_sigmas(schedule, steps)[:-1], ref.sigmas[:-1])
    assert uniform_sigmas(schedule, steps)[-1] == 0 == ref.sigmas[-1]


def test_sigma_to_t_matches_diffusers_log_interpolation(schedule: DiscreteSchedule) -> None:
    uniform = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.exp(np.log(0.03) + uniform * np.log(14.6 / 0.03)).float()
    log_sigmas = np.log(schedule.sigmas.numpy())
    expected = EulerDiscreteScheduler(**SD)._sigma_to_t(sigmas.numpy(), log_sigmas)
    assert np.abs(schedule.sigma_to_t(sigmas).numpy() - expected).max() < 1e-3  # t in [0, 999]


def test_training_sigmas_map_exactly_to_their_integer_timesteps(schedule: DiscreteSchedule) -> None:
    t = torch.arange(1000)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), t.float())
    assert torch.allclose(schedule.t_to_sigma(t), schedule.sigmas, rtol=1e-6, atol=0)
    t_frac = torch.tensor([0.25, 17.5, 998.9])
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t_frac)), t_frac, atol=1e-3)


def test_steps_out_of_range_are_refused(schedule: DiscreteSchedule) -> None:
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        karras_sigmas(schedule, 0)
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        ddim_timesteps(schedule, 1001)
