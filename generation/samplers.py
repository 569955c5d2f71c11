"""Samplers: small pure functions over a denoiser, in k-diffusion's variance-exploding form.

A denoiser maps (x, sigma) with x = x0 + sigma * eps to its prediction of x0. Every method below
takes the start latent at sigmas[0] and returns the latent at sigmas[-1]; `Sampler.sample` adds the
cancellation check before every model call, the progress callback after every step, and returns
the variance-preserving latent x / sqrt(1 + sigma_last^2) (identical to x when sigma_last is 0, and
the original DDIM/PLMS output when it is the level of alphas_cumprod[0]).

With eta 0 the original DDIM update, written in VE terms, is exactly an Euler step of the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, so `ddim` is `euler` on the original
timesteps, started from VP noise; PLMS is the same ODE with Adams-Bashforth steps on eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from torch import Tensor

from generation.schedules import (
    DiscreteSchedule,
    ddim_sigmas,
    discrete_sigmas,
    karras_sigmas,
    lcm_sigmas,
    uniform_sigmas,
)
from generation.transfer import upload

#: (x (B, C, H, W) at noise level sigma (B,)) -> predicted clean latent (B, C, H, W).
Denoiser = Callable[[Tensor, Tensor], Tensor]
#: (step done, total steps, current x0 prediction (B, C, H, W)).
Progress = Callable[[int, int, Tensor], None]
#: Called by a method after step i with that step's x0 prediction.
Report = Callable[[int, Tensor], None]


class Cancelled(Exception):
    """The caller asked to stop; raised before the next model call."""


class NoiseSource(Protocol):
    def __call__(self) -> Tensor:
        """The next standard normal draw, shaped like the latent batch (B, C, H, W)."""
        ...


class BatchNoise:
    """Gaussian noise for a batch where image i draws only from its own CPU generator seeded with
    seeds[i], so an image depends on its seed alone: not on the device, nor on its batch-mates."""

    def __init__(
        self, seeds: list[int], shape: tuple[int, int, int], device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self._generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        self._shape = (1, *shape)
        self._device, self._dtype = torch.device(device), dtype

    def initial(self) -> Tensor:
        """The start noise: the contract's randn((1, C, H, W), generator=g_i, float32) per image."""
        return self()

    def __call__(self) -> Tensor:
        draws = torch.cat([torch.randn(self._shape, generator=g, dtype=torch.float32) for g in self._generators])
        return upload(draws, self._device, self._dtype)  # (B, C, H, W)


#: A sampling method: (model, x at sigmas[0], sigmas, noise, report) -> x at sigmas[-1].
Method = Callable[[Denoiser, Tensor, Tensor, NoiseSource, Report], Tensor]


def _at(x: Tensor, sigma: float) -> Tensor:
    return x.new_full((x.shape[0],), sigma)  # (B,)


def _ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Split the move to sigma_next into a deterministic part down to sigma_down and fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (eta 1, as k-diffusion)."""
    up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def euler(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """Euler steps of the probability-flow ODE (and, on the original timesteps, DDIM with eta 0)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        report(i, denoised)
    return x


def euler_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """An Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion, eta 1)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        down, up = _ancestral_step(s[i], s[i + 1])
        x = x + (x - denoised) / s[i] * (down - s[i])
        if s[i + 1] > 0:
            x = x + noise() * up
        report(i, denoised)
    return x


def heun(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """Heun's second order method; the last step, to sigma 0, is an Euler step."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        d, dt = (x - denoised) / s[i], s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, _at(x, s[i + 1]))) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
        report(i, denoised)
    return x


