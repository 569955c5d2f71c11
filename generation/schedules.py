"""The original LDM noise schedule and the step spacings the samplers run on.

Everything is expressed in the variance-exploding (VE) parameterization of k-diffusion: a latent at
noise level sigma is x = x0 + sigma * eps, where sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod).
The original variance-preserving (VP) latent at the same step is x / sqrt(1 + sigma^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from generation.transfer import upload

#: Karras et al. (2022) spacing exponent, the value every web UI and diffusers use.
KARRAS_RHO = 7.0


def alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> Tensor:
    """The original `make_beta_schedule("linear")`: betas linear in sqrt, computed in float64 and
    stored in float32 as the original model registers its buffers."""
    if not 0.0 < linear_start < linear_end < 1.0 or timesteps < 2:
        raise ValueError(
            f"need 0 < linear_start < linear_end < 1 and timesteps >= 2, "
            f"got {linear_start}, {linear_end}, {timesteps}"
        )
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # (T,)


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The model's T training noise levels and the continuous time <-> sigma map between them
    (k-diffusion's DiscreteSchedule: log-sigma interpolated linearly between integer timesteps)."""

    alphas_cumprod: Tensor  # (T,) float32

    @classmethod
    def linear(
        cls, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000
    ) -> DiscreteSchedule:
        """The schedule of the original SD 1.x / 2.x inference YAMLs (their defaults)."""
        return cls(alphas_cumprod(linear_start, linear_end, timesteps))

    def to(self, device: torch.device | str) -> DiscreteSchedule:
        """The same schedule on `device`, where the denoiser maps sigmas to timesteps every step."""
        return DiscreteSchedule(upload(self.alphas_cumprod, device))

    @property
    def timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """Training noise levels, increasing with t."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of each sigma; a training sigma maps exactly to its integer t."""
        log_sigmas = self.sigmas.log().to(sigma.device)  # (T,)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]  # (T, N)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.timesteps - 2)  # (N,)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous timesteps t in [0, T-1]."""
        log_sigmas = self.sigmas.log().to(t.device)
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _check_steps(steps: int, most: int) -> None:
    if not 1 <= steps <= most:
        raise ValueError(f"steps must be between 1 and {most}, got {steps}")


def ddim_timesteps(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The original DDIM "uniform" discretization, increasing: c = T // steps, range(0, T, c) + 1.

    Like the original this yields ceil(T / c) timesteps, more than `steps` when c does not divide T
    (31 for 30 steps); where c divides T - 1 (3, 9, 27 steps...) the original indexes past the
    schedule and crashes, and we drop that one timestep T. When c divides T this equals diffusers'
    DDIM timestep_spacing="leading", steps_offset=1."""
    _check_steps(steps, schedule.timesteps)
    ts = torch.arange(0, schedule.timesteps, schedule.timesteps // steps) + 1
    return ts[ts < schedule.timesteps]  # (about steps,)


def ddim_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Sigmas of the original DDIM/PLMS loop: its timesteps, decreasing, then the level of
    alphas_cumprod[0], where the original's last step lands (alpha_prev of the first index)."""
    sigmas = schedule.sigmas
    ts = ddim_timesteps(schedule, steps).flip(0)
    return torch.cat([sigmas[ts], sigmas[:1]])  # (len(ts) + 1,)


def discrete_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """k-diffusion `get_sigmas` as the web UIs use it for Euler, Heun, LMS, DPM++ 2M: sigma at
    t = linspace(T - 1, 0, steps), then 0. Equals diffusers' Euler/DPM "linspace" spacing where those
    t are integers (e.g. steps 10, 28, 38 for T = 1000); elsewhere diffusers interpolates sigma
    linearly in t while k-diffusion interpolates log-sigma."""
    _check_steps(steps, schedule.timesteps)
    t = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float32)
    return torch.cat([schedule.t_to_sigma(t), t.new_zeros(1)])  # (steps + 1,)


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. spacing between the model's sigma_max and sigma_min (uniform in sigma^(1/rho)),
    then 0; as k-diffusion `get_sigmas_karras` and diffusers `use_karras_sigmas=True`."""
    _check_steps(steps, schedule.timesteps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = schedule.sigma_max ** (1 / rho), schedule.sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1)])  # (steps + 1,)


def uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Diffusers' default spacing for UniPC ("linspace", rounded): integer timesteps
    round(linspace(0, T - 1, steps + 1)) decreasing, the 0 dropped, then sigma 0."""
    _check_steps(steps, schedule.timesteps)
    ts = torch.linspace(0, schedule.timesteps - 1, steps + 1, dtype=torch.float64).round().long()
    return torch.cat([schedule.sigmas[ts.flip(0)[:-1]], torch.zeros(1)])  # (steps + 1,)


def legacy_ddpm_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """sgm's LegacyDDPMDiscretization, as SDXL's YAMLs sample: the training sigmas at the integer
    timesteps int(x) for x in numpy.linspace(T - 1, 0, steps, endpoint=False) (999, 949... for 20
    steps; not DDIM's), decreasing, then 0. Every level is a training sigma, so the denoiser's
    sigma -> t map gives sgm's nearest-index timesteps exactly."""
    _check_steps(steps, schedule.timesteps)
    ts = torch.from_numpy(np.linspace(schedule.timesteps - 1, 0, steps, endpoint=False).astype(np.int64))
    return torch.cat([schedule.sigmas[ts], torch.zeros(1)])  # (steps + 1,)


#: The distillation schedule of latent-consistency models: 50 timesteps, c = T // 50 apart.
LCM_ORIGINAL_STEPS = 50


def lcm_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The LCM spacing (diffusers' LCMScheduler, original_inference_steps 50): of the timesteps
    k c - 1 (k = 1..50, c = T // 50), decreasing, those at indices floor(linspace(0, 50, steps,
    endpoint=False)); then sigma 0."""
    _check_steps(steps, LCM_ORIGINAL_STEPS)
    c = schedule.timesteps // LCM_ORIGINAL_STEPS
    origin = (torch.arange(1, LCM_ORIGINAL_STEPS + 1) * c - 1).flip(0)  # (50,) decreasing
    indices = (torch.arange(steps, dtype=torch.float64) * LCM_ORIGINAL_STEPS / steps).floor().long()
    return torch.cat([schedule.sigmas[origin[indices]], torch.zeros(1)])  # (steps + 1,)
