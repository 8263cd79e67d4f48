"""The cache key changes with exactly what changes the activations, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.harvest.cache_key import cache_key, hash_material, key_material
from pipeline.manifests.harvest import HarvestManifest, load_harvest_manifest
from tests.conftest import TINY_MANIFEST_FILE

# Pinned: if one of these moves, every existing cache is orphaned. Change them only on
# purpose (and then bump STORE_FORMAT if the store layout changed too).
TINY_RANDOM_KEY = "8cdf9041252243f5"
SMOLLM2_SMOKE_KEY = "2aedd5f32f234901"
FILES_KEY = "e11d6f74428b6a88"


def files_manifest(paths: list[Path], text_field: str = "text") -> HarvestManifest:
    data = {
        "model": {"source": "random"},
        "text": {"source": "files", "paths": [str(p) for p in paths], "text_field": text_field},
        "tokenization": {"context_length": 32, "num_tokens": 256},
    }
    return HarvestManifest.model_validate(data)


def test_pinned_keys():
    assert cache_key(load_harvest_manifest(TINY_MANIFEST_FILE)) == TINY_RANDOM_KEY
    smoke = TINY_MANIFEST_FILE.with_name("smollm2-wiki-smoke.yaml")
    assert cache_key(load_harvest_manifest(smoke)) == SMOLLM2_SMOKE_KEY


def test_pinned_key_of_a_self_contained_manifest(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat.\n\nA second paragraph, also short.\n")
    assert cache_key(files_manifest([text])) == FILES_KEY


def test_key_is_the_hash_of_the_audited_material(tiny_manifest):
    manifest = tiny_manifest()
    assert cache_key(manifest) == hash_material(key_material(manifest))


# --- stability ---------------------------------------------------------------------------

REORDERED = """
run: {progress: false}
storage:
  chunk_tokens: 512
tokenization:
  num_tokens: 2048
  context_length: 32
text: {languages: [en], source: wiki_summaries}
model: {seed: 0, d_model: 64, n_layers: 4, source: random}
"""

COMMENTED = """
# a comment at the top
model:
  source: random   # trailing comment
  n_layers: 4
  d_model: 64
  # seed below
  seed: 0
text:
  source: wiki_summaries
  languages: [en]
tokenization:
  context_length: 32
  num_tokens: 2048
storage:
  chunk_tokens: 512
"""

EVERY_DEFAULT_WRITTEN = """
model:
  source: random
  name: smollm2-135m
  path: null
  revision: null
  dtype: float32
  n_layers: 4
  d_model: 64
  seed: 0
text:
  source: wiki_summaries
  languages: [en]
  paths: []
  text_field: text
  dataset: null
  dataset_split: train
  dataset_revision: null
tokenization:
  context_length: 32
  prepend_bos: true
  num_tokens: 2048
  seed: 0
  test_fraction: 0.2
hooks:
  layers: all
  point: resid_post
storage:
  dtype: bfloat16
  codec: zstd
  level: 1
  shuffle: true
  checksum: true
  chunk_tokens: 512
run:
  batch_size: 8
  device: auto
  cache_root: null
  progress: true
