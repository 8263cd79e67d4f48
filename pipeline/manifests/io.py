"""Reading declarative manifests (YAML or TOML) into frozen pydantic models.

Every failure names the file and the dotted field, so a researcher can fix the manifest
without reading a traceback.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ManifestError(ValueError):
    """A manifest that cannot be read or does not validate; the message names file and field."""


class _ManifestLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; manifests are strictly typed, so a
    learning rate written the usual way must be a float, as YAML 1.2 has it."""


def _unique_mapping(loader: _ManifestLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are distinct: PyYAML keeps the last of ``k: 4`` / ``k: 8``
    silently, and a manifest that says two things must not mean one of them. A merge key
    (``<<: *base``) is not a duplicate, and a key written beside it overrides the merged one,
    as YAML says."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_ManifestLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_mapping(path: Path) -> dict:
    """Parse a YAML (safe loader) or TOML file into a plain mapping."""
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start}): not a manifest") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_ManifestLoader)  # safe: a SafeLoader subclass
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ManifestError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'yaml'}: {_syntax(err)}"
        ) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: the top level must be a mapping of fields")
    return data


def _syntax(err: Exception) -> str:
    """A parser error as one line: what and where (PyYAML's message spans 5-7 lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is not None and problem:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def check_name(name: str) -> str:
    """A label for tables and a one-line ``name`` file: not blank, one printable line."""
    if not name.strip():
        raise ValueError("must not be empty")
    if not name.isprintable():
        raise ValueError(f"must be one printable line, not {name!r}")
    return name


def check_writable_dir(path: str | Path, where: str) -> None:
    """``path`` is, or can be created as, a directory this process may write into.

    Checked before any work, so a cache or runs root pointing at a file, or at a read-only
    place, is one line naming ``where`` (``file: field 'x'``) instead of a late traceback."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ManifestError(f"{where}: {probe} is not a directory (needed for {path})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ManifestError(f"{where}: {probe} is not writable (needed for {path})")


def check_device(device: str, where: str) -> None:
    """The device exists on this machine ('auto', 'cpu', 'cuda', 'cuda:N', 'mps')."""
    import torch

    try:
        parsed = torch.device(device) if device != "auto" else torch.device("cpu")
    except (RuntimeError, ValueError):
        raise ManifestError(f"{where}: unknown device {device!r} (auto, cpu, cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ManifestError(
                f"{where}: {device!r} but CUDA is not available on this machine (use cpu or auto)"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ManifestError(
                f"{where}: {device!r} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ManifestError(f"{where}: {device!r} but MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ManifestError(f"{where}: unsupported device {device!r} (auto, cpu, cuda, cuda:N)")


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
