"""The dense reference: SPEC written out with a materialised [B, N] matrix, obviously correct and
differentiable through plain autograd. The fused backends are tested against it, it is the
``backend="reference"`` of every public function, and :mod:`.rules` holds the rules' Python form."""

from .loss import info_nce_gathered, info_nce_reference, rows_from_scores
from .rules import false_negative_mask, guide_threshold, label_match, score_threshold, simans_log_weight
from .sampling import gumbel_noise, sample_negatives_reference

__all__ = ["info_nce_reference", "info_nce_gathered", "rows_from_scores", "false_negative_mask", "score_threshold",
           "guide_threshold", "label_match", "simans_log_weight", "sample_negatives_reference", "gumbel_noise"]
