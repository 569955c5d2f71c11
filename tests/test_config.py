"""bot/config.py: the shipped config.toml loads, and every kind of mistake is refused with one
line naming the file and the key."""

from pathlib import Path

import pytest

from bot.config import AppConfig, ConfigError, config_path, load_config
from generation.settings import default_model

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_shipped_config_equals_the_documented_defaults() -> None:
    config = load_config(REPO / "config.toml")
    paths = {"storage": True, "generation": {"lora_dir", "embedding_dir"}}
    assert config.model_dump(exclude=paths) == AppConfig().model_dump(exclude=paths)
    assert (config.generation.lora_dir, config.generation.embedding_dir) == (REPO / "loras", REPO / "embeddings")
    assert config.storage.data_dir == REPO / "data"
    assert config.storage.database_path == REPO / "data" / "atelier.sqlite3"


def test_fused_projections_are_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert AppConfig().generation.fuse_projections is True
    assert load_config(write(tmp_path, "[generation]\nfuse_projections = false\n")).generation.fuse_projections is False


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    text = """
[storage]
data_dir = "state"
database = "/abs/db.sqlite3"
[[models]]
name = "sd15"
checkpoint = "ckpt/v1-5.safetensors"
config = "../yaml/v1-inference.yaml"
"""
    config = load_config(write(tmp_path, text))
    assert config.storage.data_dir == tmp_path / "state"
    assert config.storage.database_path == Path("/abs/db.sqlite3")
    assert config.models[0].checkpoint == tmp_path / "ckpt" / "v1-5.safetensors"
    assert config.models[0].config == tmp_path / "../yaml/v1-inference.yaml"


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[generation]\nmax_stepz = 30\n", "generation.max_stepz", "max_steps"),
        ("[storage]\ndatadir = 'x'\n", "storage.datadir", "data_dir"),
        ("[[models]]\nname = 'a'\ncheckpoint = 'a.ckpt'\ndefualt = true\n", "models[0].defualt", "default"),
        ("[discrod]\nguild_id = 1\n", "discrod", "discord"),
    ],
)
def test_misspelt_key_is_refused_naming_it_and_the_allowed_keys(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    message = refusal(tmp_path, text)
    assert message.count("\n") == 0
    assert message.startswith(f"{tmp_path / 'config.toml'}: {key}: unknown key; allowed here: ")
    assert allowed in message.split("allowed here: ")[1].split(", ")


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[generation]\nmax_steps = -5\n", "generation.max_steps", "greater than or equal to 1"),
        ("[generation]\nmax_count = 'four'\n", "generation.max_count", "valid integer"),
        ("[generation]\ndevice = 'gpu'\n", "generation.device", "allowed: auto, cpu, cuda, cuda:N"),
        ("[generation]\ndevice = ['cuda:0', 'tpu']\n", "generation.device", "'tpu' is not a device"),
        ("[generation]\ndefault_sampler = 'euler_b'\n", "generation.default_sampler", "'dpmpp_2m_karras'"),
        ("[queue]\nrole_weights = { Mods = 0 }\n", "queue.role_weights", "'Mods' must be > 0"),
        ("[limits]\nwindow_hours = 0\n", "limits.window_hours", "greater than 0"),
        ("[discord]\napi_base = 'localhost:80'\n", "discord.api_base", "pattern"),
        ("[[models]]\nname = 'x'\n", "models[0].checkpoint", "required key is missing"),
    ],
)
def test_bad_value_is_refused_naming_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    message = refusal(tmp_path, text)
    assert message.count("\n") == 0
    assert message.startswith(f"{tmp_path / 'config.toml'}: {key}: ")
    assert allowed in message


def test_cross_field_rules(tmp_path: Path) -> None:
    assert "default_steps (70) exceeds max_steps (60)" in refusal(tmp_path, "[generation]\ndefault_steps = 70\n")
    assert "upscaler_steps (20) exceeds max_steps (15)" in refusal(
        tmp_path, '[generation]\nupscaler = "x4"\nmax_steps = 15\ndefault_steps = 15\n')
    assert "upscaler_guidance (9) exceeds max_guidance (8)" in refusal(
        tmp_path, '[generation]\nupscaler = "x4"\nmax_guidance = 8\ndefault_guidance = 7\n')
    two_defaults = "".join(f"[[models]]\nname = '{n}'\ncheckpoint = 'c'\ndefault = true\n" for n in "ab")
    assert "at most one model may be the default; found a, b" in refusal(tmp_path, two_defaults)
    same_name = "[[models]]\nname = 'a'\ncheckpoint = 'c'\n" * 2
    assert "model names must be unique; repeated: a" in refusal(tmp_path, same_name)
    assert "limits.max_steps (80) exceeds generation.max_steps (60)" in refusal(
        tmp_path, "[limits]\nmax_steps = 80\n"
    )


def test_the_upscaler_must_be_a_configured_model_that_is_not_the_default(tmp_path: Path) -> None:
    def model(name: str, default: bool = False) -> str:
        return f"[[models]]\nname = '{name}'\ncheckpoint = 'c'\ndefault = {str(default).lower()}\n"

    upscaler = "[generation]\nupscaler = 'x4'\n"
    message = refusal(tmp_path, upscaler + model("sd15") + model("sd21"))
    assert message == (f"{tmp_path / 'config.toml'}: generation.upscaler: 'x4' is not a [[models]] name; "
                       "configured: sd15, sd21")
    assert "'x4' is marked default = true, but an upscaler cannot draw" in refusal(
        tmp_path, upscaler + model("sd15") + model("x4", default=True))
    assert "'x4' is the only model, and an upscaler cannot draw" in refusal(tmp_path, upscaler + model("x4"))
    config = load_config(write(tmp_path, upscaler + model("x4") + model("sd15")))
    assert default_model(config.models, config.generation.upscaler).name == "sd15"  # not the first, the upscaler
    assert default_model(config.models).name == "x4"


def test_every_error_gets_its_own_line(tmp_path: Path) -> None:
    message = refusal(tmp_path, "[generation]\nmax_steps = 0\nmax_count = 0\nbogus = 1\n")
    assert sorted(line.split(": ")[1] for line in message.splitlines()) == [
        "generation.bogus",
        "generation.max_count",
        "generation.max_steps",
    ]


def test_unreadable_files_are_explained(tmp_path: Path) -> None:
    assert "not valid TOML" in refusal(tmp_path, "[generation\n")
    with pytest.raises(ConfigError, match="no such configuration file; copy config.toml"):
        load_config(tmp_path / "missing.toml")


def test_config_path_precedence() -> None:
    assert config_path("cli.toml", {"ATELIER_CONFIG": "env.toml"}) == Path("cli.toml")
    assert config_path(None, {"ATELIER_CONFIG": "env.toml"}) == Path("env.toml")
    assert config_path(None, {}) == Path("config.toml")
