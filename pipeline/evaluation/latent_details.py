"""Sampled latents in detail: marked contexts, per-layer profiles, logit effects, ratings.

The main pass keeps each latent's top rows; the windows around them need the latent's
activation on neighbouring tokens too, so a second, short pass decodes only the chunks
that hold those windows (one chunk at a time) and encodes the needed rows for every
variant. Ratings come from an LLM judge (``openai``, ``transformers``) or the offline
``purity`` proxy: purity of a latent's top contexts by topic, language or gazetteer class
against base rates, where document-level labels count each document once (top tokens
cluster in one document, which would make any latent look pure by topic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline.evaluation.concepts import TokenConcepts, row_classes, sequence_labels, token_classes
from pipeline.evaluation.judge import (
    ChatBackend,
    JudgeError,
    OpenAIJudge,
    TransformersJudge,
    judge_latents,
    purity_scores,
)
from pipeline.evaluation.run_metrics import VariantResult
from pipeline.evaluation.top_contexts import TokenView, format_context, window_rows
from pipeline.harvest.token_text import REPLACEMENT
from pipeline.store.reader import ActivationStore

BEFORE, AFTER = 12, 4
PURE = 0.5  # purity at or above this counts as a coherent latent (the judge's rating >= 4)


@dataclass
class Context:
    rows: np.ndarray
    texts: list[str]
    acts: np.ndarray  # the latent's activation on each row of the window
    top_row: int
    top_value: float
    band: str = "top activations"  # which activation band the context was drawn from
    doc_label: str = ""  # the document's title, to show contexts come from distinct ones

    def marked(self) -> str:
        return format_context(self.texts, (self.acts > 0) | (self.rows == self.top_row))


@dataclass
class LatentDetail:
    variant: str
    latent: int
    frequency: float
    fc: float
    d_eff: float
    decoder_norms: np.ndarray  # [L] raw units
    contributions: np.ndarray  # [L] mean share of positive encoder contribution, top contexts
    histogram: np.ndarray  # [bins] counts over HIST_EDGES
    chosen_by: str = "random sample"  # why this latent has a page (see ``latent_choice``)
    contexts: list[Context] = field(default_factory=list)
    purity: float = float("nan")
    purity_class: str = ""
    rating: int | None = None
    explanation: str = ""
    logit_layer: str = ""
    logits_top: list[tuple[str, float]] = field(default_factory=list)
    logits_bottom: list[tuple[str, float]] = field(default_factory=list)


def row_labelings(
    tokens: pa.Table, documents: pa.Table, concepts: TokenConcepts
) -> dict[str, np.ndarray]:
    """Per token row, its topic, language and gazetteer class ('' when none)."""
    out = {}
    for task in ("topic", "language"):
        ids, labels = sequence_labels(documents, task)
        out[task] = row_classes(tokens, ids, labels)
    out["gazetteer"] = token_classes(concepts, tokens.num_rows)
    return out


def _one_per_document(top_rows: np.ndarray, doc_of_row: np.ndarray) -> np.ndarray:
    out = np.full_like(top_rows, -1)
    for i, rows in enumerate(top_rows):
        rows = rows[rows >= 0]
        _, first = np.unique(doc_of_row[rows], return_index=True)
        kept = rows[np.sort(first)]
        out[i, : kept.size] = kept
    return out


def purity(
    top_rows: np.ndarray,
    labelings: dict[str, np.ndarray],
    eval_rows: np.ndarray,
    doc_of_row: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the best purity over labelings and its ``labeling:class``."""
    evaluated = np.zeros(doc_of_row.size, dtype=bool)
    evaluated[eval_rows] = True
    per_doc = _one_per_document(top_rows, doc_of_row)
    scores, classes = [], []
    for name, row_class in labelings.items():
        rows = top_rows if name == "gazetteer" else per_doc
        eligible = evaluated & (row_class != "") if name != "gazetteer" else evaluated
        result = purity_scores(rows, row_class, eligible)
        scores.append(np.where(np.isnan(result.score), -np.inf, result.score))
        classes.append(np.asarray([f"{name}:{c}" for c in result.best_class], dtype=object))
    stacked = np.stack(scores)
    best = stacked.argmax(0)
    score = stacked[best, np.arange(best.size)]
    label = np.stack(classes)[best, np.arange(best.size)]
    return np.where(np.isfinite(score), score, np.nan), label


