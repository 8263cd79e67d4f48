"""One reader per loader mode behind one interface (``Reader``); pipeline/training/loader.py picks.

* ``resident``: the split decoded once onto the device, shuffled there (resident.py);
* ``memmap``: the split decoded once into an uncompressed file, served by sorted random-row
  gathers (memmap.py, decoded_file.py);
* ``stream``: whole compressed chunks decoded per epoch into a shuffle window (stream.py).

budget.py holds the one function that chooses between them.
"""

from pipeline.training.readers.base import ChunkDecoder, Normaliser, Reader, seeded_generator
from pipeline.training.readers.budget import ModeChoice, choose_mode
from pipeline.training.readers.memmap import MemmapReader
from pipeline.training.readers.resident import ResidentReader
from pipeline.training.readers.stream import StreamReader

__all__ = [
    "ChunkDecoder",
    "MemmapReader",
    "ModeChoice",
    "Normaliser",
    "Reader",
    "ResidentReader",
    "StreamReader",
    "choose_mode",
    "seeded_generator",
]
