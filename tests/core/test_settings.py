"""One definition per setting, the dataclass field: params.yaml, the CLI's help and docs/configuration.md agree."""

import dataclasses

import pytest
import typer.main
import yaml

from zhclip.components.cli import app
from zhclip.components.core.architecture import ModelConfig
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.settings import (
    OVERLAYS,
    SECTIONS,
    config_class,
    config_from,
    default_of,
    help_of,
    load_params,
    reference_page,
    section_fields,
    section_help,
    setting,
    shared,
)

from conftest import REPO, run_cli

# What this project (the demo) sets differently from the platform's defaults; every other value in
# params.yaml must equal its default, so a default changed in code cannot silently disagree with it.
PROJECT_CHOICES = {"start.source", "start.vision", "start.text", "search.galleries"}

# The params.yaml sections each command reads: each of their settings a flag can carry is a flag.
COMMAND_SECTIONS = {
    "demo-data": ["demo_data"],
    "demo-towers": ["demo_towers", "model"],
    "ingest": ["ingest", "spill"],
    "validate": ["validate", "spill"],
    "start": ["start", "model"],
    "train": ["train", "model", "mlflow"],
    "evaluate": ["evaluate"],
    "zeroshot": ["zeroshot"],
    "register": ["register", "mlflow"],
    "index": ["index", "search", "mlflow"],
    "serve": ["serve", "search", "mlflow"],
    "upload": ["object_store"],
}


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(SECTIONS))
def test_each_section_is_one_documented_dataclass(name):
    cls = config_class(name)
    assert dataclasses.is_dataclass(cls) and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help: declare it with setting()"
        assert section_help(name, field.name) == help_of(cls, field.name)  # what the CLI reads without importing
        shared_from = field.metadata["shared_from"]
        if shared_from:  # declared shared(Owner, name): the owner's setting, its default and its help
            owner = section_fields(config_class(shared_from))[field.name]
            assert (default_of(field), help_of(cls, field.name)) == (default_of(owner), owner.metadata["help"])


def test_a_shared_field_names_a_setting_of_a_section():
    @dataclasses.dataclass
    class NoSection:
        """A dataclass that no params.yaml section has."""

        size: int = setting(1, "a size")

    with pytest.raises(ValueError, match="ModelConfig has no setting 'presets' to share"):
        shared(ModelConfig, "presets")
    with pytest.raises(ValueError, match="NoSection is the config of no params.yaml section"):
        shared(NoSection, "size")


def test_params_yaml_holds_every_setting_at_its_default_but_the_projects_choices(params):
    assert list(params) == list(SECTIONS)
    overlaid = {}  # keys a stage section sets: per-stage choices, so `train` leaves them out
    for name, base in OVERLAYS.items():
        keys = set(params[name])
        overlaid[base] = overlaid.get(base, set()) | keys
        assert keys <= set(section_fields(config_class(name))), f"params.yaml section {name}: unknown keys"
    for name, values in params.items():
        if name in OVERLAYS:
            continue
        fields = section_fields(config_class(name))
        expected = set(fields) - overlaid.get(name, set())
        assert set(values) == expected, (
            f"params.yaml section {name}: add {expected - set(values)}, remove {set(values) - expected}"
        )
        for key, value in values.items():
            default = default_of(fields[key])
            if f"{name}.{key}" in PROJECT_CHOICES:
                assert value != default, f"{name}.{key} equals its default: drop it from PROJECT_CHOICES"
            else:
                assert value == default, f"params.yaml {name}.{key} is {value!r}, the code's default {default!r}"


def test_every_config_builds_from_the_repository_params(params):
    """Each section's config takes params.yaml's values (a stage's: its own over train's)."""
    for name in SECTIONS:
        base = OVERLAYS.get(name)
        config = config_from(config_class(name), params, *([base, name] if base else [name]))
        expected = {**(params.get(base) or {}), **params[name]} if base else params[name]
        assert {key: getattr(config, key) for key in expected} == expected, name


