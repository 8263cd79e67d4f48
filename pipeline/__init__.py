"""fmxcoders: harvest -> store -> loader -> coder -> checkpoint -> evaluate -> report."""

import warnings

# We choose numcodecs' Shuffle for zarr v3 on purpose (+15% compression); say so once, here.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
