"""Layer 3 of 7: models, text, token windows and planted truth written block by block into a store.

Imports only ``pipeline.manifests`` and ``pipeline.store`` (and ``pipeline.paths``).
"""
