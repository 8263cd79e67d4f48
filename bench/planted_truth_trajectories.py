"""Median trajectory statistics of the planted truth's spanning features, per harvest manifest.

Usage: python bench/planted_truth_trajectories.py MANIFEST...  (prints JSON). Also draws
2,000 spanning features with the same parameters (n_spanning raised) to read the full-span
(span = n_layers) medians on more than the few the manifest plants.
"""

import json
import sys

import numpy as np

from pipeline.evaluation.trajectories import trajectory_stats
from pipeline.harvest.planted import KINDS, planted_features
from pipeline.manifests.harvest import load_harvest_manifest

out = {}
for path in sys.argv[1:]:
    spec = load_harvest_manifest(path).model.planted_spec
    many = spec.model_copy(update={"n_spanning": 2000})
    for label, s, full in (("as planted", spec, False), ("2,000 drawn, span = L", many, True)):
        f = planted_features(s)
        keep = f.kind == KINDS.index("spanning")
        if full:
            keep &= f.span == s.n_layers
        t = trajectory_stats(f.directions[keep]).columns()
        out.setdefault(path, {})[label] = {
            "n": int(keep.sum()),
            **{k: round(float(np.nanmedian(v)), 3) for k, v in t.items()},
        }
print(json.dumps(out, indent=1))
