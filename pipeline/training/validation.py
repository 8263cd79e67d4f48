"""Held-out checks during training: FVU and L0 on a fixed sample of validation rows.

The sample is decoded once per run group from the validation split (train documents held
out by ``training.validation_fraction``), so overfitting shows in ``metrics.jsonl`` as
``val_fvu`` rising while ``fvu`` falls. FVU has ``evaluate``'s definition (``layer_fvu``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.coders.base import Coder, layer_fvu
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader
from pipeline.training.readers.base import seeded_generator


def validation_sample(
    store: ActivationStore,
    layers: list[int],
    *,
    tokens: int,
    fraction: float,
    centre: bool,
    device: torch.device,
    outlier_ratio: float | None = None,
) -> Tensor | None:
    """Up to ``tokens`` normalised validation rows ``[n, L, d]`` on ``device`` (seeded, the
    same for every run of the cache); None when the run holds out no validation split."""
    if fraction <= 0:
        return None
    try:
        loader = ActivationLoader(
            store,
            batch_size=tokens,
            layers=layers,
            split="validation",
            seed=0,
            device="cpu",
            centre=centre,
            mode="stream",  # only its decoder and normaliser are used: nothing is decoded
            validation_fraction=fraction,
            outlier_ratio=outlier_ratio,
        )
    except ValueError:  # a store too small to hold out any document
        return None
    try:
        return _first_rows(loader, tokens).to(device)
    finally:
        loader.close()


def _first_rows(loader: ActivationLoader, tokens: int) -> Tensor:
    """The first ``tokens`` rows of a fixed shuffle: chunks in a seeded order, grouped into
    windows of at most one chunk's worth of rows, each window permuted (the order every
    recorded run's sample was drawn in); only the windows needed are decoded."""
    decoder = loader.decoder
    order = torch.randperm(decoder.store.n_chunks, generator=seeded_generator(0, 0))
    windows: list[list[int]] = []
    rows = 0
    for chunk in order.tolist():
        size = len(decoder.chunk_rows[chunk])
        if not size:
            continue
        if windows and rows + size <= decoder.store.chunk_tokens:
            windows[-1].append(chunk)
            rows += size
        else:
            windows.append([chunk])
            rows = size
    parts, taken = [], 0
    for index, chunks in enumerate(windows):
        values = decoder.decode(chunks, loader.normaliser)
        shuffled = torch.randperm(values.shape[0], generator=seeded_generator(0, 0, index + 1))
        parts.append(values[shuffled[: tokens - taken]])
        taken += parts[-1].shape[0]
        if taken == tokens:
            break
    return torch.cat(parts)


@torch.no_grad()
def held_out_terms(coder: Coder, x: Tensor) -> dict[str, Tensor]:
    """``val_fvu`` and ``val_l0`` of ``coder`` (inference form, as ``evaluate`` runs it) on
    ``x``; 0-d tensors left on the device."""
    was_training = coder.training
    coder.eval()
    try:
        f = coder.encode(x)
        x_hat = coder.decode(f)
    finally:
        coder.train(was_training)
    return {"val_fvu": layer_fvu(x, x_hat), "val_l0": (f > 0).sum(-1).float().mean()}
