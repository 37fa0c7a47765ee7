"""The documented import path of the gradient cache: :func:`fastneg.parallel.cached.cached_loss`."""

from .parallel.cached import cached_loss

__all__ = ["cached_loss"]
