"""Layer 5 of 7: the train spec, loader and readers, trainer, checkpoints, DDP and exports.

Imports only the layers below: manifests, store, harvest, coders (and ``pipeline.paths``).
"""
