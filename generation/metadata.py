"""The `parameters` PNG text chunk in the format the popular web UIs write, so that other tools
(PNG Info tabs, image boards, civitai) read back how an image was made."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, PngImagePlugin

from generation.request import GenerationRequest, Kind
from generation.sdxl import refiner_steps

#: How the web UIs name our samplers.
SAMPLER_LABELS = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
}


def parameters_text(
    request: GenerationRequest, seed: int, model_hash: str, extra: Sequence[tuple[str, str]] = ()
) -> str:
    """prompt (with its `<lora:...>` tags, as the web UIs keep them), then `Negative prompt: ...`
    when there is one, then the comma-separated settings, then `extra` fields such as the add-ons'
    `Lora hashes` / `TI hashes` (`generation.addons.AddonLibrary.infotext`)."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        ("Steps", request.steps),
        ("Sampler", SAMPLER_LABELS[request.sampler]),
        ("CFG scale", f"{request.guidance:g}"),
        ("Seed", seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model hash", model_hash),
        ("Model", request.model),
    ]
    if request.strength is not None:
        settings.append(("Denoising strength", f"{request.strength:g}"))
    if request.kind is Kind.UPSCALE:  # as the web UIs' hires fix: Size is the input, this its factor
        settings.append(("Hires upscale", request.upscale_factor))
    settings += extra
    lines.append(", ".join(f"{key}: {value}" for key, value in settings))
    return "\n".join(lines)


def refiner_infotext(name: str, model_hash: str, steps: int, strength: float) -> list[tuple[str, str]]:
    """The web UIs' fields of an image an SDXL refiner finished (A1111's `Refiner: NAME [hash]`
    and `Refiner switch at`, the fraction of the `steps` the base ran before the refiner took
    over at refiner strength `strength`), for `parameters_text`'s `extra`."""
    switch_at = (steps - refiner_steps(steps, strength)) / steps
    return [("Refiner", f"{name} [{model_hash}]"), ("Refiner switch at", f"{round(switch_at, 4):g}")]


def step_cache_infotext(interval: int) -> list[tuple[str, str]]:
    """The field of an image made with cached steps (`[generation] step_cache_interval`), for
    `parameters_text`'s `extra`: none on the exact path (interval 1)."""
    return [] if interval == 1 else [("Step cache", str(interval))]


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """Encode `image` as PNG, carrying `parameters` (when given) in a tEXt/iTXt chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters) if parameters.isascii() else info.add_itxt("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