def plms(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """The original PLMSSampler: Adams-Bashforth on eps = dx/dsigma over the previous (up to 3)
    eps, after a first step by the original's "pseudo improved Euler" (a Heun step)."""
    s = sigmas.tolist()
    old_eps: list[Tensor] = []  # newest last
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        eps, dt = (x - denoised) / s[i], s[i + 1] - s[i]
        if len(old_eps) == 0:
            eps_prime = eps
            if s[i + 1] > 0:
                x_2 = x + eps * dt
                eps_prime = (eps + (x_2 - model(x_2, _at(x, s[i + 1]))) / s[i + 1]) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * dt
        old_eps = [*old_eps, eps][-3:]
        report(i, denoised)
    return x


def lms_coefficients(s: list[float], i: int, order: int) -> list[float]:
    """Weights of the last `order` derivatives (newest first) for the step s[i] -> s[i+1]: the
    exact integrals of their Lagrange basis polynomials (k-diffusion integrates them numerically)."""
    nodes = [s[i - j] - s[i] for j in range(order)]  # shifted so the integral runs over [0, h]
    h = s[i + 1] - s[i]
    weights = []
    for j in range(order):
        poly = [1.0]  # ascending powers of u
        for k in range(order):
            if k != j:
                scale = nodes[j] - nodes[k]
                poly = [(a - nodes[k] * b) / scale for a, b in zip([0.0, *poly], [*poly, 0.0])]
        weights.append(sum(c * h ** (n + 1) / (n + 1) for n, c in enumerate(poly)))
    return weights


def lms(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report, order: int = 4) -> Tensor:
    """Linear multistep (k-diffusion `sample_lms`, order 4) on d = dx/dsigma."""
    s = sigmas.tolist()
    ds: list[Tensor] = []  # newest first
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        ds = [(x - denoised) / s[i], *ds][:order]
        x = x + sum(c * d for c, d in zip(lms_coefficients(s, i, len(ds)), ds))
        report(i, denoised)
    return x


def dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """DPM-Solver++(2M) in lambda = -log(sigma); first order on the first and last steps."""
    s = sigmas.tolist()
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            target = denoised
            if old_denoised is not None:
                r = math.log(s[i - 1] / s[i]) / h
                target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * target
        old_denoised = denoised
        report(i, denoised)
    return x


def dpmpp_sde(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`, eta 1, r 1/2): an ancestral half step to
    the geometric midpoint, then the full ancestral step from the midpoint's x0 prediction.

    k-diffusion draws both noises from one Brownian path in sigma (a torchsde tree); the two
    increments it asks for share the start, so two fresh normals z1, z2 reproduce their exact joint
    law: noise to the midpoint is z1, to the end (sqrt(a) z1 + sqrt(b) z2) / sqrt(a + b)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            mid = math.sqrt(s[i] * s[i + 1])  # lambda halfway
            z1, z2 = noise(), noise()
            a, b = s[i] - mid, mid - s[i + 1]
            down, up = _ancestral_step(s[i], mid)
            x_2 = denoised + (down / s[i]) * (x - denoised) + z1 * up
            denoised_2 = model(x_2, _at(x, mid))
            down, up = _ancestral_step(s[i], s[i + 1])
            z = (math.sqrt(a) * z1 + math.sqrt(b) * z2) / math.sqrt(a + b)
            x = denoised_2 + (down / s[i]) * (x - denoised_2) + z * up
        report(i, denoised)
    return x


def _unipc_phis(h: float) -> tuple[float, float, float]:
    """For data prediction with B(h) = e^-h - 1 ("bh2"): (h phi_1, b_1, b_2) of UniPC."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_2 = h_phi_1 / hh - 1
    h_phi_3 = h_phi_2 / hh - 1 / 2
    return h_phi_1, h_phi_2 / h_phi_1, 2 * h_phi_3 / h_phi_1


def unipc(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """UniPC multistep, order 2, B(h) "bh2", data prediction, lower order on the first and last
    steps: diffusers' UniPCMultistepScheduler defaults. After each model call the corrector (UniC)
    refines the current x with the new prediction at no extra call, then the predictor (UniP) steps.
    In VE form: diffusers' VP update divided by alpha_t, with lambda = -log(sigma)."""
    s = sigmas.tolist()
    n = len(s) - 1
    lam = [-math.log(si) if si > 0 else math.inf for si in s]
    history: list[Tensor] = []  # x0 predictions, newest last, at most 3
    x_last, order = x, 1
    for i in range(n):
        denoised = model(x, _at(x, s[i]))
        history = [*history, denoised][-3:]
        if i > 0:  # UniC: correct the predictor's x with the prediction made at it
            h = lam[i] - lam[i - 1]
            h_phi_1, b1, b2 = _unipc_phis(h)
            m0, m_t = history[-2], history[-1]
            x = (s[i] / s[i - 1]) * x_last - h_phi_1 * m0
            if order == 1:
                x = x - h_phi_1 * 0.5 * (m_t - m0)
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_0 = (b1 - b2) / (1 - r)
                x = x - h_phi_1 * (rho_0 * (history[-3] - m0) / r + (b1 - rho_0) * (m_t - m0))
        order = min(2, n - i, i + 1)
        x_last = x
        if s[i + 1] == 0:
            x = denoised
        else:  # UniP
            h = lam[i + 1] - lam[i]
            h_phi_1 = math.expm1(-h)
            x = (s[i + 1] / s[i]) * x - h_phi_1 * denoised
            if order == 2:
                r = (lam[i - 1] - lam[i]) / h
                x = x - h_phi_1 * 0.5 * (history[-2] - denoised) / r
        report(i, denoised)
    return x


def lcm(model: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource, report: Report) -> Tensor:
    """The consistency sampler of latent-consistency models (as A1111's and ComfyUI's `lcm`): each
    step jumps to the model's x0 prediction and, unless it is the last, re-noises it to the next
    sigma with fresh noise. diffusers' LCMScheduler also blends in c_skip(t) * x with c_skip at most
    7e-6 at the timesteps LCM uses (its "boundary condition"); like the web UIs we leave it out."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, _at(x, s[i]))
        x = denoised + noise() * s[i + 1] if s[i + 1] > 0 else denoised
        report(i, denoised)
    return x


@dataclass(frozen=True)
class Sampler:
    """A method with the step spacing it is defined with and the way it starts from pure noise."""

    method: Method
    spacing: Callable[[DiscreteSchedule, int], Tensor]
    #: Start from unit-variance VP noise (x_T = noise, as the original DDIM/PLMS and diffusers'
    #: UniPC do) rather than from noise * sigma_max (k-diffusion and the web UIs).
    vp_start: bool = False

    def sigmas(self, schedule: DiscreteSchedule, steps: int) -> Tensor:
        """The decreasing noise levels of a `steps`-step run, (steps + 1,) float32, on the CPU."""
        return self.spacing(schedule, steps)

    def start_scale(self, sigma0: float) -> float:
        """Factor turning unit noise into the VE start latent at sigma0 (txt2img)."""
        return math.sqrt(1 + sigma0**2) if self.vp_start else sigma0

    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        noise: NoiseSource,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Tensor:
        """Denoise x (B, C, H, W), a VE latent at sigmas[0], along `sigmas` (the full schedule or a
        tail of it, for img2img) and return the VP latent at sigmas[-1]."""
        total = len(sigmas) - 1

        def model(x: Tensor, sigma: Tensor) -> Tensor:
            if cancelled is not None and cancelled():
                raise Cancelled("generation was cancelled")
            return denoiser(x, sigma)

        def report(i: int, denoised: Tensor) -> None:
            if progress is not None:
                progress(i + 1, total, denoised)

        x = self.method(model, x, sigmas, noise, report)
        return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


#: Every sampler users may pick, by `generation.request.SAMPLER_NAMES` (read-only).
SAMPLERS: Mapping[str, Sampler] = MappingProxyType({
    "ddim": Sampler(euler, ddim_sigmas, vp_start=True),
    "plms": Sampler(plms, ddim_sigmas, vp_start=True),
    "euler": Sampler(euler, discrete_sigmas),
    "euler_a": Sampler(euler_ancestral, discrete_sigmas),
    "heun": Sampler(heun, discrete_sigmas),
    "lms": Sampler(lms, discrete_sigmas),
    "dpmpp_2m": Sampler(dpmpp_2m, discrete_sigmas),
    "dpmpp_2m_karras": Sampler(dpmpp_2m, karras_sigmas),
    "dpmpp_sde_karras": Sampler(dpmpp_sde, karras_sigmas),
    "unipc": Sampler(unipc, uniform_sigmas, vp_start=True),
    "lcm": Sampler(lcm, lcm_sigmas, vp_start=True),
})
