"""The real packaged SmolLM2-135M over real Wikipedia text: stored equals a direct forward.

Marked ``slow`` (it loads a 135M model), but CI runs it.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.harvest.models import load_model
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.reader import ActivationStore
from stages import harvest

pytestmark = pytest.mark.slow

LAYERS = [0, 7, 15, 29]
CONTEXT = 128
REAL = {
    "model": {"source": "packaged", "name": "smollm2-135m"},
    "text": {"source": "wiki_summaries", "languages": ["en", "fr"]},
    "tokenization": {"context_length": CONTEXT, "num_tokens": 1024, "seed": 3},
    "hooks": {"layers": LAYERS},
    # two blocks of two forward batches each: the reference runs all 8 windows at once
    "storage": {"chunk_tokens": 512},
    "run": {"batch_size": 2, "device": "cpu", "progress": False},
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    manifest = HarvestManifest.model_validate(REAL)
    result = harvest.run(manifest, tmp_path_factory.mktemp("real-cache"))
    store = ActivationStore(result.path, verify=True)
    model = load_model(manifest.model, "cpu")
    token_ids = store.tokens(["token_id"])["token_id"].to_numpy().reshape(-1, CONTEXT)
    with torch.inference_mode():  # full forward: every block and the unembedding
        _, cache = model.bridge.run_with_cache(
            torch.tensor(token_ids, dtype=torch.long), names_filter=store.hook_names
        )
    reference = torch.stack([cache[name].flatten(0, 1).float() for name in store.hook_names], 1)
    return store, model, reference


def test_store_layout(real):
    store, model, _ = real
    assert (model.n_layers, model.d_model) == (30, 576)
    assert store.hook_names == [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]
    assert (store.n_tokens, store.d_model, store.n_chunks) == (1024, 576, 2)
    documents = store.documents().to_pydict()
    assert set(documents["language"]) <= {"en", "fr"}
    tokens = store.tokens()
    assert (tokens["position"].to_numpy() == 0).sum() == 1024 // CONTEXT
    bos = model.tokenizer.bos_token_id
    assert (tokens["token_id"].to_numpy()[::CONTEXT] == bos).all()


def test_stored_equals_a_direct_transformer_lens_forward(real):
    store, _, reference = real
    stored = store.read(0, store.n_tokens)
    expected = reference.to(torch.bfloat16).float()
    differs = stored != expected
    # the harvest runs 2 windows per forward, the reference 8: matmul blocking can move a
    # value across a bf16 rounding boundary, never by more than one bf16 ulp
    assert differs.float().mean() < 1e-3, f"{int(differs.sum())} of {differs.numel()} differ"
    ulp = expected.abs() * 2.0**-7
    assert ((stored - expected).abs() <= ulp).all()
    assert reference.abs().max() > 1.0, "real activations, not a random init"


def test_statistics_match_a_direct_computation(real):
    store, _, reference = real
    keep = torch.from_numpy(~store.tokens(["is_special"])["is_special"].to_numpy())
    norms = reference[keep].double().norm(dim=-1)
    stats = store.stats
    assert store.record["statistics_tokens"] == int(keep.sum())
    # stats are over the stored bf16 values; bf16 rounding moves a mean norm by ~1e-5
    torch.testing.assert_close(stats["mean_norm"], norms.mean(0).float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        stats["rms_norm"], norms.square().mean(0).sqrt().float(), rtol=1e-4, atol=0
    )
    mean = reference[keep].double().mean(0).float()
    scale = stats["mean_norm"][:, None]  # elementwise error relative to the layer's scale
    assert ((stats["mean"] - mean).abs() <= 1e-4 * scale).all()
