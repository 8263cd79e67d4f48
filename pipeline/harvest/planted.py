"""Planted-truth activations: a synthetic residual stream built from known sparse features.

``x[t, l] = sum_f a[t, f] D[f, l] + noise`` with ``D [F, L, d]`` the true features. Spanning
features drift across their layers in one of four families (``DRIFTS``): a rotation inside
one plane (rank 2, the shape of a per_latent rank-2 decoder), a random walk, independent
perturbations of one direction, or a single turn; so no one reading is favoured by
construction (the default, a random walk, is set from real crosscoders' trajectories);
co-occurring groups always fire together on distinct layers, so a crosscoder can merge
them into one latent. Documents carry a topic that raises the firing probability of the
features that prefer it (so sequence probes have signal) and a language column. Firing
rates follow a Zipf law and magnitudes are log-normal, as real latents' are heavy-tailed.

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


def _orthonormal_to(u: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` orthonormal unit vectors ``[n, d]``, each orthogonal to unit ``u``."""
    g = rng.standard_normal((u.size, n))
    g -= np.outer(u, u @ g)
    q, _ = np.linalg.qr(g)
    return q.T


def _planar(u, v, length, drift, cosine, rng) -> np.ndarray:
    """Rotates from u towards v by ``drift`` radians over the run: rank 2 by construction."""
    angles = drift * np.arange(length) / (length - 1)
    return np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v


def _random_walk(u, v, length, drift, cosine, rng) -> np.ndarray:
    """Each layer the previous plus a fresh orthogonal step: adjacent cosine ``cosine``,
    layers j apart at about ``cosine ** j`` (the steps are nearly orthogonal when d >> L)."""
    steps = rng.standard_normal((length - 1, u.size))
    path = [u]
    for step in steps:
        step -= (step @ path[-1]) * path[-1]
        step /= np.linalg.norm(step)
        path.append(cosine * path[-1] + np.sqrt(1 - cosine**2) * step)
    return np.stack(path)


def _independent(u, v, length, drift, cosine, rng) -> np.ndarray:
    """Each layer the base u plus its own orthogonal perturbation: every pair of layers at
    cosine ``cosine`` exactly (orthonormal perturbations), nothing moves in order."""
    return np.sqrt(cosine) * u + np.sqrt(1 - cosine) * _orthonormal_to(u, length, rng)


def _reshape(u, v, length, drift, cosine, rng) -> np.ndarray:
    """u up to a random layer inside the run, then a direction at ``drift`` from u: rank 2,
    adjacent cosine 1 except across the one turn."""
    turn = int(rng.integers(1, length))
    after = np.cos(drift) * u + np.sin(drift) * v
    return np.stack([u] * turn + [after] * (length - turn))


DRIFTS = {
    "planar": _planar,
    "random_walk": _random_walk,
    "independent": _independent,
    "reshape": _reshape,
}


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
    for i in range(spec.n_spanning):
        length = int(rng.integers(2, max_span + 1))
        first = int(rng.integers(0, n_layers - length + 1))
        u = _unit(rng, d)
        v = rng.standard_normal(d)
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        profile = rng.uniform(0.5, 1.5, length)
        # the family's own draws come from a stream of their own, so every family plants
        # the same spans, first directions, profiles and topics: only the drift differs
        own = np.random.default_rng([spec.seed, 5, i])
        path = DRIFTS[spec.drift](u, v, length, drift, spec.adjacent_cosine, own)
        w = np.zeros((n_layers, d))
        w[first : first + length] = profile[:, None] * path
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
        p = self.spec.fire_probability * zipf_weights(n_units, self.spec)
        boost = np.where(
            unit_topic[None, :] == np.arange(self.spec.n_topics)[:, None], self.spec.topic_boost, 1
        )
        self.unit_probability = np.clip(p[None, :] * boost, 0, 1)  # [topics, units]

    def codes(self, start: int, stop: int, block: int) -> np.ndarray:
        """True feature activations ``[rows, F]`` (zero on special rows)."""
        rng = np.random.default_rng([self.spec.seed, 3, block])
        topic = self.row_topic[start:stop]
        prob = self.unit_probability[np.maximum(topic, 0)]
        fires = (rng.random(prob.shape) < prob) & (topic >= 0)[:, None]
        size = magnitudes(rng, prob.shape, self.spec)
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


def zipf_weights(n_units: int, spec: PlantedSpec) -> np.ndarray:
    """``[n_units]`` firing-rate multipliers averaging 1: ``rank ** -zipf_exponent`` over a
    random ranking, so a few units fire often and most rarely, as real latents do."""
    rank = np.random.default_rng([spec.seed, 6]).permutation(n_units) + 1.0
    weights = rank ** -float(spec.zipf_exponent)
    return weights / weights.mean()


def magnitudes(rng: np.random.Generator, shape: tuple, spec: PlantedSpec) -> np.ndarray:
    """Firing magnitudes with mean ``magnitude_mean``: log-normal (heavy right tail) with
    ``magnitude_sigma``, or exponential when it is 0."""
    if spec.magnitude_sigma == 0:
        return rng.exponential(spec.magnitude_mean, shape)
    sigma = float(spec.magnitude_sigma)
    return spec.magnitude_mean * np.exp(sigma * rng.standard_normal(shape) - sigma**2 / 2)


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