N_TOP_CONTEXTS = 6  # top-activation contexts per latent (one per document)
PER_BAND = 3  # contexts per lower activation band
BANDS = (  # (label, low, high): quantiles of the latent's non-zero held-out activations
    ("upper activations (75th-95th percentile of its non-zero activations)", 0.75, 0.95),
    ("middle activations (40th-60th percentile)", 0.40, 0.60),
    ("low activations (5th-25th percentile)", 0.05, 0.25),
)
SCAN_TOKENS = 65536  # held-out tokens scanned for the activation bands


@torch.no_grad()
def _scan_active(store, union, results, sampled, eval_rows, device) -> dict[str, list]:
    """Per variant and chosen latent, ``(rows, activations)`` where it fires, over the first
    ``SCAN_TOKENS`` held-out tokens (a bounded pass: only the chosen latents are kept)."""
    rows = np.sort(np.asarray(eval_rows, dtype=np.int64))[:SCAN_TOKENS]
    found = {r.variant.name: [[] for _ in sampled[r.variant.name]] for r in results}
    chunk_of = rows // store.chunk_tokens
    for chunk in np.unique(chunk_of).tolist():
        here = rows[chunk_of == chunk]
        start, stop = store.chunk_rows(chunk)
        raw = store.read(start, stop, union)[torch.from_numpy(here - start)].to(device)
        for res in results:
            name = res.variant.name
            latents = torch.from_numpy(sampled[name]).long()
            f = res.variant.coder.encode(res.variant.normalise(raw))[:, latents].cpu().numpy()
            for j in range(len(latents)):
                hit = np.flatnonzero(f[:, j] > 0)
                found[name][j].append((here[hit], f[hit, j]))
    return {
        name: [
            (np.concatenate([r for r, _ in parts]), np.concatenate([a for _, a in parts]))
            if parts
            else (np.zeros(0, np.int64), np.zeros(0))
            for parts in per_latent
        ]
        for name, per_latent in found.items()
    }


def pick_rows(
    top_rows: np.ndarray,
    top_values: np.ndarray,
    active: tuple[np.ndarray, np.ndarray],
    doc_of_row: np.ndarray,
    rng: np.random.Generator,
) -> list[tuple[int, float, str]]:
    """``(row, activation, band)`` per context: the top rows, then a few rows from each
    activation band, never two from the same document."""
    used: set[int] = set()
    out: list[tuple[int, float, str]] = []
    for row, value in zip(top_rows.tolist(), top_values.tolist(), strict=True):
        if row < 0 or len(out) >= N_TOP_CONTEXTS or int(doc_of_row[row]) in used:
            continue
        used.add(int(doc_of_row[row]))
        out.append((row, float(value), "top activations"))
    rows, acts = active
    if acts.size:
        for label, lo, hi in BANDS:
            low, high = np.quantile(acts, [lo, hi])
            band = rng.permutation(np.flatnonzero((acts >= low) & (acts <= high)))
            taken = 0
            for i in band.tolist():
                doc = int(doc_of_row[rows[i]])
                if taken >= PER_BAND:
                    break
                if doc in used:
                    continue
                used.add(doc)
                out.append((int(rows[i]), float(acts[i]), label))
                taken += 1
    return out


