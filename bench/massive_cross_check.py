"""Train x test 2x2 for SmolLM2's massive-activation tokens (writes cross_check.json).

The coders of ``kept/`` (trained with the 16 massive tokens) and ``dropped/`` (trained
without them) are scored on the cpu-large test split with and without its 5 massive
tokens: which of the two decides the crosscoder-vs-fmxcoder order? FVU as ``evaluate``
defines it (mean over layers of residual energy over variance), in raw units.

    FMX_RUNS_DIR=<runs of those experiments> python bench/massive_cross_check.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline import load_coder, open_store
from pipeline.store.outliers import DEFAULT_RATIO, outlier_scan
from pipeline.training.loader import split_rows

HERE = Path(__file__).resolve().parents[1] / "results" / "cpu-large-massive"


def test_activations(store) -> tuple[torch.Tensor, np.ndarray]:
    rows = split_rows(store, "test")
    parts = []
    for chunk in range(store.n_chunks):
        start, stop = store.chunk_rows(chunk)
        picked = rows[(rows >= start) & (rows < stop)]
        if picked.size:
            parts.append(store.read(start, stop)[torch.from_numpy(picked - start)])
    return torch.cat(parts), rows


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    err = (x - x_hat).pow(2).sum((0, 2))
    return float((err / (x - x.mean(0)).pow(2).sum((0, 2))).mean())


def main() -> None:
    store = open_store("13797ab9fcf34098")._store
    x, rows = test_activations(store)
    ordinary = torch.from_numpy(~np.isin(rows, outlier_scan(store, DEFAULT_RATIO).rows))
    out = []
    for trained in ("kept", "dropped"):
        results = json.loads((HERE / trained / "report" / "results.json").read_text())
        for variant in results["variants"]:
            coder = load_coder(variant["run_dir"])
            with torch.no_grad():
                x_hat = torch.cat([coder(x[i : i + 2048]) for i in range(0, len(x), 2048)])
            out.append(
                {
                    "trained": trained,
                    "variant": variant["variant"],
                    "test_fvu_with_massive": round(fvu(x, x_hat), 4),
                    "test_fvu_without_massive": round(fvu(x[ordinary], x_hat[ordinary]), 4),
                    "massive_test_tokens": int((~ordinary).sum()),
                    "test_tokens": len(rows),
                }
            )
            print(out[-1])
    (HERE / "cross_check.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
