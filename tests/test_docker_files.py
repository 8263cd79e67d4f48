"""The Docker files describe a working GPU deployment (structure only: no Docker engine here).

Compose: a scheduler, GPU workers that reach it, a harvest job pointed at the same address,
one shared data volume. Dockerfile: a CUDA PyTorch base, the project installed, `pipeline`
as the entrypoint.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
SCHEDULER_PORT = 8786


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, in order (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    parsed: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            parsed.setdefault(instruction.upper(), []).append(rest.strip())
    return parsed


def workers(compose: dict) -> dict[str, dict]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("entrypoint", [])[:2] == ["dask", "worker"]
    }


def scheduler_address(compose: dict) -> str:
    (name,) = [
        name
        for name, service in compose["services"].items()
        if service.get("entrypoint", [])[:2] == ["dask", "scheduler"]
    ]
    return f"tcp://{name}:{SCHEDULER_PORT}"


def test_scheduler_listens_where_everyone_connects(compose):
    address = scheduler_address(compose)
    scheduler = compose["services"][address.split("//")[1].split(":")[0]]
    assert "--port" in scheduler["command"]
    assert scheduler["command"][scheduler["command"].index("--port") + 1] == str(SCHEDULER_PORT)
    assert f"{SCHEDULER_PORT}:{SCHEDULER_PORT}" in scheduler["ports"]
    harvest = compose["services"]["harvest"]["command"]
    assert harvest[0] == "harvest"
    assert harvest[harvest.index("--scheduler") + 1] == address
    assert (REPO / harvest[1]).is_file(), f"{harvest[1]} is not a manifest in the repository"
    for name, service in workers(compose).items():
        assert address in service["entrypoint"] + service.get("command", []), name


def test_each_worker_reserves_its_own_gpu(compose):
    found = workers(compose)
    assert len(found) >= 2
    device_ids = []
    for name, service in found.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        device_ids += device["device_ids"]
        command = service["command"]
        assert command[command.index("--nthreads") + 1] == "1", "one model per GPU process"
    assert len(device_ids) == len(set(device_ids)), "two workers share a GPU"


def test_every_service_shares_the_data_volume(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        data_dir = service["environment"]["FMX_DATA_DIR"]
        mounts = {}  # container path -> volume
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            mounts[target] = source
        assert mounts.get(data_dir) in declared, f"{name}: no shared volume at {data_dir}"
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        assert (DOCKER / service["build"]["context"]).resolve() == REPO


def test_dockerfile_installs_the_project_on_a_cuda_image(dockerfile):
    (base,) = dockerfile["FROM"]
    if base.startswith("${"):  # FROM ${BASE_IMAGE}: the ARG's default
        name = base.strip("${}")
        (base,) = [a.split("=", 1)[1] for a in dockerfile["ARG"] if a.startswith(f"{name}=")]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    copied = " ".join(dockerfile["COPY"])
    for part in ("pyproject.toml", "pipeline", "stages", "manifests"):
        assert part in copied, f"the image does not copy {part}"
    assert any(re.search(r"pip install (-e )?\.(\s|$)", run) for run in dockerfile["RUN"])
    assert json.loads(dockerfile["ENTRYPOINT"][-1]) == ["pipeline"]
    assert "FMX_DATA_DIR=/data" in " ".join(dockerfile["ENV"])


def test_image_runs_as_a_non_root_user_who_owns_the_volume(dockerfile):
    (user,) = dockerfile["USER"]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:")), user
    volumes = dockerfile["VOLUME"]
    assert volumes == ["/data"]
    chown = [run for run in dockerfile["RUN"] if "chown" in run]
    assert any(re.search(rf"chown\s+{user}(:\S+)?\s+/data(\s|$)", run) for run in chown), (
        "/data must belong to the image's user, or a fresh volume is not writable"
    )


def test_run_service_writes_results_to_the_data_volume(compose):
    service = compose["services"]["run"]
    command = service["command"]
    assert command[0] == "run"
    assert (REPO / command[1]).is_file(), f"{command[1]} is not a manifest in the repository"
    results = command[command.index("--results") + 1]
    data_dir = service["environment"]["FMX_DATA_DIR"]
    assert results == data_dir or results.startswith(data_dir.rstrip("/") + "/"), (
        f"results go to {results}, outside the data volume at {data_dir}"
    )
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert mounts.get(data_dir) in set(compose["volumes"])


def test_readme_shows_the_run_command(compose):
    readme = (DOCKER / "README.md").read_text()
    assert "docker compose -f docker/compose.yaml --profile run run --rm run" in readme
    assert "/data/results" in readme
