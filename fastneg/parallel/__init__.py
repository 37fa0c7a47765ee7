"""Large and multi-GPU batches: keys gathered from every rank with gradient (:mod:`.gather`, used by
``info_nce(process_group=...)``), and the gradient cache for batches larger than activation memory
(:mod:`.cached`, :func:`cached_loss`). One implementation of each; the integrations call these."""

from .cached import cached_loss
from .gather import all_gather, all_gather_with_grad, distributed_info_nce, gather_sizes, rank, world_size

__all__ = ["cached_loss", "all_gather", "all_gather_with_grad", "distributed_info_nce", "gather_sizes", "rank",
           "world_size"]
