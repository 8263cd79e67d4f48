"""Held-out checks during training: FVU and L0 on a fixed sample of validation rows.

The sample is decoded once per run group from the validation split (train documents held
out by ``training.validation_fraction``), so overfitting shows in ``metrics.jsonl`` as
``val_fvu`` rising while ``fvu`` falls. FVU has ``evaluate``'s definition (``layer_fvu``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.coders.base import Coder, layer_fvu
from pipeline.loader import ActivationLoader
from pipeline.store import ActivationStore


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
            device=device,
            centre=centre,
            mode="stream",
            buffer_chunks=1,
            validation_fraction=fraction,
            outlier_ratio=outlier_ratio,
        )
    except ValueError:  # a store too small to hold out any document
        return None
    try:
        return next(iter(loader.epoch(0)))
    finally:
        loader.close()


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
