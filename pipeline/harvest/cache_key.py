"""The cache key: a hash of exactly what changes the activations.

In: model identity (package version / file hash / hub revision) and dtype, text identity
(package version or content hashes, dataset config, token column, document cap),
tokenisation, hooks, storage dtype, and the store format version. Out: anything cosmetic
(paths, streaming, batch size, device, progress, chunking, codec settings other than the
zstd-gpu layout). Defaults are filled in
by validation before hashing, so writing a default out or omitting it gives the same key.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.harvest.models import model_identity
from pipeline.harvest.text_sources import source_identity
from pipeline.manifests.harvest import HarvestManifest

STORE_FORMAT = 1
# Text fields added after keys were pinned; they enter the key only when set.
NEW_TEXT_FIELDS = ("dataset_config", "token_field", "max_documents")
KEY_LENGTH = 16


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def storage_material(manifest: HarvestManifest) -> dict:
    """The storage dtype, plus the zstd-gpu layout when chosen (``decode: gpu`` needs that
    layout, so a store of the default layout must not answer for it); other codec settings
    are cosmetic and absent, so every earlier key stays valid."""
    material: dict = {"storage_dtype": manifest.storage.dtype}
    if manifest.storage.codec == "zstd-gpu":
        material["storage_layout"] = "zstd-gpu"
    return material


def key_material(manifest: HarvestManifest) -> dict:
    """The canonical description that the key hashes; stored with the cache for audit."""
    if manifest.model.source == "planted":  # no model, no text: the spec is the identity
        return {
            "format": STORE_FORMAT,
            "model": {"source": "planted", "planted": manifest.model.planted_spec.model_dump()},
            "tokenization": manifest.tokenization.model_dump(),
            "hooks": manifest.hooks.model_dump(),
            **storage_material(manifest),
        }
    model = manifest.model.model_dump(exclude={"path", "planted"})
    if manifest.model.source == "gguf":
        model.pop("name")  # a display name; the file hash is the identity
    if manifest.model.source != "random":
        model = {k: v for k, v in model.items() if k not in ("n_layers", "d_model", "seed")}
    text = manifest.text.model_dump(exclude={"paths", "streaming"})
    for name in NEW_TEXT_FIELDS:  # absent at their defaults: older keys stay valid
        if text[name] is None:
            del text[name]
    return {
        "format": STORE_FORMAT,
        "model": {**model, "identity": model_identity(manifest.model)},
        "text": {**text, "identity": source_identity(manifest.text)},
        "tokenization": manifest.tokenization.model_dump(),
        "hooks": manifest.hooks.model_dump(),
        **storage_material(manifest),
    }


def hash_material(material: dict) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:KEY_LENGTH]


def cache_key(manifest: HarvestManifest) -> str:
    return hash_material(key_material(manifest))