@torch.no_grad()
def sampled_details(
    store: ActivationStore,
    view: TokenView,
    union: list[int],
    results: list[VariantResult],
    chosen: dict[str, dict[int, str]],
    device: torch.device,
    eval_rows: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, list[LatentDetail]]:
    """Contexts (top and lower activation bands, one per document) and per-layer profiles
    of the chosen latents of each variant; ``chosen`` maps latent -> why it was chosen."""
    sampled = {name: np.asarray(list(latents), dtype=np.int64) for name, latents in chosen.items()}
    none = (np.zeros(0, np.int64), np.zeros(0))
    active = (
        _scan_active(store, union, results, sampled, eval_rows, device)
        if eval_rows is not None and len(eval_rows)
        else {name: [none] * len(latents) for name, latents in sampled.items()}
    )
    rng = np.random.default_rng(seed)
    picks: dict[str, list[list[tuple[int, float, str]]]] = {}
    windows: dict[str, list[list[np.ndarray]]] = {}
    needed_parts = []
    for res in results:
        name = res.variant.name
        picks[name] = [
            pick_rows(res.top_rows[i], res.top_values[i], active[name][j], view.doc_id, rng)
            for j, i in enumerate(sampled[name].tolist())
        ]
        windows[name] = [
            [window_rows(view, row, BEFORE, AFTER) for row, _, _ in latent_picks]
            for latent_picks in picks[name]
        ]
        needed_parts += [w for ws in windows[name] for w in ws]
    needed = np.unique(np.concatenate(needed_parts)) if needed_parts else np.zeros(0, np.int64)
    acts = {r.variant.name: np.zeros((needed.size, len(sampled[r.variant.name]))) for r in results}
    contrib = {r.variant.name: _ContributionSums(r, sampled[r.variant.name]) for r in results}
    chunk_of = needed // store.chunk_tokens
    for chunk in np.unique(chunk_of).tolist():
        where = np.flatnonzero(chunk_of == chunk)
        start, stop = store.chunk_rows(chunk)
        raw = store.read(start, stop, union)[torch.from_numpy(needed[where] - start)].to(device)
        for res in results:
            x = res.variant.normalise(raw)
            latents = torch.from_numpy(sampled[res.variant.name]).long()
            acts[res.variant.name][where] = res.variant.coder.encode(x)[:, latents].cpu().numpy()
            contrib[res.variant.name].update(needed[where], x)
    return {
        res.variant.name: _details(
            res, sampled, chosen, picks, windows, needed, acts, contrib, view
        )
        for res in results
    }


class _ContributionSums:
    """Mean positive-contribution share per layer over each sampled latent's top rows."""

    def __init__(self, res: VariantResult, latents: np.ndarray) -> None:
        self.res, self.latents = res, latents
        self.sums = np.zeros((len(latents), res.variant.coder.n_layers))
        self.counts = np.zeros(len(latents))
        self.mu = res.variant.mu()

    def update(self, rows: np.ndarray, x: torch.Tensor) -> None:
        top = self.res.top_rows[self.latents]  # [k, n_top]
        owner = np.isin(rows, top)
        if not owner.any():
            return
        idx = np.flatnonzero(owner)
        xc = x[torch.from_numpy(idx)] - self.mu.to(x.device)
        c = self.res.variant.coder.layer_contributions(xc, torch.from_numpy(self.latents).long())
        pos = c.clamp_min(0).cpu().double().numpy()  # [r, L, k]
        share = pos / np.maximum(pos.sum(1, keepdims=True), 1e-30)
        for j in range(len(self.latents)):
            mine = np.isin(rows[idx], top[j])
            self.sums[j] += share[mine, :, j].sum(0)
            self.counts[j] += mine.sum()

    def mean(self, j: int) -> np.ndarray:
        return self.sums[j] / max(self.counts[j], 1)


def _details(
    res, sampled, chosen, picks, windows, needed, acts, contrib, view
) -> list[LatentDetail]:
    name, latents = res.variant.name, sampled[res.variant.name]
    coder, scale = res.variant.coder, res.variant.scale
    norms = (coder.decoder_norms().detach().cpu().double() / scale.cpu().double()[None]).numpy()
    out = []
    for j, latent in enumerate(latents.tolist()):
        contexts = []
        for rows, (row, value, band) in zip(windows[name][j], picks[name][j], strict=True):
            pos = np.searchsorted(needed, rows)
            contexts.append(
                Context(
                    rows,
                    view.texts(rows),
                    acts[name][pos, j],
                    int(row),
                    value,
                    band=band,
                    doc_label=f"document {int(view.doc_id[row])}",
                )
            )
        out.append(
            LatentDetail(
                variant=name,
                latent=latent,
                frequency=float(res.sparsity.frequency[latent]),
                fc=float(res.coherence.fc[latent]),
                d_eff=float(res.d_eff[latent]),
                decoder_norms=norms[latent],
                contributions=contrib[name].mean(j),
                histogram=res.histogram[latent],
                chosen_by=chosen[name][latent],
                contexts=contexts,
            )
        )
    return out


