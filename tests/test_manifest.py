"""Bad harvest manifests fail with one ManifestError naming the file and the dotted field."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.manifests.harvest import HarvestManifest, load_harvest_manifest
from pipeline.manifests.io import ManifestError
from tests.conftest import TINY_MANIFEST_FILE

# (manifest text, dotted field the message must name, text the message must hold)
BAD_YAML = {
    "unknown-field": ("model:\n  sourc: random\n", "model.sourc", "unknown field"),
    "unknown-section": ("hook:\n  point: resid_post\n", "hook", "unknown field"),
    "wrong-type": ("tokenization:\n  num_tokens: lots\n", "tokenization.num_tokens", "integer"),
    "wrong-type-bool": (
        "tokenization:\n  prepend_bos: maybe\n",
        "tokenization.prepend_bos",
        "bool",
    ),
    "bad-literal": ("hooks:\n  point: blocks.3.hook_resid_pre\n", "hooks.point", "resid_post"),
    "bad-list-item": ("text:\n  languages: [en, de]\n", "text.languages.1", "'en'"),
    "out-of-range": ("tokenization:\n  test_fraction: 1.5\n", "tokenization.test_fraction", "1"),
    "gguf-without-path": ("model:\n  source: gguf\n", "model.path", "required"),
    "path-without-gguf": ("model:\n  path: /m.gguf\n", "model.path", "only used"),
    "files-without-paths": ("text:\n  source: files\n", "text.paths", "at least one"),
    "layers-not-ascending": ("hooks:\n  layers: [3, 1]\n", "hooks.layers", "ascending"),
    "layers-empty": ("hooks:\n  layers: []\n", "hooks.layers", "at least one"),
    "num-tokens-not-multiple": (
        "tokenization:\n  context_length: 32\n  num_tokens: 100\n",
        "tokenization.num_tokens",
        "multiple of tokenization.context_length",
    ),
    "chunk-tokens-not-multiple": (
        "tokenization:\n  context_length: 32\n  num_tokens: 64\nstorage:\n  chunk_tokens: 48\n",
        "storage.chunk_tokens",
        "multiple of tokenization.context_length",
    ),
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_invalid_field_names_file_and_dotted_field(tmp_path, case):
    text, field, detail = BAD_YAML[case]
    path = write(tmp_path, f"{case}.yaml", text)
    with pytest.raises(ManifestError) as caught:
        load_harvest_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert field in message
    assert detail in message
    assert "Traceback" not in message


def test_every_problem_gets_its_own_line(tmp_path):
    path = write(tmp_path, "two.yaml", "model:\n  sourc: random\ntokenization:\n  seed: x\n")
    with pytest.raises(ManifestError) as caught:
        load_harvest_manifest(path)
    assert str(caught.value).splitlines() == [
        f"{path}: field 'model.sourc': unknown field",
        f"{path}: field 'tokenization.seed': must be an integer, not 'x'",
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("broken.yaml", "model: [\n", "not valid yaml"),
        ("broken.toml", "[model\nsource = 1\n", "not valid toml"),
        ("list.yaml", "- model\n- text\n", "the top level must be a mapping of fields"),
        ("scalar.yaml", "just words\n", "the top level must be a mapping of fields"),
        ("empty.yaml", "", "the top level must be a mapping of fields"),
    ],
)
def test_unreadable_manifest_names_the_file(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(ManifestError) as caught:
        load_harvest_manifest(path)
    assert str(caught.value).startswith(f"{path}: {expected}")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ManifestError, match="no such manifest file") as caught:
        load_harvest_manifest(path)
    assert str(caught.value) == f"{path}: no such manifest file"


def test_toml_gives_the_same_manifest_as_yaml(tmp_path):
    toml = write(
        tmp_path,
        "tiny.toml",
        """
[model]
source = "random"
n_layers = 4
d_model = 64
seed = 0

[text]
source = "wiki_summaries"
languages = ["en"]

[tokenization]
context_length = 32
num_tokens = 2048

[storage]
chunk_tokens = 512

[run]
progress = false
""",
    )
    assert load_harvest_manifest(toml) == load_harvest_manifest(TINY_MANIFEST_FILE)


def test_toml_errors_name_the_dotted_field(tmp_path):
    path = write(tmp_path, "bad.toml", '[hooks]\npoint = "blocks.0.logits"\n')
    with pytest.raises(ManifestError) as caught:
        load_harvest_manifest(path)
    assert str(caught.value).startswith(f"{path}: field 'hooks.point': ")


def test_example_manifests_validate():
    for path in sorted((TINY_MANIFEST_FILE.parent).glob("*.yaml")):
        assert isinstance(load_harvest_manifest(path), HarvestManifest)


def test_manifest_is_frozen(tiny_manifest):
    manifest = tiny_manifest()
    with pytest.raises(Exception, match="frozen"):
        manifest.tokenization.seed = 3


# --- CLI: one line, exit 1, no traceback -------------------------------------------------

CLI_CASES = {
    "unknown-field": ("model:\n  sourc: random\n", "field 'model.sourc': unknown field"),
    "wrong-type": (
        "tokenization:\n  num_tokens: lots\n",
        "field 'tokenization.num_tokens': must be an integer, not 'lots'",
    ),
    "gguf-without-path": (
        "model:\n  source: gguf\n",
        "field 'model': model.path is required when model.source is 'gguf'",
    ),
    "num-tokens-not-multiple": (
        "tokenization:\n  context_length: 32\n  num_tokens: 100\n",
        "field 'tokenization': tokenization.num_tokens (100) must be a multiple "
        "of tokenization.context_length (32)",
    ),
    "chunk-tokens-not-multiple": (
        "tokenization:\n  context_length: 32\n  num_tokens: 64\nstorage:\n  chunk_tokens: 48\n",
        "field '(top level)': storage.chunk_tokens (48) must be a multiple of "
        "tokenization.context_length (32)",
    ),
    "not-a-mapping": ("- a\n- b\n", "the top level must be a mapping of fields"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_reports_one_line_and_exits_1(tmp_path, case):
    text, message = CLI_CASES[case]
    path = write(tmp_path, f"{case}.yaml", text)
    result = CliRunner().invoke(main, ["harvest", str(path), "--cache-root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == f"Error: {path}: {message}\n"
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.incomplete")), "nothing is harvested from a bad manifest"


def test_cli_missing_manifest(tmp_path):
    path = tmp_path / "nowhere.yaml"
    result = CliRunner().invoke(main, ["harvest", str(path)])
    assert result.exit_code == 1
    assert result.output == f"Error: {path}: no such manifest file\n"


def test_cli_bad_yaml_is_an_error_not_a_traceback(tmp_path):
    path = write(tmp_path, "broken.yaml", "model: [\n")
    result = CliRunner().invoke(main, ["harvest", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: not valid yaml: ")
    assert "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1, result.output


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    yield prefix, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_command_has_an_example():
    runner = CliRunner()
    commands = list(all_commands(main))
    assert {"harvest", "ls", "show"} <= {path[-1] for path, _ in commands if path}
    lacking = []
    for path, _ in commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, result.output
        if "Example" not in result.output:
            lacking.append(" ".join(("pipeline", *path)))
    assert not lacking, f"help text without an Example: {lacking}"