def test_every_setting_of_a_commands_sections_is_a_flag_with_the_settings_help():
    commands = typer.main.get_command(app).commands
    for command, sections in COMMAND_SECTIONS.items():
        flags = {option.name: option for option in commands[command].params if "__" in (option.name or "")}
        for section in sections:
            for key, field in section_fields(config_class(section)).items():
                if field.type not in ("int", "float", "str", "bool", "list[str]"):
                    continue  # a mapping: --set section.key={...}
                option = flags.pop(f"{section}__{key}")
                text = section_help(section, key)
                assert option.help == f"{text[:1].upper()}{text[1:]} (params.yaml {section}.{key}).", option.name
                assert f"--{key.replace('_', '-')}" in option.opts
        assert not flags, f"zhclip {command}: flags of sections the test does not list: {sorted(flags)}"


def test_a_setting_added_to_a_dataclass_is_a_flag_with_no_edit_of_the_cli(tmp_path, monkeypatch):
    """A new section's dataclass, in a module of its own: the command that reads it has a flag for
    each of its settings and --set for all of them, the flag winning over params.yaml and --set."""
    from typer.testing import CliRunner

    from zhclip.components import cli
    from zhclip.components.core import settings

    (tmp_path / "toy_settings.py").write_text(
        "from dataclasses import dataclass\n"
        "from zhclip.components.core.settings import setting\n\n"
        "@dataclass\nclass ToyConfig:\n"
        '    """Section `toy`."""\n\n'
        '    knob: int = setting(1, "a knob added today")\n'
        '    names: dict[str, str] = setting({}, "a mapping: --set only")\n',
        encoding="utf-8",
    )
    (tmp_path / "params.yaml").write_text("toy:\n  knob: 2\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(settings.SECTIONS, "toy", "toy_settings:ToyConfig")
    toy_app, seen = typer.Typer(), []

    @toy_app.command()
    @cli.with_settings("toy")
    def use(*, settings: dict) -> None:
        seen.append(config_from(config_class("toy"), settings, "toy"))

    runner = CliRunner()
    (knob,) = [option for option in typer.main.get_command(toy_app).params if option.name == "toy__knob"]
    assert knob.opts == ["--knob"] and knob.help == "A knob added today (params.yaml toy.knob)."
    given = ["--params", str(tmp_path / "params.yaml"), "--set", "toy.names={a: b}", "--set", "toy.knob=5"]
    assert runner.invoke(toy_app, given).exit_code == 0
    assert runner.invoke(toy_app, [*given, "--knob", "7"]).exit_code == 0
    assert [(config.knob, config.names) for config in seen] == [(5, {"a": "b"}), (7, {"a": "b"})]
    refused = runner.invoke(toy_app, [*given, "--set", "toy.knobb=1"])
    assert refused.exit_code != 0 and "unknown keys ['knobb']" in str(refused.exception)


def test_configuration_page_is_generated_from_the_code(params):
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == reference_page(params), "docs/configuration.md is stale: run `zhclip config`"
    assert "| `warmup_steps` | `20` |" in page and "| `source` | `scratch` | `towers` |" in page


def test_a_missing_params_file_is_named_unless_told_to_use_defaults(tmp_path):
    with pytest.raises(ZhclipError, match=r"nowhere\.yaml not found .* --defaults"):
        load_params(tmp_path / "nowhere.yaml")
    assert load_params(None) == {}
    refused = run_cli("ingest", "--raw", "raw", "--out", "prepared", cwd=tmp_path)
    assert refused.returncode == 2 and "params.yaml not found" in refused.stderr and "Traceback" not in refused.stderr
    defaults = run_cli("ingest", "--raw", "raw", "--out", "prepared", "--defaults", cwd=tmp_path)
    assert defaults.returncode == 2 and "params.yaml" not in defaults.stderr and "raw" in defaults.stderr


def test_unknown_sections_and_keys_are_refused_by_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ZhclipError, match=r"unknown sections \['trian'\]"):
        load_params(path)
    with pytest.raises(ZhclipError, match=r"section 'train': unknown keys \['preset'\]"):
        config_from(config_class("train"), {"train": {"preset": "tiny"}}, "train")  # a `model` setting
