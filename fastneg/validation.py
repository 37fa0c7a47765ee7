"""Input checks of the public functions (SPEC section 7): each error names the argument at fault."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .plan import MAX_LABEL_LEVELS, Plan

__all__ = ["BACKENDS", "validate_inputs", "check_reduction", "check_backend", "check_negatives", "check_num_negatives",
           "check_exclude", "check_attract_inputs", "check_loss_exclude", "check_symmetric_inputs"]

_REDUCTIONS = ("mean", "sum", "none")
#: every backend name a call accepts (fastneg.backends)
BACKENDS = ("auto", "triton", "cpu", "portable", "reference")


def check_reduction(reduction: object) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_matrix(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _check_index_tensor(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like query, got {t.device}")
    return t


def _check_index_vector(name: str, t: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    t = _check_index_tensor(name, t, device)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], got {tuple(t.shape)}")
    return t


def _check_labels(name: str, t: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    """Labels are [rows] or [rows, levels] (several label sets, OR-ed: a key is masked when any level matches)."""
    t = _check_index_tensor(name, t, device)
    if t.dim() == 1 and t.shape[0] == length:
        return t
    if t.dim() == 2 and t.shape[0] == length and 1 <= t.shape[1] <= MAX_LABEL_LEVELS:
        return t
    raise ValueError(
        f"{name} must have shape [{length_name}] = [{length}] or [{length_name}, levels] with 1 <= levels <= "
        f"{MAX_LABEL_LEVELS}, got {tuple(t.shape)}")


def _check_key_lists(name: str, t: object, width: str, B: int, N: int, device: torch.device) -> None:
    """[B, width] key indices in [0, N), -1 for none."""
    t = _check_index_tensor(name, t, device)
    if t.dim() != 2 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape [B, {width}] with B = {B}, got {tuple(t.shape)}")
    if not _is_compiling() and t.numel() and bool(((t < -1) | (t >= N)).any()):
        raise ValueError(f"{name} must be key indices in [0, N) = [0, {N}) or -1 for none")


def check_negatives(negatives: object, B: int, N: int, device: torch.device) -> None:
    _check_key_lists("negatives", negatives, "K", B, N, device)


def check_num_negatives(num_negatives: object) -> None:
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")


def check_exclude(exclude: object, B: int, N: int, device: torch.device) -> None:
    _check_key_lists("exclude", exclude, "E", B, N, device)


def check_backend_dtype(chosen: str, dtype: torch.dtype, verb: str) -> None:
    """The Triton kernels compute in float32 at most (the sampler packs float32 scores into int64
    sort keys): ``backend='triton'`` refuses float64 rather than return float32's result."""
    if chosen == "triton" and dtype == torch.float64:
        raise TypeError(f"query: backend='triton' {verb} float16, bfloat16 or float32, got float64; "
                        "use backend='cpu' (or 'auto') for float64")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def validate_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
    allow_empty: bool = False,
    local_positives: bool = True,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the offending argument (SPEC section 7).
    ``allow_empty``: a rank of a process group may hold no rows (checked across the group).
    ``local_positives=False``: ``positives`` index every rank's keys (checked by the caller)."""
    _check_matrix("query", query)
    _check_matrix("keys", keys)
    B, D = query.shape
    N = keys.shape[0]
    if keys.shape[1] != D:
        raise ValueError(f"keys must have the same embedding dim as query ({D}), got {keys.shape[1]}")
    if keys.dtype != query.dtype:
        raise TypeError(f"keys must have the same dtype as query ({query.dtype}), got {keys.dtype}")
    if keys.device != query.device:
        raise ValueError(f"keys must be on the same device as query ({query.device}), got {keys.device}")
    if B == 0 and not allow_empty:
        raise ValueError("query must have at least one row, got an empty query")
    if N == 0 and not allow_empty:
        raise ValueError("keys must have at least one row, got empty keys")
    if D == 0:
        raise ValueError("query and keys must have embedding dim >= 1, got 0")
    if query.dtype == torch.float64 and query.device.type != "cpu":
        raise TypeError("query: float64 is supported on CPU only; use float32, float16 or bfloat16 on GPU")

    if not local_positives:
        pass
    elif positives is None:
        if N < B:
            raise ValueError(
                f"positives defaults to arange(B), which requires keys.shape[0] >= query.shape[0]; got N={N} < B={B}")
    else:
        _check_index_vector("positives", positives, B, "B", query.device)
        if not _is_compiling():
            if bool(((positives < 0) | (positives >= N)).any()):
                raise ValueError(f"positives must be in [0, N) = [0, {N}), got values outside that range")

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar (one element), got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        if temperature.device != query.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature must be on {query.device} or the CPU, got {temperature.device}")
        if not _is_compiling():
            t = float(temperature.detach().reshape(()).item())
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"temperature must be finite and > 0, got {t}")
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float or a scalar tensor, got {type(temperature).__name__}")
        if not (math.isfinite(float(temperature)) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")

    if key_labels is not None:
        _check_labels("key_labels", key_labels, N, "N", query.device)
    if query_labels is not None:
        if key_labels is None:
            raise ValueError("query_labels requires key_labels (the labels of the keys to compare against)")
        _check_labels("query_labels", query_labels, B, "B", query.device)
        if query_labels.dim() != key_labels.dim() or (query_labels.dim() == 2 and query_labels.shape[1] != key_labels.shape[1]):
            raise ValueError(
                f"query_labels must have as many label levels as key_labels: got shapes {tuple(query_labels.shape)} "
                f"and {tuple(key_labels.shape)}")

    if (guide_query is None) != (guide_keys is None):
        raise ValueError("guide_query and guide_keys must be given together")
    if guide_query is not None:
        assert guide_keys is not None
        _check_matrix("guide_query", guide_query)
        _check_matrix("guide_keys", guide_keys)
        if guide_query.shape[0] != B:
            raise ValueError(f"guide_query must have B = {B} rows, got {guide_query.shape[0]}")
        if guide_keys.shape[0] != N:
            raise ValueError(f"guide_keys must have N = {N} rows, got {guide_keys.shape[0]}")
        if guide_keys.shape[1] != guide_query.shape[1]:
            raise ValueError(
                f"guide_keys must have the same dim as guide_query ({guide_query.shape[1]}), got {guide_keys.shape[1]}"
            )
        for name, g in (("guide_query", guide_query), ("guide_keys", guide_keys)):
            if g.device != query.device:
                raise ValueError(f"{name} must be on {query.device} like query, got {g.device}")


def check_attract_inputs(plan: Plan, negatives: Optional[torch.Tensor]) -> None:
    if plan.attract and negatives is not None:
        raise ValueError("false_negatives='attract' cannot be combined with negatives=")


def check_loss_exclude(exclude: object, symmetric: bool, negatives: Optional[torch.Tensor],
                       positives: Optional[torch.Tensor], B: int, N: int, device: torch.device) -> None:
    """The loss's ``exclude``: [B] key columns (-1 = none), never the row's own positive."""
    if exclude is None:
        return
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be a LongTensor [B], got {type(exclude).__name__}")
    if exclude.dtype not in (torch.int64, torch.int32) or exclude.reshape(-1).shape[0] != B or exclude.dim() > 2:
        raise ValueError(f"exclude must be an int64 tensor of shape [B] = [{B}], got {exclude.dtype} {tuple(exclude.shape)}")
    if exclude.device != device:
        raise ValueError(f"exclude must be on {device}, got {exclude.device}")
    if symmetric:
        raise ValueError("exclude cannot be combined with symmetric=True")
    if negatives is not None:
        raise ValueError("exclude cannot be combined with negatives= (list only the keys the row should see)")
    if not _is_compiling() and B:
        ex = exclude.reshape(-1).long()
        if bool(((ex < -1) | (ex >= N)).any()):
            raise ValueError(f"exclude must hold key columns in [0, {N}) or -1 (none)")
        pos = torch.arange(B, device=device) if positives is None else positives.reshape(-1).long()
        if bool((ex == pos).any()):
            raise ValueError("exclude must not name a row's own positive")


def check_symmetric_inputs(positives: Optional[torch.Tensor], negatives: Optional[torch.Tensor], B: int) -> None:
    if negatives is not None:
        raise ValueError("symmetric=True cannot be combined with negatives= (the key-to-query direction has no list)")
    if positives is not None and not _is_compiling() and B and int(positives.unique().numel()) != B:
        raise ValueError("symmetric=True needs distinct positives: each key may be the positive of one query only")