"""

ONLY_WHAT_DIFFERS_FROM_DEFAULTS = """
model: {source: random}
tokenization: {context_length: 32, num_tokens: 2048}
storage: {chunk_tokens: 512}
"""


@pytest.mark.parametrize(
    "text",
    [REORDERED, COMMENTED, EVERY_DEFAULT_WRITTEN, ONLY_WHAT_DIFFERS_FROM_DEFAULTS],
    ids=["reordered", "commented", "defaults-written", "defaults-omitted"],
)
def test_equivalent_manifest_files_share_the_key(tmp_path, text):
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    assert cache_key(load_harvest_manifest(path)) == TINY_RANDOM_KEY


COSMETIC = {
    "run.batch_size": 3,
    "run.device": "cuda:1",
    "run.cache_root": "/elsewhere",
    "run.progress": True,
    "storage.codec": "none",
    "storage.level": 9,
    "storage.chunk_tokens": 1024,
    "storage.shuffle": False,
    "storage.checksum": False,
}


@pytest.mark.parametrize("field", sorted(COSMETIC))
def test_cosmetic_fields_keep_the_key(tiny_manifest, field):
    assert cache_key(tiny_manifest(**{field: COSMETIC[field]})) == TINY_RANDOM_KEY


def test_all_cosmetic_fields_at_once_keep_the_key(tiny_manifest):
    assert cache_key(tiny_manifest(**COSMETIC)) == TINY_RANDOM_KEY


def test_moved_text_file_keeps_the_key(tmp_path):
    content = "Same words.\n\nIn the same order.\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    first = tmp_path / "a" / "corpus.txt"
    moved = tmp_path / "b" / "deeper" / "renamed.txt"
    first.write_text(content)
    moved.write_text(content)
    assert cache_key(files_manifest([first])) == cache_key(files_manifest([moved]))


def test_moved_gguf_file_keeps_the_key(tmp_path):
    """A GGUF is identified by its bytes; its path and display name are cosmetic."""
    first, moved = tmp_path / "model.gguf", tmp_path / "copy-of-model.gguf"
    first.write_bytes(b"GGUF not really a model")
    moved.write_bytes(b"GGUF not really a model")
    a = HarvestManifest.model_validate({"model": {"source": "gguf", "path": str(first)}})
    b = HarvestManifest.model_validate(
        {"model": {"source": "gguf", "path": str(moved), "name": "another display name"}}
    )
    assert cache_key(a) == cache_key(b)


# --- sensitivity -------------------------------------------------------------------------

RELEVANT = {
    "model.source": {"model": {"source": "packaged"}},
    "model.dtype": {"model": {"dtype": "bfloat16"}},
    "model.seed": {"model": {"seed": 1}},
    "model.n_layers": {"model": {"n_layers": 3}},
    "model.d_model": {"model": {"d_model": 32}},
    "text.languages": {"text": {"languages": ["en", "fr"]}},
    "text.languages.order": {"text": {"languages": ["fr", "en"]}},
    "tokenization.context_length": {"tokenization": {"context_length": 64}},
    "tokenization.prepend_bos": {"tokenization": {"prepend_bos": False}},
    "tokenization.num_tokens": {"tokenization": {"num_tokens": 1024}},
    "tokenization.seed": {"tokenization": {"seed": 1}},
    "tokenization.test_fraction": {"tokenization": {"test_fraction": 0.1}},
    "hooks.layers": {"hooks": {"layers": [0, 2]}},
    "hooks.layers.other": {"hooks": {"layers": [1, 2]}},
    "hooks.point": {"hooks": {"point": "mlp_out"}},
    "hooks.point.resid_mid": {"hooks": {"point": "resid_mid"}},
    "hooks.point.ln2": {"hooks": {"point": "ln2.hook_normalized"}},
    "text.max_documents": {"text": {"max_documents": 40}},
    "storage.dtype": {"storage": {"dtype": "float16"}},
    "storage.dtype.fp32": {"storage": {"dtype": "float32"}},
}


@pytest.mark.parametrize("field", sorted(RELEVANT))
def test_each_relevant_field_changes_the_key(tiny_manifest, field):
    assert cache_key(tiny_manifest(**RELEVANT[field])) != TINY_RANDOM_KEY


def test_relevant_changes_give_distinct_keys(tiny_manifest):
    keys = [cache_key(tiny_manifest(**change)) for change in RELEVANT.values()]
    assert len(set(keys)) == len(keys)


def test_hub_name_and_revision_change_the_key():
    def hub(name: str, revision: str | None) -> str:
        spec = {"model": {"source": "hub", "name": name, "revision": revision}}
        return cache_key(HarvestManifest.model_validate(spec))

    keys = {
        hub("HuggingFaceTB/SmolLM2-135M", "main"),
        hub("HuggingFaceTB/SmolLM2-135M", "a1b2c3"),
        hub("HuggingFaceTB/SmolLM2-360M", "main"),
        hub("HuggingFaceTB/SmolLM2-135M", None),
    }
    assert len(keys) == 4


def test_gguf_content_changes_the_key(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF weights, version one")
    manifest = HarvestManifest.model_validate({"model": {"source": "gguf", "path": str(path)}})
    before = cache_key(manifest)
    path.write_bytes(b"GGUF weights, version two")
    assert cache_key(manifest) != before


def test_text_file_content_changes_the_key(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First version of the corpus.\n")
    before = cache_key(files_manifest([path]))
    path.write_text("Second version of the corpus.\n")
    assert cache_key(files_manifest([path])) != before


def test_text_file_order_and_field_change_the_key(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "alpha", "body": "x"}\n')
    b.write_text('{"text": "beta", "body": "y"}\n')
    keys = {
        cache_key(files_manifest([a, b])),
        cache_key(files_manifest([b, a])),
        cache_key(files_manifest([a, b], text_field="body")),
    }
    assert len(keys) == 3


def test_new_text_and_hook_spellings_keep_old_keys(tiny_manifest):
    """Fields added later are left out of the material at their defaults, and a hook may
    be spelt with or without its 'hook_' prefix."""
    assert cache_key(tiny_manifest(hooks={"point": "hook_resid_post"})) == TINY_RANDOM_KEY
    text = key_material(tiny_manifest())["text"]
    assert not {"dataset_config", "token_field", "max_documents", "streaming"} & set(text)


def test_dataset_config_and_token_column_change_the_key_but_streaming_does_not(tmp_path):
    def hub(**text) -> str:
        spec = {"source": "hf_dataset", "dataset": "wikitext", **text}
        return cache_key(
            HarvestManifest.model_validate({"model": {"source": "random"}, "text": spec})
        )

    plain = hub()
    assert hub(dataset_config="wikitext-2-raw-v1") != plain
    assert hub(token_field="input_ids") != plain
    assert hub(max_documents=100) != plain
    assert hub(streaming=True, max_documents=100) == hub(max_documents=100)
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text('{"text": "ab", "ids": [1, 2]}\n')
    assert cache_key(files_manifest([corpus])) != cache_key(
        HarvestManifest.model_validate(
            {
                "model": {"source": "random"},
                "text": {"source": "files", "paths": [str(corpus)], "token_field": "ids"},
                "tokenization": {"context_length": 32, "num_tokens": 256},
            }
        )
    )
