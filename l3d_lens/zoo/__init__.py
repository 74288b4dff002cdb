"""Small models shipped with l3d_lens (trained here), with their data generators."""

from . import induction, two_tasks

__all__ = ["induction", "two_tasks"]
