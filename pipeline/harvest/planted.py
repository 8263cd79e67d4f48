"""Planted-truth activations: a synthetic residual stream built from known sparse features.

``x[t, l] = sum_f a[t, f] D[f, l] + noise`` with ``D [F, L, d]`` the true features. Spanning
features drift across their layers, so a decoder has to track a rotating direction;
co-occurring groups always fire together on distinct layers, so a crosscoder can merge
them into one latent. Documents carry a topic that raises the firing probability of the
features that prefer it (so sequence probes have signal) and a language column.

Everything is deterministic in ``PlantedSpec.seed`` (features) and ``tokenization.seed``
(documents): the truth is regenerated from the manifest at evaluate time rather than
stored, and each block's activations come from a generator seeded by the block index, so
a resumed harvest writes the same bits and memory stays at one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.harvest.windows import TokenWindows
from pipeline.manifests.harvest import HarvestManifest, PlantedSpec, TokenizationSpec

KINDS = ("single", "spanning", "cooccurring")
BOS, EOS = 0, 1  # synthetic special token ids; ordinary ids start at 2


@dataclass(frozen=True)
class PlantedFeatures:
    """The truth: directions, layer spans, kinds and firing structure of every feature."""

    directions: np.ndarray  # [F, L, d] float64, zero outside the span
    start: np.ndarray  # [F] first layer
    span: np.ndarray  # [F] number of layers
    kind: np.ndarray  # [F] index into KINDS
    group: np.ndarray  # [F] co-occurrence group, -1 for independent features
    topic: np.ndarray  # [F] preferred topic

    @property
    def n_features(self) -> int:
        return int(self.start.size)

    def kind_names(self) -> list[str]:
        return [KINDS[k] for k in self.kind]

    def firing_units(self) -> np.ndarray:
        """``[F]``: the unit that decides firing (a group fires as one unit)."""
        units = np.arange(self.n_features)
        grouped = self.group >= 0
        units[grouped] = self.n_features + self.group[grouped]
        _, dense = np.unique(units, return_inverse=True)
        return dense


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def planted_features(spec: PlantedSpec) -> PlantedFeatures:
    """The true features of ``spec`` (a pure function of the spec)."""
    rng = np.random.default_rng([spec.seed, 1])
    n_layers, d = spec.n_layers, spec.d_model
    max_span = spec.max_span or n_layers
    dirs, start, span, kind, group = [], [], [], [], []

    def add(direction: np.ndarray, first: int, length: int, k: int, g: int) -> None:
        dirs.append(direction)
        start.append(first)
        span.append(length)
        kind.append(k)
        group.append(g)

    for _ in range(spec.n_single):
        w = np.zeros((n_layers, d))
        layer = int(rng.integers(n_layers))
        w[layer] = _unit(rng, d)
        add(w, layer, 1, 0, -1)
    drift = np.deg2rad(spec.drift_degrees)
    for _ in range(spec.n_spanning):
        length = int(rng.integers(2, max_span + 1))
        first = int(rng.integers(0, n_layers - length + 1))
        u = _unit(rng, d)
        v = rng.standard_normal(d)
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        profile = rng.uniform(0.5, 1.5, length)
        w = np.zeros((n_layers, d))
        for j in range(length):
            angle = drift * j / (length - 1)
            w[first + j] = profile[j] * (np.cos(angle) * u + np.sin(angle) * v)
        add(w, first, length, 1, -1)
    for g in range(spec.n_groups):
        for layer in sorted(rng.choice(n_layers, spec.group_size, replace=False).tolist()):
            w = np.zeros((n_layers, d))
            w[layer] = _unit(rng, d)
            add(w, layer, 1, 2, g)
    n = len(dirs)
    return PlantedFeatures(
        directions=np.stack(dirs),
        start=np.asarray(start, dtype=np.int64),
        span=np.asarray(span, dtype=np.int64),
        kind=np.asarray(kind, dtype=np.int64),
        group=np.asarray(group, dtype=np.int64),
        topic=rng.integers(spec.n_topics, size=n),
    )


def planted_windows(spec: PlantedSpec, tokenization: TokenizationSpec) -> TokenWindows:
    """Token and document tables shaped like a text harvest (see ``pipeline/harvest/windows.py``).

    Documents of geometric length are packed back to back, an EOS after each, into
    windows that start with BOS when ``prepend_bos``; token ids are drawn from a
    topic-specific vocabulary.
    """
    rng = np.random.default_rng([tokenization.seed, 2])
    n, ctx = tokenization.num_tokens, tokenization.context_length
    ids = np.empty(n, dtype=np.int32)
    doc_of = np.full(n, -1, dtype=np.int32)
    special = np.zeros(n, dtype=bool)
    topics, languages, splits = [], [], []
    row, doc = 0, 0
    while row < n:
        length = int(rng.geometric(1.0 / spec.doc_tokens))
        topic = int(rng.integers(spec.n_topics))
        topics.append(topic)
        languages.append(spec.languages[int(rng.integers(len(spec.languages)))])
        splits.append("test" if rng.random() < tokenization.test_fraction else "train")
        for is_eos in [False] * length + [True]:
            if row >= n:
                break
            if tokenization.prepend_bos and row % ctx == 0:
                ids[row], special[row] = BOS, True
                row += 1
                if row >= n:
                    break
            if is_eos:
                ids[row], special[row] = EOS, True
            else:
                ids[row] = 2 + topic * spec.vocab_size + int(rng.integers(spec.vocab_size))
                doc_of[row] = doc
            row += 1
        doc += 1
    texts = np.where(
        special, np.where(ids == BOS, "<bos>", "<eos>"), np.char.add("w", ids.astype(str))
    )
    tokens = pa.table(
        {
            "token_id": ids,
            "doc_id": doc_of,
            "position": np.tile(np.arange(ctx, dtype=np.int32), n // ctx),
            "token_text": pa.array(texts.tolist(), pa.string()),
            "is_special": special,
        }
    )
    documents = pa.table(
        {
            "doc_id": np.arange(doc, dtype=np.int32),
            "title": [f"planted document {i}" for i in range(doc)],
            "language": languages,
            "topic": [f"topic{t}" for t in topics],
            "split": splits,
        }
    )
    return TokenWindows(ids.reshape(-1, ctx), tokens, documents)


def hook_layers(manifest: HarvestManifest) -> list[int]:
    """The planted layers the manifest stores, in order."""
    n_layers = manifest.model.planted_spec.n_layers
    layers = list(range(n_layers)) if manifest.hooks.layers == "all" else manifest.hooks.layers
    if max(layers) >= n_layers:
        raise ValueError(f"hooks.layers: layer {max(layers)} exceeds model.planted.n_layers")
    return list(layers)


def hook_names(manifest: HarvestManifest) -> list[str]:
    return [f"blocks.{layer}.hook_{manifest.hooks.point}" for layer in hook_layers(manifest)]


class PlantedGenerator:
    """Activations of any block of rows, the same bits whatever order blocks are made in."""

    def __init__(self, manifest: HarvestManifest, windows: TokenWindows) -> None:
        self.spec = manifest.model.planted_spec
        self.features = planted_features(self.spec)
        self.layers = hook_layers(manifest)
        self.flat = torch.from_numpy(
            self.features.directions[:, self.layers].reshape(self.features.n_features, -1)
        ).float()
        topics = np.asarray(
            [int(t.removeprefix("topic")) for t in windows.documents["topic"].to_pylist()]
        )
        doc_of = windows.tokens["doc_id"].to_numpy()
        self.row_topic = np.where(doc_of >= 0, topics[np.maximum(doc_of, 0)], -1)
        self.special = windows.tokens["is_special"].to_numpy(zero_copy_only=False)
        self.units = self.features.firing_units()
        n_units = int(self.units.max()) + 1
        unit_topic = np.zeros(n_units, dtype=np.int64)
        unit_topic[self.units] = self.features.topic  # a group takes its last member's topic
        p = self.spec.fire_probability
        boost = np.where(
            unit_topic[None, :] == np.arange(self.spec.n_topics)[:, None], self.spec.topic_boost, 1
        )
        self.unit_probability = np.clip(p * boost, 0, 1)  # [topics, units]

    def codes(self, start: int, stop: int, block: int) -> np.ndarray:
        """True feature activations ``[rows, F]`` (zero on special rows)."""
        rng = np.random.default_rng([self.spec.seed, 3, block])
        topic = self.row_topic[start:stop]
        prob = self.unit_probability[np.maximum(topic, 0)]
        fires = (rng.random(prob.shape) < prob) & (topic >= 0)[:, None]
        size = rng.exponential(self.spec.magnitude_mean, prob.shape)
        unit_codes = np.where(fires, size, 0.0)
        return unit_codes[:, self.units]

    def block(self, start: int, stop: int, block: int) -> torch.Tensor:
        """Activations ``[rows, n_hooks, d]`` float32 for rows ``start:stop``."""
        codes = torch.from_numpy(self.codes(start, stop, block)).float()
        x = codes @ self.flat
        rng = np.random.default_rng([self.spec.seed, 4, block])
        if self.spec.noise_std > 0:
            x += torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) * float(
                self.spec.noise_std
            )
        return x.view(stop - start, len(self.layers), self.spec.d_model)


def write_planted_blocks(manifest: HarvestManifest, windows: TokenWindows, writer) -> float:
    """Generate and write every missing block through the ordinary ``StoreWriter``; tok/s."""
    import time

    from pipeline.store.format import TORCH_STORAGE

    generator = PlantedGenerator(manifest, windows)
    dtype = TORCH_STORAGE[manifest.storage.dtype]
    started, total = time.perf_counter(), 0
    for block in writer.missing_blocks():
        start, stop = writer.block_rows(block)
        stored = generator.block(start, stop, block).to(dtype)
        writer.write_block(block, stored, torch.from_numpy(~generator.special[start:stop]))
        total += stop - start
    elapsed = time.perf_counter() - started
    return total / elapsed if elapsed > 0 else float("nan")
