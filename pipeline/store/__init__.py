"""Layer 2 of 7: the activation store's format, writer, reader, catalog and outlier scan.

Imports only ``pipeline.manifests`` (and ``pipeline.paths``).
"""
