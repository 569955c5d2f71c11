"""`atelier doctor`: check the machine and the configuration, and say what to fix."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from bot.config import TOKEN_ENV, AppConfig
from bot.model_report import describe_checkpoint, refiner_problems, upscaler_problem
from generation.compiled import State, cache_dir_in, read_statuses
from models.families import X4_UPSCALER
from models.loading import CheckpointError, inspect_checkpoint


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    status: Status
    what: str
    detail: str
    fix: str = ""


def run_checks(config: AppConfig, environ: Mapping[str, str] = os.environ) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    return [
        _python(),
        *_torch_and_devices(config),
        *_checkpoints(config),
        *_compiled(config),
        _data_dir(config),
        _token(environ),
    ]


def format_checks(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"[{check.status:>4}] {check.what}: {check.detail}")
        if check.fix:
            lines.append(f"       fix: {check.fix}")
    failures = sum(c.status is Status.FAIL for c in checks)
    warnings = sum(c.status is Status.WARN for c in checks)
    lines.append(f"{failures} problem(s) to fix, {warnings} warning(s).")
    return "\n".join(lines)


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 11):
        return Check(Status.FAIL, "Python", version, "install Python 3.11 or newer")
    return Check(Status.OK, "Python", version)


def _torch_and_devices(config: AppConfig) -> Iterator[Check]:
    try:
        import torch
    except ImportError as exc:
        yield Check(Status.FAIL, "PyTorch", f"cannot be imported ({exc})", "run `make setup`")
        return
    yield Check(Status.OK, "PyTorch", torch.__version__)
    cuda = torch.cuda.is_available()
    for device in config.generation.devices:
        if device == "cpu" or (device == "auto" and not cuda):
            yield Check(
                Status.WARN if device == "auto" else Status.OK,
                f"device {device}",
                "runs on the CPU: correct but minutes per image",
                "use a machine with an NVIDIA GPU and a CUDA build of PyTorch" if device == "auto" else "",
            )
        elif not cuda:
            yield Check(
                Status.FAIL,
                f"device {device}",
                "CUDA is not available to PyTorch",
                "install the NVIDIA driver, or set [generation] device = \"cpu\"",
            )
        else:
            index = int(device.partition(":")[2] or torch.cuda.current_device()) if device != "auto" else 0
            if index >= torch.cuda.device_count():
                yield Check(
                    Status.FAIL,
                    f"device {device}",
                    f"only {torch.cuda.device_count()} CUDA device(s) present",
                    "pick an existing cuda:N in [generation] device",
                )
                continue
            props = torch.cuda.get_device_properties(index)
            vram = props.total_memory / 2**30
            status = Status.OK if vram >= 6 else Status.WARN
            fix = "" if status is Status.OK else "SD needs about 4-6 GiB; use smaller images or dtype float16"
            yield Check(status, f"device {device}", f"{props.name}, {vram:.1f} GiB VRAM", fix)


def _checkpoints(config: AppConfig) -> Iterator[Check]:
    if not config.models:
        yield Check(
            Status.FAIL,
            "models",
            "no [[models]] configured",
            "put a checkpoint in ./checkpoints and add a [[models]] table to config.toml",
        )
    infos = {}
    for model in config.models:
        what = f"model {model.name}"
        try:
            info = infos[model.name] = inspect_checkpoint(model.checkpoint, model.config, model.prediction)
        except CheckpointError as exc:
            yield Check(Status.FAIL, what, str(exc), f"fix or replace {model.checkpoint}")
            continue
        problem = upscaler_problem(model, info, config.generation.upscaler)
        if problem is not None:
            yield Check(Status.FAIL, what, problem,
                        "point its checkpoint at an x4 upscaler (x4-upscaler-ema.safetensors), "
                        "or leave out [generation] upscaler so that U upscales 2x by hires")
        elif info.family == X4_UPSCALER.name and model.name != config.generation.upscaler:
            yield Check(Status.WARN, what, f"{model.checkpoint.name} is an x4 upscaler, which cannot draw: "
                        "members are refused it", f'set [generation] upscaler = "{model.name}" for the U buttons')
        else:
            refiner = f", refined by {model.refiner} (strength {model.refiner_strength})" if model.refiner else ""
            yield Check(Status.OK, what, f"{model.checkpoint.name}: {describe_checkpoint(info)}{refiner}")
    for model, problem in refiner_problems(config.models, infos):
        yield Check(Status.FAIL, f"model {model.name}", problem,
                    "point refiner at an [[models]] entry holding sd_xl_refiner_1.0.safetensors, or remove it")


def _compiled(config: AppConfig) -> Iterator[Check]:
    """The compile setting, then each model's graphs of each part as the bot last wrote them (while
    it runs: now)."""
    g = config.generation
    where = {"auto": "on CUDA devices (the CPU runs eagerly)", "on": "on every device", "off": "never"}
    yield Check(Status.OK, "compiled execution",
                f'compile = "{g.compile}": {", ".join(g.compile_parts) or "no part"} compiled {where[g.compile]}, '
                f"mode {g.compile_mode}, {g.compile_batches} {list(g.compile_buckets)}, "
                f"warm-up {list(g.compile_warmup)}")
    folder = cache_dir_in(config.storage.data_dir)
    try:
        statuses = read_statuses(folder)
    except (OSError, ValueError, KeyError) as exc:
        yield Check(Status.WARN, "compiled graphs", f"unreadable status in {folder / 'status'} ({exc})",
                    "delete that folder; the bot writes it again")
        return
    for status in statuses:
        counts = ", ".join(f"{status.count(state)} {state}" for state in State)
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime((folder / "status").stat().st_mtime))
        failed = [g.key for g in status.graphs if g.state is State.FAILED]
        yield Check(Status.WARN if failed else Status.OK,
                    f"compiled {status.part} graphs of {status.model} on {status.device}",
                    f"{counts} (as of {written})" + (f"; eager for good: {'; '.join(failed)}" if failed else ""),
                    "the bot's log says why each failed; restart to try again" if failed else "")


def _data_dir(config: AppConfig) -> Check:
    folder = config.storage.data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return Check(Status.FAIL, "data folder", f"{folder} is not writable ({exc})", "fix its permissions")
    return Check(Status.OK, "data folder", f"{folder} is writable")


def _token(environ: Mapping[str, str]) -> Check:
    if environ.get(TOKEN_ENV):
        return Check(Status.OK, "Discord token", f"{TOKEN_ENV} is set")
    return Check(Status.FAIL, "Discord token", f"{TOKEN_ENV} is not set", "run `atelier run` for the setup guide")