def judge_backend(kind: str) -> ChatBackend | None:
    """None for the offline purity proxy."""
    if kind == "purity":
        return None
    if kind == "openai":
        return OpenAIJudge.from_env()
    if kind == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.harvest.models import _local_dir
        from pipeline.manifests.harvest import ModelSpec

        local = _local_dir(ModelSpec(source="packaged", name="smollm2-135m"))
        tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
        return TransformersJudge(model, tokenizer)
    raise ValueError(f"--judge must be purity, openai or transformers, not {kind!r}")


def rate(
    details: list[LatentDetail],
    backend: ChatBackend | None,
    n_contexts: int,
    fallback: bool = False,
) -> str | None:
    """Fill ``rating``/``explanation`` from the judge (purity needs no call). A failing
    judge raises ``JudgeError``; with ``fallback`` the purity proxy rates instead and the
    reason is returned (None when the judge itself rated)."""
    if backend is None:
        for d in details:
            d.explanation = f"purity {d.purity:.2f} ({d.purity_class})"
        return None
    contexts = {d.latent: [c.marked() for c in d.contexts[:n_contexts]] for d in details}
    try:
        report = judge_latents(backend, contexts)
    except JudgeError as err:
        if not fallback:
            raise
        rate(details, None, n_contexts)
        return str(err)
    for d in details:
        verdict = report.verdicts[d.latent]
        d.rating = verdict.rating
        d.explanation = verdict.explanation or (verdict.error or "")
    return None


def logit_effects(
    details: list[LatentDetail], res: VariantResult, unembed, hook_names: list[str], n: int = 8
) -> None:
    """Top/bottom tokens of the decoder direction through the unembedding (logit lens).

    ``unembed`` is ``(W_U [d, vocab], final-norm gain [d] or None, tokenizer)``; the
    direction is the latent's raw-unit decoder row at its own layer (per-layer SAEs) or
    at the last layer it writes (cross-layer coders)."""
    w_u, gain, tokenizer = unembed
    coder, scale = res.variant.coder, res.variant.scale.cpu()
    own = coder.latent_layer()
    for d in details:
        layer = int(own[d.latent]) if own is not None else coder.n_layers - 1
        idx = torch.tensor([d.latent])
        direction = coder.decoder_view().expand_latents(idx)[0, layer].detach().cpu()
        direction = direction / scale[layer]
        if gain is not None:
            direction = direction * gain
        logits = direction.float() @ w_u.float()
        top, bottom = logits.topk(n), (-logits).topk(n)
        d.logit_layer = hook_names[layer]
        d.logits_top = [(token_label(tokenizer, i), float(v)) for v, i in zip(*top, strict=True)]
        d.logits_bottom = [
            (token_label(tokenizer, i), -float(v)) for v, i in zip(*bottom, strict=True)
        ]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte: printable Latin-1
    bytes stand for themselves, the others map to code points from 256 up, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def token_label(tokenizer, token_id) -> str:
    """A vocabulary entry as text; a byte-level piece of a character (which decodes to
    U+FFFD alone) shows as its bytes, e.g. ``<bytes c3>``."""
    text = tokenizer.decode([int(token_id)])
    if REPLACEMENT not in text:
        return text
    to_byte = _byte_level_alphabet()
    raw = tokenizer.convert_ids_to_tokens(int(token_id))
    if not all(char in to_byte for char in raw):
        return raw
    return f"<bytes {bytes(to_byte[c] for c in raw).hex(' ')}>"


def unembedding(model):
    """``(W_U [d, vocab], final-norm gain or None, tokenizer)`` of a loaded model."""
    hf = model.bridge.original_model
    norm = getattr(getattr(hf, "model", None), "norm", None)
    gain = getattr(norm, "weight", None)
    w_u = hf.get_output_embeddings().weight.detach().cpu().T
    return w_u, None if gain is None else gain.detach().cpu().float(), model.tokenizer
