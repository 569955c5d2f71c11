"""bot/cli.py: the installed `atelier` command, the no-token guide, configuration errors, doctor."""

import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main

ATELIER = Path(sys.executable).with_name("atelier")


def atelier(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    return subprocess.run([str(ATELIER), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_help_lists_every_subcommand() -> None:
    result = atelier("--help")
    assert result.returncode == 0
    for name in ("run", "generate", "models", "doctor", "bench", "db"):
        assert f"    {name}" in result.stdout


def test_run_without_token_prints_the_setup_guide_and_fails(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text("[discord]\napplication_id = 987654321\n")
    result = atelier("run", "--config", str(config), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    guide = result.stderr
    assert "DISCORD_TOKEN is not set" in guide
    assert "bot and applications.commands" in guide
    assert "Attach Files" in guide and "Guild Messages" in guide
    assert "client_id=987654321&scope=bot+applications.commands&permissions=274878024704" in guide


def test_run_without_application_id_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    (tmp_path / "config.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 1
    guide = capsys.readouterr().err
    assert "application_id = ..." in guide and "client_id=" not in guide


def test_run_refuses_to_start_without_usable_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "a-token")
    config = tmp_path / "config.toml"
    config.write_text("")
    assert main(["run", "--config", str(config)]) == 2
    assert "no [[models]] configured" in capsys.readouterr().err
    config.write_text('[[models]]\nname = "sd15"\ncheckpoint = "gone.safetensors"\n')
    assert main(["run", "--config", str(config)]) == 2
    assert f"checkpoint file(s) not found: sd15 ({tmp_path / 'gone.safetensors'})" in capsys.readouterr().err


def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[generation]\nmax_steps = -1\n")
    result = atelier("--config", str(config), "doctor", env={"PATH": "/usr/bin:/bin", "ATELIER_CONFIG": "nope"})
    assert result.returncode == 2
    assert result.stderr.strip() == f"{config}: generation.max_steps: Input should be greater than or equal to 1 (got -1)"


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    config = tmp_path / "env.toml"
    config.write_text("[queue]\nmax_batch_images = 0\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(config))
    assert main(["run"]) == 2
    assert "queue.max_batch_images" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["engine", "storage", "queue"])
def test_benchmarks_take_their_own_options(bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["bench", bench, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: atelier bench {bench} ")


def config_with_models(tmp_path: Path, models: str) -> Path:
    config = tmp_path / "atelier.toml"
    config.write_text(f'[generation]\ndevice = "cpu"\n[storage]\ndata_dir = "state"\n{models}')
    return config


def test_doctor_on_a_cpu_machine_reports_each_check(tmp_path: Path) -> None:
    from tests.fixtures.checkpoints import write_checkpoint

    checkpoint, _ = write_checkpoint(tmp_path / "checkpoints", "sd2-v", with_yaml=False)
    config = config_with_models(
        tmp_path,
        f'[[models]]\nname = "tiny"\ncheckpoint = "{checkpoint}"\nprediction = "v"\n'
        '[[models]]\nname = "gone"\ncheckpoint = "checkpoints/missing.safetensors"\n',
    )
    result = atelier("doctor", "--config", str(config), env={"PATH": "/usr/bin:/bin", "DISCORD_TOKEN": "x"})
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("[  ok] Python: 3.") for line in lines)
    assert any(line.startswith("[  ok] PyTorch: 2.") for line in lines)
    assert "[  ok] device cpu: runs on the CPU" in result.stdout
    assert "[  ok] model tiny: sd2-v.safetensors: sd2-v, v-prediction (override)" in result.stdout
    assert f"[FAIL] model gone: {tmp_path / 'checkpoints' / 'missing.safetensors'}: no such file" in result.stdout
    assert f"[  ok] data folder: {tmp_path / 'state'} is writable" in result.stdout
    assert "[  ok] Discord token: DISCORD_TOKEN is set" in result.stdout
    assert lines[-1] == "1 problem(s) to fix, 0 warning(s)."


def test_doctor_fails_without_models_or_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["doctor", "--config", str(config_with_models(tmp_path, ""))]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] models: no [[models]] configured" in out
    assert "[FAIL] Discord token: DISCORD_TOKEN is not set\n       fix: run `atelier run` for the setup guide" in out


def test_models_lists_what_was_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures.checkpoints import write_checkpoint

    sd1, yaml = write_checkpoint(tmp_path, "sd1", fmt="ckpt")
    inpaint, _ = write_checkpoint(tmp_path, "sd1-inpaint", with_yaml=False)
    config = config_with_models(
        tmp_path,
        f'[[models]]\nname = "a"\ncheckpoint = "{sd1}"\nconfig = "{yaml}"\n'
        f'[[models]]\nname = "b"\ncheckpoint = "{inpaint}"\ndefault = true\n',
    )
    assert main(["models", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"a: {sd1}"
    assert lines[1].startswith("  sd1, epsilon-prediction (yaml), text_encoder ")
    assert lines[1].endswith(" params, float16")
    assert lines[2] == f"b (default): {inpaint}"
    assert lines[3].startswith("  sd1-inpaint, epsilon-prediction (family default), ")


def test_models_marks_the_upscaler_and_doctor_fails_when_its_file_is_no_x4_upscaler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.checkpoints import write_checkpoint

    monkeypatch.setenv("DISCORD_TOKEN", "x")
    x4, _ = write_checkpoint(tmp_path, "x4-upscaler", with_yaml=False)
    sd1, yaml = write_checkpoint(tmp_path, "sd1")
    models = (f'[[models]]\nname = "big"\ncheckpoint = "{x4}"\n'
              f'[[models]]\nname = "tiny"\ncheckpoint = "{sd1}"\nconfig = "{yaml}"\n')
    good = config_with_models(tmp_path, models).read_text().replace(
        "[generation]\n", '[generation]\nupscaler = "big"\n')
    config = tmp_path / "upscaler.toml"
    config.write_text(good)
    assert main(["models", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"big (upscaler): {x4}" and lines[1].startswith("  x4-upscaler, ")
    assert lines[2] == f"tiny: {sd1}" and len(lines) == 4
    assert main(["doctor", "--config", str(config)]) == 0
    assert "[  ok] model big: x4-upscaler.safetensors: x4-upscaler, " in capsys.readouterr().out

    config.write_text(good.replace('upscaler = "big"', 'upscaler = "tiny"'))  # an SD 1.x file
    assert main(["models", "--config", str(config)]) == 1
    wrong = "[generation] upscaler names 'tiny', but sd1.safetensors is an sd1 checkpoint, not an x4-upscaler"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"big: {x4}" and lines[2] == f"tiny (upscaler): {sd1}"
    assert lines[4] == f"  error: {wrong}"
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] model tiny: {wrong}\n       fix: point its checkpoint at an x4 upscaler" in out
    # big is an x4 upscaler no longer named the upscaler: it cannot draw, so members are refused it
    assert ("[warn] model big: x4-upscaler.safetensors is an x4 upscaler, which cannot draw: members are refused it\n"
            '       fix: set [generation] upscaler = "big" for the U buttons') in out
    assert out.endswith("1 problem(s) to fix, 1 warning(s).\n")


def test_generate_draws_with_the_default_model_and_upscales_with_the_x4_upscalers_settings(tmp_path: Path) -> None:
    from PIL import Image

    from tests.fixtures.checkpoints import write_checkpoint

    x4, _ = write_checkpoint(tmp_path, "x4-upscaler", with_yaml=False)
    sd1, yaml = write_checkpoint(tmp_path, "sd1")
    config = tmp_path / "atelier.toml"
    config.write_text(f'[generation]\ndevice = "cpu"\nupscaler = "x4"\nupscaler_sampler = "euler"\nupscaler_steps = 1\n'
                      f'[[models]]\nname = "x4"\ncheckpoint = "{x4}"\n'
                      f'[[models]]\nname = "tiny"\ncheckpoint = "{sd1}"\nconfig = "{yaml}"\n')
    drawn, big = tmp_path / "drawn.png", tmp_path / "big.png"
    common = ["--config", str(config), "--prompt", "a fox", "--device", "cpu"]
    assert main(["generate", *common, "--steps", "1", "--width", "64", "--height", "64", "--out", str(drawn)]) == 0
    with Image.open(drawn) as image:  # the first model listed is the upscaler: the default is the next one
        assert image.info["parameters"].endswith("Model: tiny")
    assert main(["generate", *common, "--init-image", str(drawn), "--upscale", "--out", str(big)]) == 0
    with Image.open(big) as image:  # the configured upscaler, whose tiny VAE scales by 2
        assert image.size == (128, 128) and image.info["parameters"].endswith("Model: x4, Hires upscale: 4")
        assert "Steps: 1, Sampler: Euler, CFG scale: 9, " in image.info["parameters"]
    assert main(["generate", *common, "--checkpoint", str(x4), "--init-image", str(drawn), "--upscale",
                 "--out", str(big)]) == 0
    with Image.open(big) as image:
        assert image.size == (128, 128)


def test_generate_names_cached_steps_when_the_config_turns_them_on_but_not_on_upscales(tmp_path: Path) -> None:
    from PIL import Image

    from tests.fixtures.checkpoints import write_checkpoint

    sd1, yaml = write_checkpoint(tmp_path, "sd1")
    config = tmp_path / "atelier.toml"
    config.write_text(f'[generation]\ndevice = "cpu"\nstep_cache_interval = 2\n'
                      f'[[models]]\nname = "tiny"\ncheckpoint = "{sd1}"\nconfig = "{yaml}"\n')
    drawn, big = tmp_path / "drawn.png", tmp_path / "big.png"
    common = ["--config", str(config), "--prompt", "a fox", "--device", "cpu", "--steps", "2"]
    assert main(["generate", *common, "--width", "64", "--height", "64", "--out", str(drawn)]) == 0
    with Image.open(drawn) as image:
        assert image.info["parameters"].endswith("Model: tiny, Step cache: 2")
    assert main(["generate", *common, "--init-image", str(drawn), "--upscale", "--out", str(big)]) == 0
    with Image.open(big) as image:  # hires: tiled, never cached
        assert "Step cache" not in image.info["parameters"]


_TXT2IMG = ("--width", "128", "--height", "64")
_INPAINT = ("--init-image", "in.png", "--mask", "mask.png")
_UPSCALE = ("--init-image", "in.png", "--upscale")
#: family -> the options that make it run, and the PNG size they give.
_EVERY_FAMILY = {
    "sd1": (_TXT2IMG, (128, 64)),
    "sd2": (_TXT2IMG, (128, 64)),
    "sd2-v": (_TXT2IMG, (128, 64)),
    "sd1-inpaint": (_INPAINT, (64, 64)),
    "sd2-inpaint": (_INPAINT, (64, 64)),
    "x4-upscaler": (_UPSCALE, (128, 128)),  # the tiny x4 upscaler's VAE scales by 2
}


@pytest.mark.parametrize("family", _EVERY_FAMILY)
def test_generate_runs_every_family_and_repeats_a_seed_byte_for_byte(tmp_path: Path, family: str) -> None:
    """Issue 3's engine contract through the command a user runs: each family from its tiny file
    and original YAML, an ancestral sampler, the same seed giving the same PNG bytes twice."""
    from PIL import Image

    from tests.fixtures.checkpoints import write_checkpoint

    options, size = _EVERY_FAMILY[family]
    checkpoint, yaml = write_checkpoint(tmp_path, family)
    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    common = ["generate", "--checkpoint", str(checkpoint), "--model-config", str(yaml), "--prompt", "a red fox",
              "--sampler", "euler_a", "--steps", "2", "--seed", "5", "--count", "2", "--device", "cpu",
              "--config", "/dev/null", *(str(tmp_path / o) if o.endswith(".png") else o for o in options)]
    # Both runs in this process, whose torch conftest pins to one thread: bit-exact repeats on the
    # CPU need the same kernels and reduction order, not only the same seed.
    for name in ("a", "b"):
        assert main([*common, "--out", str(tmp_path / f"{name}.png")]) == 0
    first, repeat, next_seed = ((tmp_path / n).read_bytes() for n in ("a-1.png", "b-1.png", "a-2.png"))
    assert first == repeat and first != next_seed  # image 2 is made from seed 6
    with Image.open(tmp_path / "a-1.png") as image:
        assert image.size == size
        settings = image.info["parameters"].split("\n")[-1]
    assert settings.startswith("Steps: 2, Sampler: Euler a, ") and "Seed: 5, " in settings
    assert f", Model: {family}" in settings
