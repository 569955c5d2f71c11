"""`atelier models`: each configured checkpoint and what was detected in its file."""

from __future__ import annotations

from generation.settings import ModelSettings
from models.loading import CheckpointError, CheckpointInfo, inspect_checkpoint


def describe_checkpoint(info: CheckpointInfo) -> str:
    """One line: family, prediction and where it came from, parameter counts, stored dtype."""
    counts = ", ".join(f"{part} {_millions(n)}" for part, n in sorted(info.parameters.items()))
    return f"{info.family}, {info.prediction}-prediction ({info.prediction_source}), {counts} params, {info.dtype}"


def describe_models(models: tuple[ModelSettings, ...]) -> tuple[str, bool]:
    """The report and whether every checkpoint could be read."""
    if not models:
        return "no [[models]] configured in the config file; see config.toml for an example", False
    lines, ok = [], True
    for model in models:
        default = " (default)" if model.default else ""
        lines.append(f"{model.name}{default}: {model.checkpoint}")
        try:
            info = inspect_checkpoint(model.checkpoint, model.config, model.prediction)
        except CheckpointError as exc:
            lines.append(f"  error: {exc}")
            ok = False
        else:
            lines.append(f"  {describe_checkpoint(info)}")
    return "\n".join(lines), ok


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"
