"""Load a run config from YAML, apply `--set a.b=value` overrides, validate once.

Errors name the key, the value given and what is allowed, and are raised as
`ConfigError` before any work starts.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stablediff.config.schema import RunConfig
from stablediff.errors import ConfigError

# The bundled recipes ship inside the package, so a wheel finds them from any directory.
RECIPES = resources.files("stablediff.config") / "recipes"


def recipe_names() -> list[str]:
    """The bundled recipes, by the name `stablediff train NAME` takes."""
    return sorted(entry.name.removesuffix(".yaml") for entry in RECIPES.iterdir() if entry.name.endswith(".yaml"))


def resolve_config_path(name: str | Path) -> Path | Traversable:
    """A path as given (a user's file wins), or the name of a bundled recipe (`digits`, `tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES / str(name), RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(name)!r} not found, nor a bundled recipe of that name "
                      f"(bundled recipes: {', '.join(recipe_names())})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file} must hold a mapping of sections (data:, train:, ...), not {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _check_key_exists(key)
        set_dotted(raw, key, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """`train.max_steps=10` -> ("train.max_steps", 10); the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (for example train.max_steps=100), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _check_key_exists(key: str) -> None:
    """Unknown keys in --set fail with the list of keys allowed at that level."""
    model: type[BaseModel] | None = RunConfig
    walked: list[str] = []
    for part in key.split("."):
        if model is None:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(walked)!r} has no sub-keys")
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"unknown config key {key!r}; allowed at {where}: {', '.join(sorted(fields))}")
        walked.append(part)
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in err["loc"][:-1])
            lines.append(f"  {key}: unknown key; allowed: {', '.join(_allowed_keys(parent))}")
        elif not err["loc"]:  # a check across sections: its message names the keys; the input is the whole config
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            given = err.get("input")
            lines.append(f"  {key} = {given!r}: {err['msg']}")
    return "\n".join(lines)


def _allowed_keys(dotted: str) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in filter(None, dotted.split(".")):
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
