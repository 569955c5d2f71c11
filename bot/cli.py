"""The `atelier` command: run the bot, generate locally, inspect models, check the machine, benchmark.

Each subcommand is a small function; heavy imports (torch, discord) happen inside them so that
`atelier --help` and configuration errors answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.config import TOKEN_ENV, AppConfig, ConfigError, config_path, load_config
from generation.request import SAMPLER_NAMES

#: Exit codes: 0 success, 1 a check or run failed, 2 bad usage or configuration.
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Benchmarks parse their own options; every other command must use all of them.
    args, rest = parser.parse_known_args(argv)
    args.options = rest
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace) -> AppConfig:
    # --config may come before or after the subcommand; absent, it is not in the namespace.
    return load_config(config_path(getattr(args, "config", None)))


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    if not os.environ.get(TOKEN_ENV):
        from bot.discord_setup import setup_guide

        print(setup_guide(config.discord), file=sys.stderr)
        return EXIT_FAILED
    if problem := _models_problem(config):
        print(f"atelier run: {problem}; `atelier doctor` checks the whole set-up", file=sys.stderr)
        return EXIT_USAGE
    import discord

    from bot.client import run_bot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_bot(config, os.environ[TOKEN_ENV]))
    except discord.LoginFailure:
        print(f"atelier run: Discord refused the token in ${TOKEN_ENV}; reset it in the Developer Portal",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _models_problem(config: AppConfig) -> str | None:
    """Why the bot could not serve anyone with this configuration's checkpoints, if it could not."""
    if not config.models:
        return "no [[models]] configured: add one for each checkpoint (config.toml has an example)"
    missing = [f"{m.name} ({m.checkpoint})" for m in config.models if not m.checkpoint.is_file()]
    if missing:
        return f"checkpoint file(s) not found: {', '.join(missing)}"
    return None


def _doctor(args: argparse.Namespace) -> int:
    from bot.doctor import Status, format_checks, run_checks

    checks = run_checks(_load(args))
    print(format_checks(checks))
    return EXIT_FAILED if any(c.status is Status.FAIL for c in checks) else 0


def _models(args: argparse.Namespace) -> int:
    from bot.model_report import describe_models

    config = _load(args)
    text, ok = describe_models(config.models, config.generation.upscaler)
    print(text)
    return 0 if ok else EXIT_FAILED


def _generate(args: argparse.Namespace) -> int:
    from bot.local_generate import UsageError, generate
    from models.loading import CheckpointError

    config = _load(args)
    try:
        paths = generate(args, config)
    except (UsageError, CheckpointError) as exc:
        print(f"atelier generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for path in paths:
        print(path)
    return 0


def _db_check(args: argparse.Namespace) -> int:
    from storage.maintenance import check, format_report

    report = asyncio.run(check(_load(args).storage))
    print(format_report(report))
    return 0 if report.ok else EXIT_FAILED


def _db_export(args: argparse.Namespace) -> int:
    from storage.maintenance import export_user

    print(json.dumps(asyncio.run(export_user(_load(args).storage, args.user)), indent=2))
    return 0


def _bench(module: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return importlib.import_module(module).main(args.options)

    return handler


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: $ATELIER_CONFIG, else ./config.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="A Discord bot that turns GPUs into a shared Stable Diffusion studio.",
        parents=[common],
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("run", _run, f"start the Discord bot (token from ${TOKEN_ENV})")
    _generate_arguments(command("generate", _generate, "generate images locally, without Discord"))
    command("models", _models, "list configured checkpoints and what was detected in each file")
    command("doctor", _doctor, "check Python, PyTorch, GPUs, checkpoints, data folder and token")

    bench = commands.add_parser("bench", help="benchmarks that print figures (not tests)")
    benches = bench.add_subparsers(title="benchmarks", required=True, metavar="BENCH")
    for name, handler, help in (
        ("engine", _bench("generation.engine_bench"), "UNet step time, image latency and VRAM, beside diffusers"),
        ("storage", _bench("storage.bench"), "job inserts, state updates and history queries per second"),
        ("queue", _bench("generation.queue_bench"), "submit and dispatch cost, fairness and waits over a day"),
        ("serve", _bench("bot.serve_bench"), "delivered images/s through queue, runner and storage vs the engine alone"),
    ):
        # add_help=False: `atelier bench NAME --help` reaches the benchmark's own parser.
        benches.add_parser(name, help=help, add_help=False).set_defaults(handler=handler, passthrough=True)

    db = commands.add_parser("db", help="database maintenance")
    dbs = db.add_subparsers(title="actions", required=True, metavar="ACTION")
    dbs.add_parser("check", parents=[common], help="integrity check, file reconciliation, counts").set_defaults(
        handler=_db_check
    )
    export = dbs.add_parser("export", parents=[common], help="write a user's history as JSON to stdout")
    export.add_argument("--user", type=int, required=True, help="Discord user id")
    export.set_defaults(handler=_db_export)
    return parser


def _generate_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--checkpoint", type=Path, help="checkpoint file (default: the config's default model; with --upscale, its upscaler if one is set)")
    sub.add_argument("--model-config", type=Path, help="the checkpoint's original inference YAML")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--negative-prompt", default="")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--steps", type=int)
    sub.add_argument("--sampler", choices=SAMPLER_NAMES)
    sub.add_argument("--guidance", type=float)
    sub.add_argument("--width", type=int)
    sub.add_argument("--height", type=int)
    sub.add_argument("--count", type=int, default=1)
    sub.add_argument("--init-image", type=Path, help="img2img / inpaint source image")
    sub.add_argument("--strength", type=float, help="img2img strength in (0, 1]")
    sub.add_argument("--mask", type=Path, help="inpaint mask (white = repaint)")
    sub.add_argument("--mask-blur", type=int, default=4, help="inpaint seam feather radius in pixels")
    sub.add_argument("--only-masked", action="store_true", help="inpaint a crop around the mask at full size")
    sub.add_argument("--outpaint", help="extend --init-image on these sides: left,right,up,down (any of them)")
    sub.add_argument("--by", type=int, default=128, help="pixels --outpaint adds on each side (multiple of 8)")
    sub.add_argument("--upscale", action="store_true", help="upscale --init-image (x4 upscaler or hires 2x)")
    sub.add_argument("--variation-seed", type=int, help="txt2img: blend in this seed's noise")
    sub.add_argument("--variation-strength", type=float, default=0.0, help="how much of --variation-seed")
    sub.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    sub.add_argument("--out", type=Path, required=True, help="output PNG (PATH-1.png ... with --count)")
