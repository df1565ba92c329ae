"""Model families: one adapter per family (``base.ModelFamily``), looked up by the diffusers class name."""

from __future__ import annotations

from .base import ROLES, InputSpec, ModelFamily, Signature, TimestepDomain
from .dit import DIT, DiTFamily
from .pixart import PIXART, PixArtFamily

FAMILIES: dict[str, ModelFamily] = {name: family for family in (DIT, PIXART) for name in family.model_classes}


def family_for(model_class: str) -> ModelFamily:
    """The adapter of a diffusers model class; a class no family takes is refused by the loader first."""
    try:
        return FAMILIES[model_class]
    except KeyError:
        raise KeyError(f"no model family takes {model_class}; supported: {', '.join(FAMILIES)}") from None


__all__ = ["DIT", "FAMILIES", "PIXART", "ROLES", "DiTFamily", "InputSpec", "ModelFamily", "PixArtFamily", "Signature",
           "TimestepDomain", "family_for"]
