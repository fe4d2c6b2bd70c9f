"""Settings: each step's dataclass is the one definition of its fields, defaults and help.

A field is declared with `setting(default, help)`. Everything else reads those definitions: params.yaml
lists every setting, at its default but for the project's own choices (tests/core/test_settings.py
checks it), the CLI makes a flag of each (`settings_in_source`, read without importing the step) and
`--set` for any (`parse_settings`, `apply_settings`), and `zhclip config` writes
docs/configuration.md from them. Every config is built
one way, `config_from`, from its own params.yaml section; a field that belongs to another section
is declared `shared(OwnerConfig, "name")`: it takes the owner's default and help and is set in the
owner's section, so what a step takes from elsewhere is visible in its definition and said once.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib
import importlib.util
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from zhclip.components.core.errors import ZhclipError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = TypeVar("Config", bound="DataclassInstance")  # a settings dataclass

# Each params.yaml section and the dataclass that defines it, in the order of the reference page.
# Strings, so this module imports no step (core is the bottom layer).
SECTIONS = {
    "demo_data": "zhclip.components.demo.data:DemoDataConfig",
    "demo_towers": "zhclip.components.demo.towers:DemoTowersConfig",
    "model": "zhclip.components.core.architecture:ModelConfig",
    "start": "zhclip.components.training.start:StartConfig",
    "spill": "zhclip.components.data.spill:SpillConfig",
    "ingest": "zhclip.components.data.ingest:IngestConfig",
    "validate": "zhclip.components.data.validate:ValidateConfig",
    "train": "zhclip.components.training.config:TrainConfig",
    "stage1": "zhclip.components.training.config:TrainConfig",
    "stage2": "zhclip.components.training.config:TrainConfig",
    "evaluate": "zhclip.components.evaluation.evaluate:EvaluateConfig",
    "zeroshot": "zhclip.components.evaluation.zeroshot:ZeroshotConfig",
    "benchmark": "zhclip.components.evaluation.suite_config:BenchmarkConfig",
    "mlflow": "zhclip.components.core.tracking:MlflowConfig",
    "register": "zhclip.components.registry.register:RegisterConfig",
    "index": "zhclip.components.search.index_build:IndexConfig",
    "search": "zhclip.components.search.service:SearchConfig",
    "serve": "zhclip.components.search.service:ServeConfig",
    "kubeflow": "zhclip.workflows.config:KubeflowConfig",
    "object_store": "zhclip.components.core.storage:ObjectStoreConfig",
}
# Sections that override another section's fields for one stage (they have no fields of their own).
OVERLAYS = {"stage1": "train", "stage2": "train"}


def setting(default: Any, help: str, *, shared_from: str = "", in_params: bool = True) -> Any:
    """A config field with its one-line help.

    `shared_from`: the params.yaml section the value is read from (e.g. `model` for the preset), so
    one value serves every step that needs it; `in_params=False`: set by the command, never by
    params.yaml (e.g. the training stage).
    """
    metadata = {"help": help, "shared_from": shared_from, "in_params": in_params}
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section_of(cls: type) -> str:
    """The params.yaml section that config class `cls` defines (an overlay such as stage1 defines none)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    for name, where in SECTIONS.items():
        if where == path and name not in OVERLAYS:
            return name
    raise ValueError(f"{path} is the config of no params.yaml section (core/settings.py SECTIONS)")


def shared(owner: type, name: str) -> Any:
    """A field whose value is setting `name` of `owner`'s section (e.g. `shared(ModelConfig, "preset")`):
    its default and help are the owner's, and params.yaml sets it there, once for every step."""
    field = next((f for f in dataclasses.fields(owner) if f.name == name), None)
    if field is None:
        raise ValueError(f"{owner.__name__} has no setting {name!r} to share")
    return setting(default_of(field), field.metadata["help"], shared_from=section_of(owner))


def help_of(cls: type, name: str) -> str:
    """The help of field `name` of config `cls` (what the CLI's option shows)."""
    for field in dataclasses.fields(cls):
        if field.name == name:
            return field.metadata["help"]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


@dataclasses.dataclass(frozen=True)
class SourceSetting:
    """A setting as its dataclass's source declares it: the annotation (as written), the help, and
    the section it is shared from ('' for its own)."""

    annotation: str
    help: str
    shared_from: str
    in_params: bool


@functools.cache
def settings_in_source(section_name: str) -> dict[str, SourceSetting]:
    """The settings of a params.yaml section, read from its dataclass's source, not imported: the CLI
    builds every command's options from these, and importing every step (torch, Ray, FastAPI...) to
    print help would make each command start seconds slower. tests/core/test_settings.py checks they
    equal the dataclass's own fields."""
    module, name = SECTIONS[section_name].split(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None  # SECTIONS names modules of this package, files
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)
    found = {}
    for node in cls.body:
        if not (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)  # a class body annotates names only
            and isinstance(node.value, ast.Call)
        ):
            continue
        call, annotation = node.value, ast.unparse(node.annotation)
        kind = getattr(call.func, "id", "")
        if kind == "setting":
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
            found[node.target.id] = SourceSetting(
                annotation,
                ast.literal_eval(call.args[1]),
                keywords.get("shared_from", ""),
                keywords.get("in_params", True),
            )
        elif kind == "shared":  # shared(OwnerConfig, "name"): the owner's help, read from the owner's source
            owner = _section_of_class_name(ast.unparse(call.args[0]))
            found[node.target.id] = SourceSetting(
                annotation, settings_in_source(owner)[ast.literal_eval(call.args[1])].help, owner, True
            )
    return found


def _section_of_class_name(name: str) -> str:
    """The section whose config class is called `name` (from SECTIONS, without importing it)."""
    (section,) = [key for key, where in SECTIONS.items() if where.endswith(f":{name}") and key not in OVERLAYS]
    return section


def section_help(section_name: str, name: str) -> str:
    """The help of setting `name` of a params.yaml section, read from its dataclass's source."""
    found = settings_in_source(section_name)
    if name not in found:
        raise KeyError(f"section {section_name!r} has no setting {name!r}")
    return found[name].help


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    assert field.default_factory is not dataclasses.MISSING  # setting() gives every field a default
    return field.default_factory()


def section_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of `cls` that its own params.yaml section may set."""
    return {
        f.name: f
        for f in dataclasses.fields(cls)
        if f.metadata.get("in_params", True) and not f.metadata.get("shared_from")
    }


def config_class(section_name: str) -> type:
    module, name = SECTIONS[section_name].split(":")
    return getattr(importlib.import_module(module), name)


def load_params(path: str | Path | None = "params.yaml") -> dict[str, Any]:
    """Read a params file; `None` means the built-in defaults (the CLI's `--defaults`).

    A missing file is an error, not an empty set: a command run outside the project would otherwise
    quietly train with other settings than the project's.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ZhclipError(
            f"{path} not found (looked in {path.resolve().parent}): run the command in the project "
            "folder, pass --params FILE, or --defaults to use the built-in defaults "
            "(docs/configuration.md lists them)"
        )
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ZhclipError(f"{path}: not valid YAML ({err})") from err
    except OSError as err:
        raise ZhclipError(f"{path} cannot be read ({err.strerror})") from err
    if not isinstance(params, dict):
        raise ZhclipError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ZhclipError(f"{path}: unknown sections {unknown}; known: {sorted(SECTIONS)}")
    return params


