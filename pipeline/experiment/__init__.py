"""Layer 7 of 7 (top): the experiment spec, the fair-comparison protocol and its tables.

Imports any layer below; only ``pipeline.api``, ``pipeline.cli`` and ``stages`` import it.
"""
