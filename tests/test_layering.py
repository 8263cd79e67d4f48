"""The package's layering holds: every import runs downward, as the sub-packages declare.

Each sub-package's ``__init__`` docstring opens with ``Layer N of 7``; a module may import
from its own sub-package, from lower layers and from the top-level ``pipeline.paths``,
never from a higher layer or from ``pipeline.api``/``pipeline.cli``. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LAYER_LINE = re.compile(r"Layer (\d+) of (\d+)")
README = PACKAGE.parent / "README.md"


def declared_layers() -> dict[str, int]:
    layers = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        match = LAYER_LINE.search(ast.get_docstring(ast.parse(init.read_text())) or "")
        assert match, f"{init} does not say its layer ('Layer N of M')"
        layers[init.parent.name] = int(match.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, nested ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from pipeline import store` names a sub-package, not an attribute
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, module) for line, module in found if module.split(".")[0] == "pipeline"]


def upward_imports(layers: dict[str, int]) -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = module_name(path).split(".")
        if len(parts) < 2 or parts[1] not in layers:
            continue  # top-level modules (api, cli, paths) sit outside the layers
        own = layers[parts[1]]
        for line, module in imported_modules(path):
            target = module.split(".")[1] if "." in module else ""
            if target in ("api", "cli") or (target in layers and layers[target] > own):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return problems


def test_every_sub_package_declares_a_distinct_layer():
    layers = declared_layers()
    assert sorted(layers.values()) == list(range(1, len(layers) + 1)), layers


def test_imports_only_run_downward():
    assert upward_imports(declared_layers()) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: the same scan over a copy with one upward import reports it."""
    layers = declared_layers()
    lowest = min(layers, key=layers.get)
    highest = max(layers, key=layers.get)
    copy = tmp_path / "pipeline"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    victim = copy / lowest / "__init__.py"
    victim.write_text(victim.read_text() + f"\n\ndef f():\n    from pipeline.{highest} import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", copy)
    problems = upward_imports(layers)
    assert problems, "an import from the lowest layer into the highest went unreported"
    assert all(p.startswith(f"pipeline/{lowest}/__init__.py:") for p in problems), problems


def test_the_listing_names_the_stages():
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 11, sorted(entries)


def readme_rows() -> dict[str, str]:
    """The README's pipeline table: sub-package name -> the text of its row."""
    text = README.read_text()
    table = text[text.index("| step | sub-package") : text.index("Each sub-package imports only")]
    rows = {}
    for row in table.splitlines():
        match = re.search(r"`pipeline/(\w+)/` \(\d+\)", row)
        if match:
            rows[match.group(1)] = row
    return rows


def test_readme_table_has_a_row_per_sub_package_in_layer_order():
    layers = declared_layers()
    rows = readme_rows()
    assert sorted(rows) == sorted(layers)
    for name, row in rows.items():
        assert f"`pipeline/{name}/` ({layers[name]})" in row


@pytest.mark.parametrize("name", sorted(declared_layers()))
def test_readme_row_names_exactly_the_modules_there(name):
    row = readme_rows()[name]
    # names inside this sub-package: `x.py` or `readers/`, not other sub-packages' paths
    named = {
        n
        for n in re.findall(r"`([\w/]+(?:\.py|/))`", row)
        if not n.startswith(("pipeline/", "stages/"))
    }
    folder = PACKAGE / name
    on_disk = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
    on_disk |= {f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").exists()}
    assert named <= on_disk, f"README names {sorted(named - on_disk)} that pipeline/{name}/ lacks"
    assert on_disk <= named, f"pipeline/{name}/ has {sorted(on_disk - named)} the README omits"


def test_readme_paths_exist():
    for path in set(re.findall(r"`((?:pipeline|stages)/[\w/.]+)`", README.read_text())):
        assert (PACKAGE.parent / path).exists(), f"README names {path}, which is not there"


def test_results_hold_no_code():
    """results/ is what the README cites; scripts that write it live in bench/."""
    code = sorted(str(p) for p in (PACKAGE.parent / "results").rglob("*.py"))
    assert code == [], f"move these to bench/: {code}"
