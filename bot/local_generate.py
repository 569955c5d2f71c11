"""`atelier generate`: one local generation, no Discord, exactly the engine contract of issue 3, so
its PNGs can be compared with the original repositories' scripts for the same seed."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from pydantic import ValidationError

from bot.config import AppConfig
from generation.addons import AddonLibrary, sampling_defaults
from generation.images import ImageInputError, fit_size, load_image, prepare_mask, split_alpha
from generation.metadata import parameters_text, png_bytes, refiner_infotext, step_cache_infotext
from generation.outpaint import outpaint_size
from generation.pipeline import load_model, resolve_device, resolve_dtype, run_batch
from generation.refiner import check_pair, refined
from generation.request import GenerationRequest, Kind
from generation.sdxl import DEFAULT_REFINER_STRENGTH
from generation.settings import GenerationSettings, ModelSettings, default_model
from generation.upscale import upscale_factor


class UsageError(Exception):
    """The command line asks for something impossible; the message says what is allowed."""


def output_paths(out: Path, count: int) -> list[Path]:
    """`--out PATH.png` for one image; `PATH-1.png` ... `PATH-N.png` for `--count N`."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def generate(args: argparse.Namespace, config: AppConfig) -> list[Path]:
    """Run the generation described by `args` and write its PNGs; return their paths."""
    _check_refiner_options(args)
    settings = _model_settings(args, config)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or config.generation.dtype, device)
    defaults = config.generation
    addons = AddonLibrary(args.lora_dir or defaults.lora_dir, args.embedding_dir or defaults.embedding_dir)
    model = load_model(settings, device, dtype, defaults.vae_tile_above_pixels, addons=addons,
                       fuse_projections=defaults.fuse_projections, step_cache_interval=defaults.step_cache_interval)
    stored = {}  # sha256 -> bytes of the input files, as storage would hand them to the runner
    try:
        fields = _image_fields(args, defaults, stored)
        width, height = fields.pop("width", model.native_size), fields.pop("height", model.native_size)
        sampler, steps, guidance = sampling_defaults(
            addons.lcm_hint(args.prompt, settings.name),
            (defaults.default_sampler, defaults.default_steps, defaults.default_guidance),
        )
        if args.upscale:
            fields["upscale_factor"] = upscale_factor(model.network.family)
            if fields["upscale_factor"] == 2 and fields["strength"] is None:  # as the U buttons
                fields["strength"] = defaults.hires_strength
        if fields.get("upscale_factor") == 4:  # the x4 upscaler's own defaults, as the U buttons use
            sampler, steps, guidance = defaults.upscaler_sampler, defaults.upscaler_steps, defaults.upscaler_guidance
            fields["upscale_noise_level"] = defaults.upscaler_noise_level
        request = GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            model=settings.name,
            sampler=args.sampler or sampler,
            steps=args.steps or steps,
            guidance=guidance if args.guidance is None else args.guidance,
            seed=args.seed,
            width=args.width or width,
            height=args.height or height,
            count=args.count,
            mask_blur=args.mask_blur,
            inpaint_only_masked=args.only_masked,
            variation_seed=args.variation_seed,
            variation_strength=args.variation_strength,
            **fields,
        )
    except ValidationError as exc:
        raise UsageError("; ".join(_option_error(e) for e in exc.errors())) from None
    except ImageInputError as exc:
        raise UsageError(str(exc)) from None
    if request.width % model.network.vae_scale or request.height % model.network.vae_scale:
        raise UsageError(f"--width and --height must be multiples of {model.network.vae_scale}")

    def show_progress(step: int, total: int, _preview: object) -> None:
        print(f"\rstep {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    try:
        if args.refiner is None:
            (images_out,) = run_batch(model, [request], stored.__getitem__, progress=show_progress)
        else:
            refiner = load_model(_refiner_settings(args), device, dtype, defaults.vae_tile_above_pixels,
                                 fuse_projections=defaults.fuse_projections,
                                 step_cache_interval=defaults.step_cache_interval)
            try:
                check_pair(model, refiner)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            (images_out,) = refined(
                model, refiner, [request], stored.__getitem__, args.refiner_strength, progress=show_progress
            )
    except ImageInputError as exc:  # bad input images, unusable LoRAs or embeddings
        raise UsageError(str(exc)) from None
    paths = output_paths(args.out, request.count)
    (extra,) = addons.infotexts([(request.prompt, request.negative_prompt)])
    if args.refiner is not None:
        extra = [*extra, *refiner_infotext(refiner.name, refiner.short_hash, request.steps, args.refiner_strength)]
    if not args.upscale:  # upscales run on tiles, never cached
        extra = [*extra, *step_cache_infotext(model.step_cache_interval)]
    for path, image, seed in zip(paths, images_out, request.seeds(), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image, parameters_text(request, seed, model.short_hash, extra)))
    return paths


