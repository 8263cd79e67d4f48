"""Layer 6 of 7: metrics over held-out tokens, layer-basis floors, latent pages and the report.

Imports only the layers below: manifests, store, harvest, coders, training.
"""
