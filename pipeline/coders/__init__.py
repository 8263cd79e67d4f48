"""Layer 4 of 7: coder architectures, registered by name; one file holds one and its config.

Imports only ``pipeline.manifests`` (strict config typing).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from pipeline.coders.base import Coder, CoderConfigBase, LossOutput, SparseCoder
from pipeline.coders.crosscoder import Crosscoder, CrosscoderConfig
from pipeline.coders.fmxcoder import Fmxcoder, FmxcoderConfig
from pipeline.coders.per_layer_sae import PerLayerSAE, PerLayerSAEConfig

CoderConfig = Annotated[
    PerLayerSAEConfig | CrosscoderConfig | FmxcoderConfig, Field(discriminator="kind")
]

CODERS: dict[str, type[SparseCoder]] = {
    "per_layer_sae": PerLayerSAE,
    "crosscoder": Crosscoder,
    "fmxcoder": Fmxcoder,
}

_CONFIG_ADAPTER: TypeAdapter[CoderConfigBase] = TypeAdapter(CoderConfig)


def coder_config_from_dict(d: dict[str, Any]) -> CoderConfigBase:
    """Validate a dict (e.g. a manifest section or checkpoint JSON); ``kind`` picks the class."""
    return _CONFIG_ADAPTER.validate_python(d)


def build_coder(config: CoderConfigBase) -> SparseCoder:
    """A freshly initialised coder (deterministic in ``config.seed``), on the CPU."""
    kind = getattr(config, "kind", None)
    if kind not in CODERS:
        raise ValueError(f"unknown coder kind {kind!r}; expected one of {sorted(CODERS)}")
    return CODERS[kind](config)


__all__ = [
    "CODERS",
    "Coder",
    "CoderConfig",
    "CoderConfigBase",
    "Crosscoder",
    "CrosscoderConfig",
    "Fmxcoder",
    "FmxcoderConfig",
    "LossOutput",
    "PerLayerSAE",
    "PerLayerSAEConfig",
    "SparseCoder",
    "build_coder",
    "coder_config_from_dict",
]
