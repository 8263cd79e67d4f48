"""Reading declarative manifests (YAML or TOML) into frozen pydantic models.

Every failure names the file and the dotted field, so a researcher can fix the manifest
without reading a traceback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ManifestError(ValueError):
    """A manifest that cannot be read or does not validate; the message names file and field."""


def read_mapping(path: Path) -> dict:
    """Parse a YAML (safe loader) or TOML file into a plain mapping."""
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ManifestError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}"
        ) from err
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: the top level must be a mapping of fields")
    return data


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field 'a.b': message``."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{source}: field '{field}': {message}")
    return "\n".join(lines)


def validate(model: type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ManifestError(describe_validation_error(err, source)) from None


def load_manifest(model: type[M], path: str | Path) -> M:
    path = Path(path)
    return validate(model, read_mapping(path), str(path))
