"""l3d_lens: Local Loss Landscape Decomposition (L3D) for TransformerLens models.

Find the low-rank parameter-space subnetworks whose few active ones reconstruct each
sample's gradient of divergence from a reference output.

    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=10)
    dec = l3d_lens.decompose(model, tokens, cfg)
"""

from .config import L3DConfig
from .decomposition import Decomposition, decompose
from .patching import PatchingComparison, compare_with_patching
from .viz import report, show

__version__ = "0.1.0"
__all__ = ["L3DConfig", "Decomposition", "decompose", "compare_with_patching", "PatchingComparison", "report",
           "show", "__version__"]
