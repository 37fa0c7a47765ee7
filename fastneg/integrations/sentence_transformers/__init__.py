"""Drop-in replacements for sentence-transformers' in-batch-negative losses.

::

    from fastneg.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)                      # same numbers as the original
    loss = MultipleNegativesRankingLoss(model, mask_duplicates=True,  # and what it lacks
                                        margin=0.05, weighting=fastneg.SimANS())

Each class **is** the sentence-transformers (6.x) loss of the same name (a subclass of it): the
constructor, the attributes (assignable after construction, as in the original), the error
messages, the merged column forward, the gradient cache with its ``embed_minibatch`` /
``embed_minibatch_iter`` / ``calculate_loss`` / ``calculate_loss_and_cache_gradients`` contract,
``sim_matrix`` / ``similarity_fct`` / ``cross_entropy_loss`` on the GIST classes, the refusal of
a ``StaticEmbedding`` behind a router, and the model-card config are the original's. What fastneg
replaces is the score-matrix stage: every score block of a row (query -> documents, -> queries,
document -> queries, -> documents; GIST's anchor-anchor and positive-positive) is **one** call of
the fused op (see :mod:`.scores`), so the loss needs memory linear in the
batch instead of the originals' B x N matrices (per mini-batch in the cached ones).

fastneg's own keyword arguments, on every class:

- ``mask_duplicates``: hash each column's token ids before embedding and mask keys whose text is
  identical to the row's positive (document columns) or to the row's query (query columns), so
  batches need no de-duplicating sampler. Needs ``forward`` (the hashes come from the features);
  ``compute_loss_from_embeddings`` takes them as ``hashes=``.
- ``margin``, ``relative_margin``, ``max_score`` (SPEC section 2; on GIST the first is called
  ``score_margin``, since GIST's ``margin`` is the guide's): compared with each row's positive
  score in every block, raw similarities (cosine by default).
- ``weighting``: ``None``, ``"simans"``, :class:`fastneg.SimANS` or :class:`fastneg.Hardness`
  over every block (not together with ``hardness_mode``, which is itself a weighting).
- ``backend``: as in :func:`fastneg.info_nce`.
- the ranking classes only: ``mask_labels`` (the dataset's ``label`` column, one integer group
  per row, as the trainer passes it: a row's query and positive are false negatives of every
  other row with its label; hard-negative columns stay negatives) and ``false_negatives``
  (``"mask"``, or ``"attract"``: the flagged keys become positives; not with the structural
  exclusions of ``query_to_query`` / ``doc_to_doc`` or a hardness mode that splits the row's own
  hard negatives off).

``mask_duplicates`` reads padded features (2-D ``input_ids``) and a ``StaticEmbedding``'s flat
ones (1-D ``input_ids`` with ``offsets``).

``get_config_dict()`` returns the original's keys, plus those of fastneg's that differ from
their defaults (``mask_duplicates``, ``margin`` / ``score_margin``, ``relative_margin``,
``max_score``, ``weighting``, ``mask_labels``, ``false_negatives``), so a model card records
them; with fastneg's defaults it is the original's dict. ``citation`` is the original's BibTeX
plus an entry naming fastneg's class and the original loss it replaces, with the original's
documentation link.

When the fused op is used, and when not: the fused op computes dot products, so
``similarity_fct`` ``util.cos_sim`` / ``pytorch_cos_sim`` (on normalised embeddings) and
``util.dot_score`` (and ``functools.partial`` of them without arguments) are fused; on the GIST
classes, the default ``nn.CosineSimilarity(dim=-1)``, ``sim_matrix`` and
``nn.CrossEntropyLoss()``. Any other similarity (``util.euclidean_sim``, ``util.manhattan_sim``,
a lambda; none of sentence-transformers' others is a dot product after a transform of each side),
a ``sim_matrix`` or ``cross_entropy_loss`` replaced on the instance or in a subclass, or a GIST
``temperature <= 0`` run the original's own dense computation, with a one-time warning that its
memory is quadratic in the batch. With fastneg's rules and an unfused similarity, the ranking
losses apply the rules densely to ``similarity_fct``'s scores (fastneg's dense reference) for
``directions=("query_to_doc",)`` without ``hardness_mode``; other layouts, and the GIST classes,
raise a ``ValueError`` naming ``similarity_fct``.

Gathering across devices uses the original modules' ``all_gather_with_grad`` / ``get_rank``, as
the originals do. Needs sentence-transformers >= 6 (the ``sentence_transformers.sentence_transformer``
package layout).
"""

from ._common import _warned, fused_similarity, text_hashes
from .gist import CachedGISTEmbedLoss, GISTEmbedLoss
from .mining import mine_hard_negatives
from .ranking import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)

__all__ = [
    "mine_hard_negatives",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "CachedGISTEmbedLoss",
    "text_hashes",
    "fused_similarity",
    "_warned",
]
