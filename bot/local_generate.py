"""`atelier generate`: one local generation, no Discord, exactly the engine contract of issue 3, so
its PNGs can be compared with the original repositories' scripts for the same seed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from bot.config import AppConfig
from generation.metadata import parameters_text, png_bytes
from generation.pipeline import load_model, resolve_device, resolve_dtype, txt2img
from generation.request import GenerationRequest
from generation.settings import ModelSettings, default_model


class UsageError(Exception):
    """The command line asks for something impossible; the message says what is allowed."""


def output_paths(out: Path, count: int) -> list[Path]:
    """`--out PATH.png` for one image; `PATH-1.png` ... `PATH-N.png` for `--count N`."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def generate(args: argparse.Namespace, config: AppConfig) -> list[Path]:
    """Run the generation described by `args` and write its PNGs; return their paths."""
    if args.init_image is not None or args.mask is not None:
        raise UsageError("--init-image, --strength and --mask are not built yet (issue 4)")
    settings = _model_settings(args, config)
    device = resolve_device(args.device)
    model = load_model(settings, device, resolve_dtype(args.dtype or config.generation.dtype, device))
    defaults = config.generation
    try:
        request = GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            model=settings.name,
            sampler=args.sampler or defaults.default_sampler,
            steps=args.steps or defaults.default_steps,
            guidance=defaults.default_guidance if args.guidance is None else args.guidance,
            seed=args.seed,
            width=args.width or model.native_size,
            height=args.height or model.native_size,
            count=args.count,
        )
    except ValidationError as exc:
        raise UsageError("; ".join(_option_error(e) for e in exc.errors())) from None
    if request.width % model.network.vae_scale or request.height % model.network.vae_scale:
        raise UsageError(f"--width and --height must be multiples of {model.network.vae_scale}")

    def show_progress(step: int, total: int, _preview: object) -> None:
        print(f"\rstep {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    (images,) = txt2img(model, [request], progress=show_progress)
    paths = output_paths(args.out, request.count)
    for path, image, seed in zip(paths, images, request.seeds(), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image, parameters_text(request, seed, model.short_hash)))
    return paths


def _model_settings(args: argparse.Namespace, config: AppConfig) -> ModelSettings:
    if args.checkpoint is not None:
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.checkpoint.stem)[:64]
        return ModelSettings(name=name or "checkpoint", checkpoint=args.checkpoint, config=args.model_config)
    model = default_model(config.models)
    if model is None:
        raise UsageError("no --checkpoint given and no [[models]] configured in the config file")
    if args.model_config is not None:
        return model.model_copy(update={"config": args.model_config})
    return model


def _option_error(error: dict) -> str:
    option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
    return f"{option}: {error['msg']} (got {error['input']!r})"

