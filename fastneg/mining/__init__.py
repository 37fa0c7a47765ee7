"""Hard-negative mining from a corpus with FAISS under the loss's rules (:func:`mine_hard_negatives`),
and the ``fastneg mine`` command (:mod:`.cli`)."""

from .miner import MinedNegatives, build_index, mine_hard_negatives

__all__ = ["mine_hard_negatives", "MinedNegatives", "build_index"]