def section(params: dict[str, Any], name: str, fields: set[str] | dict) -> dict[str, Any]:
    """Section `name` of params, rejecting unknown keys so typos never pass silently."""
    values = params.get(name) or {}
    if not isinstance(values, dict):
        raise ZhclipError(f"params.yaml section '{name}': expected a mapping, got {values!r}")
    unknown = set(values) - set(fields)
    if unknown:
        raise ZhclipError(f"params.yaml section '{name}': unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return values


def parse_settings(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings (values read as YAML: `[]`, `{}`, numbers) as {section: {key: value}}."""
    chosen: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        target, sep, value = assignment.partition("=")
        section_name, dot, key = target.partition(".")
        if not (sep and dot and section_name and key):
            raise ZhclipError(f"--set {assignment!r}: expected section.key=value (e.g. model.preset=ViT-B-16)")
        if section_name not in SECTIONS:
            raise ZhclipError(f"--set {assignment!r}: no section {section_name!r}; known: {sorted(SECTIONS)}")
        chosen.setdefault(section_name, {})[key] = yaml.safe_load(value) if value else ""
    return chosen


def apply_settings(params: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`params` with `overrides` ({section: {key: value}}, from the command line) on top: a value for a
    section that stages overlay (`train`) is set in each overlay too, so it wins for every stage.
    Keys are checked where a config is built (`config_from`)."""
    merged = copy.deepcopy(params)
    for section_name, values in overrides.items():
        targets = [section_name, *(overlay for overlay, base in OVERLAYS.items() if base == section_name)]
        for target in targets:
            if target == section_name or target in merged:
                merged.setdefault(target, {}).update(values)
    return merged


def build_config(cls: type[Config], values: dict[str, Any], where: str) -> Config:
    """Dataclass `cls` from `values`, with whole floats turned back into ints where a field is an int.

    Pipeline parameters travel as JSON/protobuf, where every number is a float; `where` names the
    source of `values` in error messages.
    """
    hints = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        if hints.get(key) is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        coerced[key] = value
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as err:
        raise ZhclipError(f"{where}: {err}") from err


def config_from(cls: type[Config], params: dict[str, Any], *sections: str, **explicit: Any) -> Config:
    """Build `cls` from its params.yaml section(s) (later sections win: `"train", "stage1"`), the fields it
    shares with other sections, then the non-None `explicit` values (CLI flags, the stage)."""
    own = section_fields(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        shared = field.metadata.get("shared_from")
        if shared and field.name in (params.get(shared) or {}):
            values[field.name] = params[shared][field.name]
    for name in sections:
        values.update(section(params, name, own))
    values.update({key: value for key, value in explicit.items() if value is not None})
    return build_config(
        cls, values, f"params.yaml section{'s' if len(sections) > 1 else ''} {', '.join(map(repr, sections))}"
    )


def resolved_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every section's settings with the defaults filled in: what a run actually used (MLflow logs it).
    Built by `config_from`, so the values are the ones a step gets, validated."""
    resolved = {}
    for name in SECTIONS:
        cls, base = config_class(name), OVERLAYS.get(name)
        config = config_from(cls, params, *([base, name] if base else [name]))
        resolved[name] = {key: getattr(config, key) for key in section_fields(cls)}
    return resolved


def _cell(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|") if text else "`''`"


def reference_page(params: dict[str, Any]) -> str:
    """docs/configuration.md: every params.yaml section and setting, its default, this project's value
    where it differs, and its help, all read from the dataclasses."""
    lines = [
        "# Configuration",
        "",
        "Every setting of every step, generated from the code by `zhclip config` (do not edit by hand).",
        "params.yaml holds a project's values; a key left out takes the default below. Each setting of",
        "the sections a command reads is also its flag (`zhclip train --epochs 3`), and `--set",
        "section.key=value` sets any of them (mappings too) for one run; `dvc exp run -S section.key=value`",
        "runs a variant.",
        "Commands read `params.yaml` in the current folder (`--params FILE` for another, `--defaults`",
        "for none of it).",
        "",
    ]
    for name in SECTIONS:
        cls, base = config_class(name), OVERLAYS.get(name)
        lines += [f"## `{name}`", ""]
        if base:
            lines += [f"Any `{base}` setting, for this stage only: it overrides `{base}`.", ""]
            chosen = params.get(name) or {}
            if chosen:
                lines += ["| setting | this project |", "|---|---|"]
                lines += [f"| `{key}` | {_cell(value)} |" for key, value in chosen.items()]
                lines.append("")
            continue
        assert cls.__doc__ is not None  # every section's dataclass says what it is
        summary = " ".join(cls.__doc__.split()).removeprefix(f"Section `{name}`: ")
        lines += [summary[:1].upper() + summary[1:], ""]
        lines += ["| setting | default | this project | meaning |", "|---|---|---|---|"]
        chosen = params.get(name) or {}
        for key, field in section_fields(cls).items():
            default = default_of(field)
            project = _cell(chosen[key]) if key in chosen and chosen[key] != default else ""
            # Markdown would take `<set>` for an HTML tag and `|` for a column
            meaning = field.metadata["help"].replace("<", "&lt;").replace("|", "\\|")
            lines.append(f"| `{key}` | {_cell(default)} | {project} | {meaning} |")
        shared = [f for f in dataclasses.fields(cls) if f.metadata.get("shared_from")]
        if shared:
            lines += ["", "Also used: " + ", ".join(f"`{f.metadata['shared_from']}.{f.name}`" for f in shared) + "."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
