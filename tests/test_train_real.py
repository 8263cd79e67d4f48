"""Every coder learns on real SmolLM2 activations of real Wikipedia text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.training.manifest import CoderManifest
from stages import train
from tests.helpers import harvest_real_small

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_store_path(tmp_path_factory) -> Path:
    return harvest_real_small(tmp_path_factory.mktemp("real-cache"))


CODERS = {
    "per_layer_sae": {
        "kind": "per_layer_sae",
        "latents_per_layer": 64,
        "activation": "topk",
        "k": 4,
    },
    "crosscoder": {"kind": "crosscoder", "n_latents": 256, "activation": "topk", "k": 16},
    "crosscoder_relu": {
        "kind": "crosscoder",
        "n_latents": 256,
        "activation": "relu",
        "l1_coefficient": 0.02,
    },
    "fmxcoder": {
        "kind": "fmxcoder",
        "n_latents": 256,
        "activation": "batchtopk",
        "k": 16,
        "encoder_factorization": "shared_basis",
        "decoder_factorization": "per_latent",
        "rank": 2,
        "masking_probability": 0.25,
        "collapse_coefficient": 0.1,
    },
    "fmxcoder_jumprelu": {
        "kind": "fmxcoder",
        "n_latents": 256,
        "activation": "jumprelu",
        "l0_coefficient": 0.01,
        "encoder_factorization": "shared_basis",
        "decoder_factorization": "shared_basis",
        "rank": 2,
    },
}


def test_each_coder_loss_falls_on_real_activations(real_store_path: Path, tmp_path):
    manifests = [
        CoderManifest.model_validate(
            {
                "name": name,
                "cache": {"key": real_store_path.name, "root": str(real_store_path.parent)},
                "coder": coder,
                "training": {"tokens": 40 * 256, "batch_size": 256, "lr": 1e-3, "log_every": 5},
                "run": {"runs_root": str(tmp_path), "progress": False},
            }
        )
        for name, coder in CODERS.items()
    ]
    results = train.run([(m, tmp_path) for m in manifests])
    assert len({r.run_dir for r in results}) == len(CODERS)
    falls = {}
    for result in results:
        log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
        first, last = log[0], log[-1]
        assert last["step"] == 40
        falls[result.name] = (first["fvu"], last["fvu"], first["loss"], last["loss"])
        assert (result.run_dir / "final" / "coder.safetensors").is_file()
    for name, (fvu_first, fvu_last, loss_first, loss_last) in falls.items():
        assert loss_last < 0.95 * loss_first, (name, loss_first, loss_last)
        assert fvu_last < 0.95 * fvu_first, (name, fvu_first, fvu_last)