def _check_refiner_options(args: argparse.Namespace) -> None:
    if args.refiner is None:
        if args.refiner_config is not None or args.refiner_strength is not None:
            raise UsageError("--refiner-config and --refiner-strength need --refiner")
        return
    if args.refiner_strength is None:
        args.refiner_strength = DEFAULT_REFINER_STRENGTH
    if not 0.0 <= args.refiner_strength <= 1.0:
        raise UsageError(f"--refiner-strength must be in [0, 1], got {args.refiner_strength}")
    if args.mask is not None or args.outpaint or args.upscale:
        raise UsageError("--refiner finishes txt2img and img2img only, not --mask, --outpaint or --upscale")


def _refiner_settings(args: argparse.Namespace) -> ModelSettings:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.refiner.stem)[:64]
    return ModelSettings(name=name or "refiner", checkpoint=args.refiner, config=args.refiner_config)


def _image_fields(args: argparse.Namespace, limits: GenerationSettings, stored: dict[str, bytes]) -> dict:
    """The request fields of --init-image, --mask, --strength, --outpaint and --upscale, with the
    default size taken from the image (its own size, rounded to multiples of 64, within limits).
    Notes about adjustments go to stderr."""
    if args.init_image is None:
        if args.mask is not None or args.strength is not None or args.outpaint or args.upscale:
            raise UsageError("--mask, --strength, --outpaint and --upscale need --init-image")
        return {}
    image = _store(args.init_image, stored)
    rgb, alpha_mask = split_alpha(load_image(stored[image], limits.max_side**2))
    width, height, notes = fit_size(rgb.width, rgb.height, limits.max_pixels, limits.max_side)
    fields: dict = dict(init_image=image, strength=args.strength, width=width, height=height)
    if args.upscale:
        fields["kind"] = Kind.UPSCALE
    elif args.outpaint:
        directions = tuple(d.strip() for d in args.outpaint.split(","))
        width, height, more = outpaint_size(width, height, directions, args.by, limits.max_pixels, limits.max_side)
        notes += more
        fields |= dict(kind=Kind.OUTPAINT, outpaint_directions=directions, outpaint_pixels=args.by,
                       width=width, height=height)
    elif args.mask is not None or alpha_mask is not None:
        fields["kind"] = Kind.INPAINT
        if args.mask is not None:
            fields["mask_image"] = _store(args.mask, stored)
            mask = load_image(stored[fields["mask_image"]], limits.max_side**2, what="mask")
            notes += prepare_mask(mask, rgb.size)[1]
    else:
        if args.strength is None:
            raise UsageError("--init-image without --mask needs --strength in (0, 1]")
        fields["kind"] = Kind.IMG2IMG
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return fields


def _store(path: Path, stored: dict[str, bytes]) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    stored[digest] = data
    return digest


def _model_settings(args: argparse.Namespace, config: AppConfig) -> ModelSettings:
    if args.checkpoint is not None:
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.checkpoint.stem)[:64]
        return ModelSettings(name=name or "checkpoint", checkpoint=args.checkpoint, config=args.model_config)
    upscaler = config.generation.upscaler
    if args.upscale and upscaler is not None:  # the configured x4 upscaler (any input size: the operator asks)
        model: ModelSettings | None = next(m for m in config.models if m.name == upscaler)
    else:
        model = default_model(config.models, upscaler)
    if model is None:
        raise UsageError("no --checkpoint given and no [[models]] configured in the config file")
    if args.model_config is not None:
        return model.model_copy(update={"config": args.model_config})
    return model


def _option_error(error: dict) -> str:
    option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
    return f"{option}: {error['msg']} (got {error['input']!r})"

