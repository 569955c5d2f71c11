"""`atelier models`: each configured checkpoint and what was detected in its file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from generation.settings import ModelSettings
from models.families import X4_UPSCALER, refines
from models.loading import CheckpointError, CheckpointInfo, inspect_checkpoint


def describe_checkpoint(info: CheckpointInfo) -> str:
    """One line: family, prediction and where it came from, parameter counts, stored dtype."""
    counts = ", ".join(f"{part} {_millions(n)}" for part, n in sorted(info.parameters.items()))
    return f"{info.family}, {info.prediction}-prediction ({info.prediction_source}), {counts} params, {info.dtype}"


def upscaler_problem(model: ModelSettings, info: CheckpointInfo, upscaler: str | None) -> str | None:
    """Why `model`, named by `[generation] upscaler`, cannot upscale: its file is no x4 upscaler.
    None when it is one, or when it is not the upscaler (the config checks the name itself)."""
    if model.name != upscaler or info.family == X4_UPSCALER.name:
        return None
    return (f"[generation] upscaler names {model.name!r}, but {model.checkpoint.name} is an "
            f"{info.family} checkpoint, not an {X4_UPSCALER.name}")


def refiner_problems(models: Iterable[ModelSettings],
                     infos: Mapping[str, CheckpointInfo]) -> Iterator[tuple[ModelSettings, str]]:
    """Each model whose `refiner` cannot finish its images (only an SDXL refiner finishes an SDXL
    base), with why; models or refiners whose file could not be read (absent from `infos`: their
    own line says why) are passed over."""
    for model in models:
        info, refiner = infos.get(model.name), infos.get(model.refiner or "")
        if info is None or refiner is None or refines(info.family, refiner.family):
            continue
        yield model, (f"refiner {model.refiner!r} is an {refiner.family} checkpoint for an {info.family} one; "
                      f"a refiner must be an sdxl-refiner finishing an sdxl model")


def describe_models(models: tuple[ModelSettings, ...], upscaler: str | None = None) -> tuple[str, bool]:
    """The report and whether every checkpoint could be read (and the `upscaler`, the name in
    `[generation] upscaler`, is an x4 upscaler, and every refiner an SDXL refiner of an SDXL model)."""
    if not models:
        return "no [[models]] configured in the config file; see config.toml for an example", False
    lines, ok = [], True
    infos: dict[str, CheckpointInfo] = {}
    for model in models:
        marks = "".join([
            " (default)" if model.default else "",
            " (upscaler)" if model.name == upscaler else "",
            f" (refiner: {model.refiner}, strength {model.refiner_strength})" if model.refiner else "",
        ])
        lines.append(f"{model.name}{marks}: {model.checkpoint}")
        try:
            info = infos[model.name] = inspect_checkpoint(model.checkpoint, model.config, model.prediction)
        except CheckpointError as exc:
            lines.append(f"  error: {exc}")
            ok = False
            continue
        lines.append(f"  {describe_checkpoint(info)}")
        problem = upscaler_problem(model, info, upscaler)
        if problem is not None:
            lines.append(f"  error: {problem}")
            ok = False
    for model, problem in refiner_problems(models, infos):
        lines.append(f"error: {model.name}: {problem}")
        ok = False
    return "\n".join(lines), ok


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"
