"""Large and multi-GPU batches: keys gathered from every rank with gradient (:mod:`.gather`, used by
``info_nce(process_group=...)``), and the gradient cache for batches larger than activation memory
(:mod:`.cached`, :func:`cached_loss`), and negatives drawn from keys spread over ranks, merged
exactly (:mod:`.sharded`, used by ``sample_negatives`` / ``mine_hard_negatives`` with
``process_group``). One implementation of each; the integrations call these."""

from .cached import cached_loss
from .gather import all_gather, all_gather_with_grad, distributed_info_nce, gather_sizes, rank, world_size
from .sharded import shard_bounds

__all__ = ["cached_loss", "all_gather", "all_gather_with_grad", "distributed_info_nce", "gather_sizes", "rank",
           "world_size", "shard_bounds"]
