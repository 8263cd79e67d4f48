"""The Python API: stores, trained coders and evaluation results from a notebook.

``from pipeline import open_store, load_coder, load_results`` (``pipeline/__init__.py``
imports this module on first use, so ``import pipeline`` stays light). See
``docs/api_example.py`` for a runnable example; ``tests/test_api.py`` runs it.

* ``open_store(key_or_path)`` -> ``Store``: hook names, the tokens and documents tables
  (pyarrow), raw rows, and ``dataset(...)``: a ``torch.utils.data.IterableDataset`` of
  shuffled, normalised batches ``[batch, n_layers, d_model]`` for a plain ``DataLoader``.
* ``load_coder(run)`` -> ``RawCoder``: the trained coder wrapped so that ``encode`` /
  ``decode`` / ``forward`` take and return raw activations (normalisation inside).
* ``load_results(run_or_report)`` -> ``{table name: pyarrow.Table}`` (or pandas).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.store.catalog import find_run, find_store
from pipeline.store.outliers import DEFAULT_RATIO, excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader, Normaliser
from pipeline.training.run_record import RunRecord, load_record


class ActivationDataset(IterableDataset):
    """Shuffled, normalised ``[batch_size, n_layers, d_model]`` float32 batches of a store.

    Use with ``DataLoader(dataset, batch_size=None)`` (the batches are already formed).
    Each pass is one epoch in a fixed order (``seed`` and the epoch number), so two passes
    differ and reruns repeat; with ``num_workers > 1`` each worker yields every n-th batch.
    """

    def __init__(
        self,
        store: ActivationStore,
        *,
        batch_size: int,
        split: str = "train",
        layers: list[int] | None = None,
        centre: bool = True,
        seed: int = 0,
        outlier_ratio: float | None = DEFAULT_RATIO,
    ) -> None:
        super().__init__()
        self.store, self.batch_size, self.split = store, batch_size, split
        self.layers = list(range(store.n_layers)) if layers is None else list(layers)
        self.centre, self.seed, self.outlier_ratio = centre, seed, outlier_ratio
        self._epoch = 0

    def __iter__(self) -> Iterator[Tensor]:
        worker = get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        loader = ActivationLoader(
            self.store,
            batch_size=self.batch_size,
            layers=self.layers,
            split=self.split,
            seed=self.seed,
            centre=self.centre,
            mode="stream",
            workers=1,
            outlier_ratio=self.outlier_ratio,
        )
        epoch, self._epoch = self._epoch, self._epoch + 1
        try:
            for i, batch in enumerate(loader.epoch(epoch)):
                if i % count == index:
                    yield batch
        finally:
            loader.close()

    def __len__(self) -> int:
        """Batches per epoch (for progress bars)."""
        from pipeline.training.loader import split_rows

        excluded = excluded_rows(outlier_scan(self.store, self.outlier_ratio))
        return -(-len(split_rows(self.store, self.split, exclude=excluded)) // self.batch_size)


class Store:
    """A finished activation store, read-only: what a notebook needs from it."""

    def __init__(self, store: ActivationStore) -> None:
        self._store = store

    @property
    def key(self) -> str:
        return self._store.key

    @property
    def path(self) -> Path:
        return self._store.paths.root

    @property
    def hook_names(self) -> list[str]:
        """TransformerLens hook names, one per stored layer (index = layer position)."""
        return list(self._store.hook_names)

    @property
    def layers(self) -> list[int]:
        """Positions of the stored layers (what a coder manifest's ``layers`` indexes)."""
        return list(range(self._store.n_layers))

    @property
    def n_tokens(self) -> int:
        return self._store.n_tokens

    @property
    def d_model(self) -> int:
        return self._store.d_model

    @property
    def manifest(self) -> dict[str, Any]:
        """The harvest manifest and key material the store was built from."""
        return self._store.manifest

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        """One row per stored token (token id, document, position, offsets, ...)."""
        return self._store.tokens(columns)

    def documents(self) -> pa.Table:
        """One row per document (its split, source fields)."""
        return self._store.documents()

    def read(
        self,
        start: int,
        stop: int,
        layers: list[int] | None = None,
        hooks: list[str] | None = None,
    ) -> Tensor:
        """Raw activations of rows ``[start, stop)``: float32 ``[rows, n_layers, d_model]``.
        ``hooks=coder.hook_names`` reads exactly the layers a coder was trained on."""
        return self._store.read(start, stop, layers, hooks)

    def normaliser(
        self,
        layers: list[int] | None = None,
        centre: bool = True,
        outlier_ratio: float | None = DEFAULT_RATIO,
    ) -> Normaliser:
        """The per-layer normalisation training uses (``apply`` / ``invert``), over the
        tokens training keeps (``pipeline.store.outliers``; None: every token)."""
        outliers = outlier_scan(self._store, outlier_ratio)
        return Normaliser.from_store(self._store, layers or self.layers, centre, outliers)

    def dataset(
        self,
        batch_size: int = 1024,
        split: str = "train",
        layers: list[int] | None = None,
        centre: bool = True,
        seed: int = 0,
        outlier_ratio: float | None = DEFAULT_RATIO,
    ) -> ActivationDataset:
        """Shuffled normalised batches (split ``train``, ``test`` or ``all``), without the
        massive-activation tokens training drops (``outlier_ratio`` None keeps them)."""
        return ActivationDataset(
            self._store, batch_size=batch_size, split=split, layers=layers, centre=centre,
            seed=seed, outlier_ratio=outlier_ratio,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"Store({self.key}: {self.n_tokens} tokens x {len(self.layers)} layers)"


def open_store(key_or_path: str | Path, cache_root: str | Path | None = None) -> Store:
    """A store by directory, or by cache key (a unique prefix is enough, as in
    ``pipeline show``) under ``cache_root`` (default ``$FMX_CACHE_DIR``)."""
    path = Path(key_or_path).expanduser()
    if path.is_dir():
        return Store(ActivationStore(path))
    return Store(find_store(str(key_or_path), Path(cache_root) if cache_root else None))


class RawCoder(nn.Module):
    """A trained coder that works on raw activations ``[..., n_layers, d_model]``.

    ``encode`` normalises then encodes; ``decode`` decodes then undoes the normalisation,
    so ``decode(encode(x))`` is the reconstruction of ``x`` in its own units. ``coder``
    is the underlying coder (normalised units); ``record`` holds hook names and provenance.
    """

    def __init__(self, coder: nn.Module, record: RunRecord) -> None:
        super().__init__()
        self.coder = coder
        self.record = record

    @property
    def hook_names(self) -> list[str]:
        return self.record.hook_names

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def config(self) -> Any:
        return self.coder.config

    @property
    def n_latents(self) -> int:
        return self.coder.n_latents

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Codes ``[batch, n_latents]`` of raw activations ``[batch, n_layers, d_model]``."""
        return self.coder.encode(self.record.normalise(x))

    @torch.no_grad()
    def decode(self, f: Tensor) -> Tensor:
        """Raw-unit reconstruction ``[batch, n_layers, d_model]`` of codes ``f``."""
        return self.record.denormalise(self.coder.decode(f))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _checkpoint_dir(run: str | Path, runs_root: Path | None) -> Path:
    target = Path(run).expanduser()
    if not target.exists():
        target = find_run(str(run), runs_root)
    if (target / "coder.json").is_file():
        return target
    if (target / "final" / "coder.json").is_file():
        return target / "final"
    raise FileNotFoundError(f"{target}: no final checkpoint (still training? see `pipeline runs`)")


def load_coder(
    run: str | Path,
    device: str | torch.device = "cpu",
    runs_root: str | Path | None = None,
    cache_root: str | Path | None = None,
) -> RawCoder:
    """A trained coder on raw activations, from a run directory, a checkpoint directory,
    or a run's name / hash prefix (as ``pipeline runs`` lists them, under ``runs_root``).
    The normalisation comes from the run's ``final/normalisation.safetensors`` (older runs:
    from their cache under ``cache_root``)."""
    from pipeline.training.checkpoint import load_coder as load_checkpoint

    checkpoint = _checkpoint_dir(run, Path(runs_root) if runs_root else None)
    record = load_record(checkpoint, Path(cache_root) if cache_root else None)
    return RawCoder(load_checkpoint(checkpoint, device), record).to(device).eval()


_TABLES = ("variants", "per_layer", "probing", "latents", "sampled")


def _report_listing(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest report that evaluated ``run_dir`` and its summary row: ``pipeline run``
    writes ``results/<name>/report/`` (under the working directory) and may reuse a report
    without writing into the run, ``pipeline evaluate`` a folder under $FMX_REPORTS_DIR."""
    import json

    from pipeline.evaluation.results import run_id
    from pipeline.paths import default_reports_root

    wanted = run_id(run_dir)
    found = [*Path("results").glob("*/report/results.json")]
    found += default_reports_root().glob("*/results.json")
    for summary in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            variants = json.loads(summary.read_text())["variants"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        row = next((v for v in variants if v.get("run_dir") == wanted), None)
        if row is not None:
            return summary.parent, row
    return None


def _rows_of(table: pa.Table, variant: str | None) -> pa.Table:
    """A report table cut to one variant's rows (probing names it in ``features``)."""
    if variant is None:
        return table
    if "variant" in table.column_names:
        keep = [v == variant for v in table.column("variant").to_pylist()]
    elif "features" in table.column_names:
        keep = [f.split(" @ ")[0] == variant for f in table.column("features").to_pylist()]
    else:
        return table
    return table.filter(pa.array(keep))


def load_results(run_or_report: str | Path, pandas: bool = False) -> dict[str, Any]:
    """Evaluation tables of a run (its latest ``pipeline evaluate``) or a report directory.

    Returns ``{"summary": pyarrow.Table (one row per variant), "per_layer": ..., ...}``;
    with ``pandas=True`` the same as pandas DataFrames (needs pandas installed)."""
    target = Path(run_or_report).expanduser()
    if not target.exists():
        target = find_run(str(run_or_report))
    from pipeline.evaluation.results import read_summaries

    variant = None  # set when the run's rows come out of a side-by-side report
    try:
        summaries = read_summaries(target)
        folder = target if (target / "results.json").is_file() else None
        if folder is None:
            folder = next(
                (r / "evaluation" for r in (target, target.parent) if (r / "evaluation").is_dir()),
                None,
            )
    except FileNotFoundError:
        found = _report_listing(target)
        if found is None:
            raise
        folder, row = found
        summaries, variant = [row], row["variant"]
    rows = [{k: v for k, v in s.items() if not isinstance(v, dict | list)} for s in summaries]
    tables: dict[str, Any] = {"summary": pa.Table.from_pylist(rows)}
    for name in _TABLES:
        path = folder / f"{name}.parquet" if folder else None
        if path is not None and path.is_file():
            tables[name] = _rows_of(pq.read_table(path), variant)
    if pandas:
        import importlib.util

        if importlib.util.find_spec("pandas") is None:
            raise ImportError("load_results(pandas=True) needs pandas: pip install pandas")
        return {name: table.to_pandas() for name, table in tables.items()}
    return tables
