"""Typed configuration: pydantic models that reject unknown keys, loaded from YAML.

Each component (data import, synthetic generator, and later encoder, VQ, meta,
runner, eval) has its own small model; a module receives only its own. Models
are frozen, forbid unknown keys, and validation errors become one-line
``ConfigError`` messages naming the field and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from metarec_dist.errors import ConfigError

ModelT = TypeVar("ModelT", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config: immutable, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _first_problem(model: type[StrictModel], error: ValidationError, where: str) -> str:
    """One line for the first validation problem: the field, what is wrong, the fix."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(root)"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) if len(first["loc"]) == 1 else "see the docs"
        return f"{where}: unknown key '{field}'; known keys: {known}{more}"
    return f"{where}: field '{field}': {first['msg']}{more}"


def build_config(model: type[ModelT], values: dict[str, Any], where: str) -> ModelT:
    """Validate ``values`` into ``model``; ``where`` names the source in errors."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_first_problem(model, error, where)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=c`` into (["a", "b"], c), with ``c`` read as YAML (so 3 is int)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set seed=3")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def load_config(model: type[ModelT], path: Path | None, overrides: list[str] = ()) -> ModelT:
    """Load ``model`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror}); check the path") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{key}' is not a section")
        node[keys[-1]] = value
    if overrides:
        where = f"{where} with --set overrides"
    return build_config(model, values, where)
