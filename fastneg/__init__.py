"""fastneg: fused contrastive losses with false-negative masking and SimANS-style weighting.

In-batch similarity, masking and weighting are computed in one pass over score tiles
(Triton on CUDA, C++ on CPU, plain PyTorch on any other device), never materialising the
[B, N] similarity matrix.
"""

from . import presets
from .functional import InfoNCE, InfoNCEStats, info_nce
from .mining import MinedNegatives, mine_hard_negatives
from .options import GCSE, HCL, Hardness, SimANS, SoftLabels
from .rules import Rules
from .sampling import sample_negatives
from .version import __version__

__all__ = ["info_nce", "InfoNCE", "InfoNCEStats", "SimANS", "Hardness", "HCL", "GCSE", "SoftLabels", "Rules", "presets",
           "sample_negatives", "mine_hard_negatives", "MinedNegatives", "__version__"]
