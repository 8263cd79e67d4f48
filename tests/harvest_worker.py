"""Run one harvest in a subprocess, for the kill -9 and concurrency tests in test_harvest.py.

Test-only: with ``--block-delay`` it patches ``StoreWriter.write_block`` (in this process
only) to first overwrite half the block's chunks with junk and then pause, so that a
SIGKILL lands while chunk files exist for a block that has no marker yet. Prints the
``HarvestResult`` as one JSON line.

    python tests/harvest_worker.py manifest.json CACHE_ROOT --block-delay 0.4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def slow_junk_writes(delay: float) -> None:
    from pipeline.store.writer import StoreWriter

    original = StoreWriter.write_block
    rng = np.random.default_rng(0)

    def write_block(self, block, stored, keep):
        start, stop = self.block_rows(block)
        for array in self.arrays[: max(1, len(self.arrays) // 2)]:
            shape = (stop - start, array.shape[1])
            junk = rng.bytes(int(np.prod(shape)) * array.dtype.itemsize)
            array[start:stop] = np.frombuffer(junk, dtype=array.dtype).reshape(shape)
        time.sleep(delay)
        original(self, block, stored, keep)

    StoreWriter.write_block = write_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="HarvestManifest as JSON")
    parser.add_argument("cache_root", type=Path)
    parser.add_argument("--block-delay", type=float, default=0.0)
    parser.add_argument("--ready", type=Path, help="touch this file once imports are done")
    parser.add_argument("--go", type=Path, help="wait for this file before harvesting")
    args = parser.parse_args()

    import transformer_lens.model_bridge  # noqa: F401  (slow import: before the barrier)

    from pipeline.manifests.harvest import HarvestManifest
    from stages import harvest

    if args.block_delay:
        slow_junk_writes(args.block_delay)
    manifest = HarvestManifest.model_validate_json(args.manifest.read_text())
    if args.ready:
        args.ready.touch()
    while args.go and not args.go.exists():
        time.sleep(0.01)
    result = harvest.run(manifest, args.cache_root)
    print(json.dumps({"key": result.key, "path": str(result.path), "cache_hit": result.cache_hit}))


if __name__ == "__main__":
    main()
