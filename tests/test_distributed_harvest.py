"""Distributed harvest on a 2-process LocalCluster equals a single-process harvest, bit for
bit, also when a worker is SIGKILLed mid-shard and dask retries the shard elsewhere."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.cli import main
from pipeline.harvest.cache_key import cache_key
from stages import harvest
from stages.distributed_harvest import plan_shards
from tests.conftest import TINY_MANIFEST_FILE
from tests.helpers import almost_full
from tests.test_harvest import assert_same_store

pytestmark = pytest.mark.slow  # worker processes import torch and load the model (~20 s)


class KillOnce(WorkerPlugin):
    """Test-only dask worker plugin: the first time block ``block`` is written on any worker,
    fill its chunks with junk and SIGKILL the worker before the block's marker exists.

    Every completed ``write_block`` appends its block number to ``log``; ``flag`` records
    that the kill happened (it survives the killed process, so the retry writes normally).
    """

    name = "kill-once"

    def __init__(self, block: int, flag: Path, log: Path) -> None:
        self.block, self.flag, self.log = block, str(flag), str(log)

    def setup(self, worker) -> None:
        from pipeline.store.writer import StoreWriter

        self.original = StoreWriter.write_block
        plugin = self

        def write_block(writer, block, stored, keep):
            if block == plugin.block and not os.path.exists(plugin.flag):
                start, stop = writer.block_rows(block)
                for array in writer.arrays:
                    array[start:stop] = np.full((stop - start, array.shape[1]), 7, array.dtype)
                Path(plugin.flag).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            plugin.original(writer, block, stored, keep)
            with open(plugin.log, "a") as handle:
                handle.write(f"{block}\n")

        StoreWriter.write_block = write_block

    def teardown(self, worker) -> None:
        from pipeline.store.writer import StoreWriter

        StoreWriter.write_block = self.original


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as local:
        yield local


def test_plan_shards_cuts_contiguous_runs():
    assert plan_shards([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert plan_shards([5, 1, 2, 7], 3) == [[1, 2], [5], [7]]  # resume: gaps split shards
    assert plan_shards([], 4) == []


def test_bad_local_scheduler_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "harvest",
            str(TINY_MANIFEST_FILE),
            "--cache-root",
            str(tmp_path),
            "--scheduler",
            "local:zero",
        ],
    )
    assert result.exit_code == 1
    assert result.output == "Error: --scheduler local:zero: expected local:N with N >= 1\n"


def test_cluster_harvest_equals_single_process(cluster, tiny_manifest, tiny_store, tmp_path):
    manifest = tiny_manifest()
    assert cache_key(manifest) == tiny_store.name
    result = harvest.run(manifest, tmp_path, scheduler=cluster.scheduler_address, shard_blocks=1)
    assert not result.cache_hit
    assert_same_store(result.path, tiny_store)
    again = harvest.run(manifest, tmp_path, scheduler=cluster.scheduler_address)
    assert again.cache_hit


def test_cluster_harvest_refuses_up_front_when_the_store_cannot_fit(
    cluster, tiny_manifest, tmp_path, monkeypatch
):
    """The coordinator checks the disk before any worker writes (a shared store root)."""
    from pipeline.store.writer import DiskFullError

    almost_full(monkeypatch)
    with pytest.raises(DiskFullError, match=r"this harvest \(uncompressed upper bound\) needs"):
        harvest.run(tiny_manifest(), tmp_path, scheduler=cluster.scheduler_address)
    assert not list(tmp_path.rglob("*.zarr")) and not list(tmp_path.rglob("zarr.json"))


def test_killed_worker_is_retried_to_an_identical_store(
    cluster, tiny_manifest, tiny_store, tmp_path
):
    from distributed import Client

    flag, log = tmp_path / "killed", tmp_path / "written.log"
    with Client(cluster) as client:
        # Shards [0, 1] and [2, 3]: the kill lands on block 3 after block 2 was marked.
        client.register_plugin(KillOnce(3, flag, log), name=KillOnce.name)
        try:
            result = harvest.run(
                tiny_manifest(),
                tmp_path / "cache",
                scheduler=client.scheduler.address,
                shard_blocks=2,
            )
        finally:
            client.unregister_worker_plugin(KillOnce.name)
    assert flag.exists(), "the worker was never killed"
    written = sorted(int(line) for line in log.read_text().split())
    assert written == [0, 1, 2, 3], "the retry redid a marked block or lost one"
    assert_same_store(result.path, tiny_store)
