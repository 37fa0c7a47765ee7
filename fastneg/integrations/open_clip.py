"""A drop-in replacement for open_clip's ``ClipLoss``, computed by fastneg's fused symmetric loss.

::

    from fastneg.integrations.open_clip import ClipLoss
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, logit_scale)            # open_clip's numbers
    loss = loss_fn(image_features, text_features, logit_scale, labels=caption_ids)  # duplicate captions masked

Same constructor (``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank``, ``world_size``,
``use_horovod``) and ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)`` as open_clip 3.x's ``ClipLoss``, and the same loss and gradients (``logit_scale``
included): the mean of the image-to-text and text-to-image cross-entropies over
``logit_scale * image @ text.T``, computed by :func:`fastneg.info_nce` (``temperature = 1 /
logit_scale``, a tensor, so it is learned) without the ``B x B`` logits. Across ranks the features
are gathered as open_clip gathers them (with or without gradient, the local block reinserted when
it has none), then ``local_loss=True`` contrasts this rank's rows against every rank's (two fused
calls), ``local_loss=False`` the whole gathered batch (one fused symmetric call).

``logit_bias`` (SigLIP-style models that pass one to the CLIP loss) adds the same constant to every
logit, which softmax cross-entropy ignores: the loss is unchanged and ``logit_bias`` receives a zero
gradient, as in the original up to rounding. ``use_horovod`` is not supported (a ``ValueError``).
This module does not import open_clip.

fastneg's rules as keyword arguments: ``labels=`` per call (e.g. ids of duplicate captions or of
the same image: a pair with equal labels is masked in both directions, the positive never), and at
construction ``margin``, ``relative_margin``, ``max_score``, ``weighting`` (SPEC sections 2-3), or
a :class:`fastneg.Rules` setting those (``rules=``; any other field is refused), and ``backend``,
applied in both directions.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..functional import info_nce
from ..parallel import all_gather
from ..rules import Rules, check_carried, resolve_rules
from ..validation import check_backend

__all__ = ["ClipLoss", "gather_features"]


def gather_features(image_features: Tensor, text_features: Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
    """Every rank's features, as open_clip's ``gather_features`` returns them (torch.distributed):
    with ``gather_with_grad``, through the autograd-aware all-gather; otherwise without gradient,
    with this rank's own block put back (keeping its gradient) unless ``local_loss``."""
    import torch.distributed as dist
    import torch.distributed.nn

    if gather_with_grad:
        return (torch.cat(torch.distributed.nn.all_gather(image_features), 0),
                torch.cat(torch.distributed.nn.all_gather(text_features), 0))
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features)
    dist.all_gather(texts, text_features)
    if not local_loss:
        images[rank] = image_features
        texts[rank] = text_features
    return torch.cat(images, 0), torch.cat(texts, 0)


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` on fastneg's fused op (module docstring)."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        weighting: object = None,
        backend: str = "auto",
        rules: Optional[Rules] = None,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: fastneg's ClipLoss gathers with torch.distributed only")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # kept for the interface: fastneg builds no label tensor of logits
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.rules = resolve_rules("ClipLoss", rules, margin=margin, relative_margin=relative_margin,
                                   max_score=max_score, weighting=weighting)  # validated now
        check_carried("ClipLoss", self.rules, ("margin", "relative_margin", "max_score", "weighting"))
        check_backend(backend)
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False, *,
                labels: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        scale = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
        temperature = 1.0 / scale.reshape(()).to(image_features.device)
        opts: dict[str, Any] = dict(temperature=temperature, backend=self.backend, rules=self.rules)
        B = image_features.shape[0]
        if self.world_size > 1:
            images, texts = gather_features(image_features, text_features, self.local_loss, self.gather_with_grad,
                                            self.rank, self.world_size)
            all_labels = all_gather(labels) if labels is not None else None
            if self.local_loss:
                positives = torch.arange(B, device=image_features.device) + B * self.rank
                lab = dict(query_labels=labels, key_labels=all_labels) if labels is not None else {}
                loss = (info_nce(image_features, texts, positives, **lab, **opts)
                        + info_nce(text_features, images, positives, **lab, **opts)) / 2
            else:
                lab = dict(query_labels=all_labels, key_labels=all_labels) if all_labels is not None else {}
                loss = info_nce(images, texts, symmetric=True, **lab, **opts)
        else:
            lab = dict(query_labels=labels, key_labels=labels) if labels is not None else {}
            loss = info_nce(image_features, text_features, symmetric=True, **lab, **opts)
        if logit_bias is not None and isinstance(logit_bias, Tensor):
            loss = loss + 0.0 * logit_bias.sum()  # a constant shift of every logit: no effect, zero gradient
        return {"contrastive_loss": loss} if output_dict else loss
