"""Shared helpers for tests that need a small real store (tiny random model, real text)."""

from __future__ import annotations

import shutil
from http.server import ThreadingHTTPServer
from pathlib import Path

from pipeline.manifests.harvest import HarvestManifest
from stages import harvest

TINY = {
    "model": {"source": "random", "n_layers": 4, "d_model": 64, "seed": 0},
    "text": {"source": "wiki_summaries", "languages": ["en"]},
    "tokenization": {"context_length": 32, "num_tokens": 2048},
    "storage": {"chunk_tokens": 512},
    "run": {"progress": False},
}


def almost_full(monkeypatch) -> None:
    """Every disk reports 1,000 bytes free (for the up-front disk checks)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 1000))


def harvest_tiny(cache_root: Path) -> Path:
    return harvest.run(HarvestManifest.model_validate(TINY), cache_root).path


# A small real store: SmolLM2-135M over English Wikipedia summaries, four layers.
REAL_SMALL = {
    "model": {"source": "packaged", "name": "smollm2-135m"},
    "text": {"source": "wiki_summaries", "languages": ["en"]},
    "tokenization": {"context_length": 128, "num_tokens": 4096},
    "hooks": {"layers": [0, 10, 20, 29]},
    "storage": {"chunk_tokens": 1024},
    "run": {"progress": False},
}


def harvest_real_small(cache_root: Path) -> Path:
    return harvest.run(HarvestManifest.model_validate(REAL_SMALL), cache_root).path


class QuietHTTPServer(ThreadingHTTPServer):
    """A loopback test server that prints nothing when a client hangs up mid-reply: on a
    loaded machine a handler thread can outlive its test and print a traceback into the
    output a later CLI test reads."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass
