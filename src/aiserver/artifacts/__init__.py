"""Artifacts: the content-addressed output store and the variants cache."""

from aiserver.artifacts.spec import Fit, VariantPolicy, VariantSpec, build_spec, parse_spec
from aiserver.artifacts.store import ArtifactStore, artifact_not_found
from aiserver.artifacts.variants import Variant, VariantCache

__all__ = [
    "ArtifactStore",
    "Fit",
    "Variant",
    "VariantCache",
    "VariantPolicy",
    "VariantSpec",
    "artifact_not_found",
    "build_spec",
    "parse_spec",
]
