"""The newcomer's path: every shell example in README.md and docs/*.md, run exactly as typed
after a smoke-sized `make smoke` in a temporary data directory, then docs/api_example.py.

Blocks are found generically (every fenced ```bash / ```sh / ```shell block), so a new
example is run as soon as it is documented. The only commands not run are in ``SKIPPED``,
each with its reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.paths import data_dir

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.S | re.M)
SMOKE_SHRINK = 10  # the suite's smoke run trains a tenth of `make smoke`'s tokens

# pattern (searched in the command) -> why the test does not run it
SKIPPED = {
    r"^make smoke\b": "the fixture runs its command (`pipeline run` on smoke.yaml)",
    r"^make test\b": "the suite this test belongs to",
    r"--device cuda|--decode gpu|\bnvidia-smi\b|bench/gpu_": "needs a GPU",
    r"--judge (openai|transformers)": "needs an LLM",
    r"^(pip|apt-get|curl|wget|git clone)\b": "needs the network",
}


def shell_examples(path: Path) -> list[tuple[int, str]]:
    """``(line, command)`` for every command in the document's shell blocks; ``\\``
    continuations joined, blank and comment-only lines dropped."""
    text = path.read_text()
    found = []
    for block in FENCE.finditer(text):
        first = text[: block.start(1)].count("\n") + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(1).splitlines()):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                found.append((start, command))
    return found


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, command)), None)


def test_shell_examples_are_found_generically(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```bash\n# a comment\npipeline ls   # note\n\npipeline show \\\n  abc\n```\n"
        "```python\nprint(1)\n```\n    pipeline indented\n```sh\nmake test\n```\n"
    )
    assert shell_examples(doc) == [(4, "pipeline ls   # note"), (6, "pipeline show    abc"),
                                   (14, "make test")]  # fmt: skip
    assert skip_reason("make test") and skip_reason("pipeline harvest m.yaml --device cuda")
    assert skip_reason("pipeline evaluate crosscoder --no-splice") is None


def _shrunk_manifests(work: Path) -> None:
    """The repo's manifests with the smoke experiment and the smoke coder manifests cut to a
    tenth of their tokens alike, so `pipeline train` on a coder manifest still names the
    experiment's run."""
    shutil.copytree(REPO / "manifests", work / "manifests")
    smoke = work / "manifests" / "experiments" / "smoke.yaml"
    spec = yaml.safe_load(smoke.read_text())
    spec["defaults"]["training"]["tokens"] //= SMOKE_SHRINK
    spec["evaluation"] |= {"latents_sampled": 8, "max_tokens": 1200}
    smoke.write_text(yaml.safe_dump(spec, sort_keys=False))
    for coder in (work / "manifests" / "coders").glob("smoke-*.yaml"):
        spec = yaml.safe_load(coder.read_text())
        spec["training"]["tokens"] //= SMOKE_SHRINK
        coder.write_text(yaml.safe_dump(spec, sort_keys=False))


def _smoke_key() -> str:
    from pipeline.harvest.cache_key import cache_key
    from pipeline.manifests.harvest import load_harvest_manifest

    return cache_key(load_harvest_manifest(REPO / "manifests/harvest/smollm2-wiki-smoke.yaml"))


def _environment(data: Path) -> dict[str, str]:
    """A fresh data directory sharing only the downloaded model and text packages, and the
    finished smoke store when this machine has one (read-only: a harvest is the slow part
    on a loaded machine, and the key proves it is the same store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMX_")}
    data.mkdir()
    for shared in ("assets", "models"):
        (data_dir() / shared).mkdir(parents=True, exist_ok=True)
        (data / shared).symlink_to(data_dir() / shared)
    key = _smoke_key()
    store = Path(os.environ.get("FMX_CACHE_DIR", data_dir() / "cache")) / key
    if (store / "complete.json").is_file():
        (data / "cache").mkdir()
        (data / "cache" / key).symlink_to(store)
    bin_dir = str(Path(sys.executable).parent)  # `pipeline`, `torchrun` of this venv
    env |= {"FMX_DATA_DIR": str(data), "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(REPO)}
    return env


def _run(command: list[str] | str, cwd: Path, env: dict[str, str], where: str) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, shell=isinstance(command, str), capture_output=True,
        text=True, timeout=2400, executable="/bin/bash" if isinstance(command, str) else None,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{where}: rc {done.returncode}\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def after_smoke(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A working directory and environment in which `make smoke` (smoke-sized) has run."""
    root = tmp_path_factory.mktemp("newcomer")
    work = root / "work"
    work.mkdir()
    _shrunk_manifests(work)
    env = _environment(root / "data")
    _run("pipeline -q run manifests/experiments/smoke.yaml", work, env, "make smoke")
    return work, env


@pytest.mark.slow
def test_every_documented_shell_example_runs(after_smoke):
    work, env = after_smoke
    ran, skipped = [], []
    for doc in DOCUMENTS:
        for line, command in shell_examples(doc):
            where = f"{doc.relative_to(REPO)}:{line}: {command}"
            if skip_reason(command):
                skipped.append(where)
                continue
            _run(command, work, env, where)
            ran.append(where)
    assert len(ran) >= 12, ran  # the README's command list alone has nine
    assert all("make " in s or "cuda" in s or "--judge" in s for s in skipped), skipped
    assert (work / "exported" / "fmx" / "fmxcoders.json").is_file()


@pytest.mark.slow
def test_api_example_runs_on_the_smoke_run(after_smoke):
    work, env = after_smoke
    where = "docs/api_example.py"
    out = _run([sys.executable, str(REPO / "docs" / "api_example.py")], work, env, where)
    assert "fmxcoder: L0" in out
    assert "'variant': 'fmxcoder'" in out, out[-2000:]  # load_results found the evaluation
