"""Layer 1 of 7 (bottom): strict manifest reading and the harvest spec that keys every cache.

Imports no other sub-package.
"""
