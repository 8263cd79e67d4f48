"""Run a training manifest slowly enough that a test can SIGKILL it mid-run (test-only)."""

import sys
import time
from pathlib import Path

from pipeline.training.manifest import CoderManifest
from pipeline.training.trainer import CoderRun
from stages import train

original_step = CoderRun.train_step


def slow_step(self, batch):
    time.sleep(0.03)
    return original_step(self, batch)


CoderRun.train_step = slow_step
manifest = CoderManifest.model_validate_json(Path(sys.argv[1]).read_text())
train.run([(manifest, Path(sys.argv[1]).parent)])
