"""Small models shipped with l3d_lens (trained here), with their data generators."""

from . import induction

__all__ = ["induction"]
