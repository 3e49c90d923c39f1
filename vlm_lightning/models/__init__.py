"""Model loading, LoRA and the per-family table."""

from .families import FAMILIES, FamilySpec, get_family_spec
