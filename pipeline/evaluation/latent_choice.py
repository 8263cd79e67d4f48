"""Which latents get a report page, and why.

Three groups per variant, each labelled on its page: a uniform random sample of alive
latents (the unbiased sample behind the "coherent" column, drawn first so a latent that is
also a top pick keeps counting towards it), the latents with the highest coherence score
(purity of their top contexts), and the latents the 1-sparse probes pick for each concept
(largest gap between the concept's mean code and the rest, the probe's own selection rule).
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.judge import sample_alive
from pipeline.evaluation.probe_suite import ProbeTasks
from pipeline.evaluation.probing import rank_features
from pipeline.evaluation.run_metrics import VariantResult

RANDOM = "random sample of alive latents"
COHERENT = "top by coherence (purity of top contexts)"
PROBE = "top by probe weight"
ORDER = (COHERENT, PROBE, RANDOM)  # how the groups are listed


def top_coherent(alive: np.ndarray, score: np.ndarray, n: int) -> list[int]:
    """The ``n`` alive latents with the highest finite coherence score, best first."""
    ok = np.flatnonzero(alive & np.isfinite(score))
    return ok[np.argsort(-score[ok], kind="stable")][:n].tolist()


def probe_picks(res: VariantResult, tasks: ProbeTasks, n: int) -> dict[int, str]:
    """Latent -> the concept whose 1-sparse probe picks it (training side), up to ``n``."""
    picks: dict[int, str] = {}
    sides = (
        ("token", tasks.token, res.token_features, res.token_index),
        ("sequence", tasks.sequence, res.doc_features, tasks.doc_ids),
    )
    for task, splits, X, index in sides:
        if X is None or X.shape[1] == 0:
            continue
        for concept, split in sorted(splits.items()):
            if len(picks) >= n:
                return picks
            if not split.usable():
                continue
            at = np.searchsorted(index, split.train)
            best = int(rank_features(X[at], split.y_train)[0])
            picks.setdefault(best, f"{task}: {concept}")
    return picks


def choose_latents(
    res: VariantResult,
    coherence: np.ndarray,
    tasks: ProbeTasks | None,
    n_random: int,
    n_top: int,
    seed: int = 0,
) -> dict[int, str]:
    """Latent -> why it was chosen, grouped in ``ORDER``; no latent appears twice."""
    alive = res.sparsity.alive
    chosen = {int(i): RANDOM for i in sample_alive(alive, n_random, seed)}
    groups: dict[str, list[int]] = {COHERENT: [], PROBE: [], RANDOM: list(chosen)}
    for latent in top_coherent(alive, coherence, n_top + len(chosen)):
        if latent not in chosen and len(groups[COHERENT]) < n_top:
            chosen[latent] = COHERENT
            groups[COHERENT].append(latent)
    if tasks is not None:
        for latent, concept in probe_picks(res, tasks, n_top + len(chosen)).items():
            if latent not in chosen and len(groups[PROBE]) < n_top:
                chosen[latent] = f"{PROBE} ({concept})"
                groups[PROBE].append(latent)
    return {latent: chosen[latent] for label in ORDER for latent in groups[label]}
