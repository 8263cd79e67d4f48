# Using a harvested store and a trained run from Python, after `make smoke` (tests/test_api.py
# and tests/test_readme_examples.py run this file).
import torch
from torch.utils.data import DataLoader

from pipeline import load_coder, load_results, open_store

STORE = "2aedd5f3"  # a cache key (or unique prefix) from `pipeline ls`, or a store directory
RUN = "fmxcoder"  # a run name or hash prefix from `pipeline runs`, or a run directory

store = open_store(STORE)
print(store, store.hook_names)
tokens = store.tokens()  # pyarrow.Table: one row per stored token
print(tokens.column_names)

# Shuffled, normalised training batches [batch, n_layers, d_model] for a plain DataLoader.
loader = DataLoader(store.dataset(batch_size=256, split="train"), batch_size=None)
batch = next(iter(loader))
print(batch.shape)

# A trained coder on RAW activations: the normalisation is applied inside.
coder = load_coder(RUN)
raw = store.read(0, 256, hooks=coder.hook_names)  # raw activations of the coder's layers
codes = coder.encode(raw)  # [256, n_latents]
recon = coder.decode(codes)  # [256, n_layers, d_model], raw units
fvu = (recon - raw).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum()
print(f"{coder.name}: L0 {(codes > 0).sum(-1).float().mean():.1f}, FVU {fvu:.3f}")
assert recon.shape == raw.shape and torch.isfinite(recon).all()

# Evaluation results (after `pipeline evaluate`), as pyarrow tables or pandas DataFrames.
try:
    tables = load_results(RUN)  # {"summary": ..., "per_layer": ..., "latents": ...}
    print(tables["summary"].to_pylist())
except FileNotFoundError as err:  # not evaluated yet
    print(err)
