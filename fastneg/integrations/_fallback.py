"""The integrations' one-time warning when a loss runs its original (dense) computation."""

from __future__ import annotations

import warnings

__all__ = ["warn_dense_once"]

_warned: set[str] = set()


def warn_dense_once(loss: object, why: str, computation: str) -> None:
    """Warn once per loss class and reason that ``computation`` (the original's) runs instead of the fused op."""
    key = f"{type(loss).__name__}:{why}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{type(loss).__name__}: {why}, so the loss runs {computation} (memory quadratic in the batch) "
                      "instead of fastneg's fused op", stacklevel=4)
