"""Documents to harvest, and the identity of where they came from (for the cache key)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.harvest.assets import WIKI_SUMMARIES, sha256_file, wiki_summaries_file
from pipeline.manifests.harvest import TextSpec


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    language: str = ""
    topic: str = ""
    token_ids: tuple[int, ...] | None = None  # pre-tokenised data: used instead of ``text``


class TextSourceError(ValueError):
    """A text file or dataset that cannot be read; the message names it."""


def _wiki_documents(spec: TextSpec) -> list[Document]:
    documents = []
    for language in spec.languages:
        path = wiki_summaries_file(language)
        entries = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(entries):
            entry = entries[title]
            text = (entry.get("extract") or "").strip()
            if text:
                documents.append(Document(title, text, language, entry.get("topic") or ""))
    return documents


def _token_ids(value, where: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(i) for i in value)
    except (TypeError, ValueError) as err:
        raise TextSourceError(f"{where}: not a list of token ids (text.token_field)") from err
    return ids


def _read_file(path: Path, text_field: str, token_field: str | None = None) -> list[Document]:
    if not path.is_file():
        raise TextSourceError(f"{path}: no such text file (text.paths)")
    if path.suffix == ".txt":
        if token_field:
            raise TextSourceError(f"{path}: a .txt file has no token column (text.token_field)")
        paragraphs = path.read_text(encoding="utf-8").split("\n\n")
        return [
            Document(f"{path.name}#{i}", p.strip()) for i, p in enumerate(paragraphs) if p.strip()
        ]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise TextSourceError(f"{path}: unsupported text file type (use .txt, .jsonl, .parquet)")
    documents = []
    field, setting = (token_field, "token_field") if token_field else (text_field, "text_field")
    for i, row in enumerate(rows):
        if field not in row:
            raise TextSourceError(f"{path}: row {i} has no field '{field}' (text.{setting})")
        title = str(row.get("title", f"{path.name}#{i}"))
        ids = _token_ids(row[field], f"{path}: row {i}") if token_field else None
        text = "" if token_field else str(row[field])
        documents.append(Document(title, text, row.get("language", ""), row.get("topic", ""), ids))
    return documents


def _hub_documents(spec: TextSpec) -> list[Document]:
    try:
        import datasets
    except ImportError as err:
        raise TextSourceError(
            "text.source 'hf_dataset' needs the 'datasets' package: pip install datasets"
        ) from err
    where = f"{spec.dataset}" + (f" ({spec.dataset_config})" if spec.dataset_config else "")
    rows = datasets.load_dataset(
        spec.dataset,
        spec.dataset_config,
        split=spec.dataset_split,
        revision=spec.dataset_revision,
        streaming=spec.streaming,
    )
    if spec.max_documents is not None:
        rows = (
            rows.take(spec.max_documents)
            if spec.streaming
            else rows.select(range(min(spec.max_documents, len(rows))))
        )
    field, setting = (
        (spec.token_field, "token_field") if spec.token_field else (spec.text_field, "text_field")
    )
    columns = getattr(rows, "column_names", None)
    if columns is not None and field not in columns:
        raise TextSourceError(
            f"{where}: no column '{field}' (text.{setting}); columns: {', '.join(columns)}"
        )
    documents = []
    for i, row in enumerate(rows):
        if field not in row:
            raise TextSourceError(f"{where}: row {i} has no column '{field}' (text.{setting})")
        if spec.token_field:
            ids = _token_ids(row[field], f"{where}: row {i}")
            documents.append(Document(f"{spec.dataset}#{i}", "", token_ids=ids))
        else:
            documents.append(Document(f"{spec.dataset}#{i}", str(row[field])))
    return documents


def load_documents(spec: TextSpec) -> list[Document]:
    """All documents of the source, in a stable order (shuffling happens in tokenisation)."""
    if spec.source == "wiki_summaries":
        return _wiki_documents(spec)[: spec.max_documents]
    if spec.source == "files":
        documents = [
            doc
            for p in spec.paths
            for doc in _read_file(Path(p), spec.text_field, spec.token_field)
        ]
        return documents[: spec.max_documents]
    return _hub_documents(spec)


def source_identity(spec: TextSpec) -> dict:
    """What identifies the text for the cache key: versions and content hashes, not paths."""
    if spec.source == "wiki_summaries":
        return {
            "package": f"{WIKI_SUMMARIES.package}=={WIKI_SUMMARIES.version}",
            "sha256": WIKI_SUMMARIES.wheel_sha256,
            "languages": list(spec.languages),
        }
    if spec.source == "files":
        hashes = []
        for p in spec.paths:
            path = Path(p)
            if not path.is_file():
                raise TextSourceError(f"{path}: no such text file (text.paths)")
            hashes.append(sha256_file(path))
        return {"sha256": hashes, "text_field": spec.text_field}
    return {
        "dataset": spec.dataset,
        "split": spec.dataset_split,
        "revision": spec.dataset_revision,
        "text_field": spec.text_field,
    }
