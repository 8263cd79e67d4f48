"""fmxcoders: harvest -> store -> loader -> coder -> checkpoint -> evaluate -> report.

The notebook API (``pipeline/api.py``; example in ``docs/api_example.py``)::

    from pipeline import open_store, load_coder, load_results

Those names are imported on first use, so ``import pipeline`` (and the CLI's ``--help``)
does not load torch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

# We choose numcodecs' Shuffle for zarr v3 on purpose (+15% compression); say so once, here.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")

if TYPE_CHECKING:
    from pipeline.api import load_coder, load_results, open_store

__all__ = ["load_coder", "load_results", "open_store"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
