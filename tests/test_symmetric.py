"""info_nce(symmetric=True): CLIP's two-directional loss, with the rules applied to both directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastneg
from helpers import TRITON_DEVICE, make_problem, max_error


def _grads(backend: str, q0: torch.Tensor, k0: torch.Tensor, dtype: torch.dtype, **kw):  # noqa: ANN202
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q = q0.to(device, dtype).clone().requires_grad_()
    k = k0.to(device, dtype).clone().requires_grad_()
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    loss = fastneg.info_nce(q, k, symmetric=True, backend=backend, reduction="sum", **kw)
    loss.backward()
    return loss.detach().double().cpu(), q.grad.double().cpu(), k.grad.double().cpu()


def test_plain_symmetric_is_clip_loss() -> None:
    p = make_problem(24, 24, 16, seed=0, shuffled_positives=False)
    q, k = p.query.clone().requires_grad_(), p.keys.clone().requires_grad_()
    logits = q @ k.T / 0.07
    target = torch.arange(24)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    ours = fastneg.info_nce(q, k, temperature=0.07, symmetric=True)
    assert float((ours - clip).detach().abs()) < 1e-10
    gq, gk = torch.autograd.grad(clip, (q, k))
    oq, ok = torch.autograd.grad(fastneg.info_nce(q, k, temperature=0.07, symmetric=True), (q, k))
    assert max_error(oq, gq) < 1e-10 and max_error(ok, gk) < 1e-10


def test_extra_keys_take_part_in_the_row_direction_only() -> None:
    """N > B: keys that are nobody's positive are negatives of the rows, and have no column term."""
    p = make_problem(10, 30, 8, seed=1)
    q, k = p.query, p.keys
    logits = q @ k.T / 0.05
    rows = F.cross_entropy(logits, p.positives, reduction="none")
    cols = F.cross_entropy(logits[:, p.positives].T, torch.arange(10), reduction="none")
    ours = fastneg.info_nce(q, k, p.positives, symmetric=True, reduction="none")
    assert max_error(ours, (rows + cols) / 2) < 1e-10


def test_labels_mask_the_column_direction() -> None:
    """Queries 0 and 1 share a label: in column p_0, query 1 is a false negative and is masked."""
    p = make_problem(6, 6, 8, seed=2, shuffled_positives=False)
    labels = torch.tensor([7, 7, 1, 2, 3, 4])
    ours = fastneg.info_nce(p.query, p.keys, symmetric=True, key_labels=labels, reduction="none")
    logits = p.query @ p.keys.T / 0.05
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(6, dtype=torch.bool)
    masked = logits.masked_fill(same & ~eye, float("-inf"))
    want = (F.cross_entropy(masked, torch.arange(6), reduction="none")
            + F.cross_entropy(masked.T, torch.arange(6), reduction="none")) / 2
    assert max_error(ours, want) < 1e-10


RULES = [
    {},
    {"key_labels": "labels", "margin": 0.1},
    {"relative_margin": 0.05, "weighting": fastneg.SimANS(1.0, 0.1)},
    {"guide": True, "weighting": fastneg.Hardness(3.0)},
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("rule", range(len(RULES)))
def test_fused_symmetric_matches_the_reference(backend: str, rule: int) -> None:
    spec = dict(RULES[rule])
    p = make_problem(37, 70, 19, seed=rule, labels=9 if spec.pop("key_labels", None) else None,
                     guide_dim=8 if spec.pop("guide", False) else None, peaked=True)
    extra = {n: v for n, v in p.extra.items()}
    truth = _grads("reference", p.query, p.keys, torch.float64, positives=p.positives, **extra, **spec)
    plain = _grads("reference", p.query.float().double(), p.keys.float().double(), torch.float32,
                   positives=p.positives, **{n: (v.float() if v.is_floating_point() else v) for n, v in extra.items()},
                   **spec)
    got = _grads(backend, p.query, p.keys, torch.float32, positives=p.positives,
                 **{n: (v.float() if v.is_floating_point() else v) for n, v in extra.items()}, **spec)
    for g, pl, t in zip(got, plain, truth):
        assert max_error(g, t) <= 2 * max_error(pl, t) + 2e-5 * max(1.0, float(t.abs().max()))


def test_symmetric_bad_input() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="distinct positives"):
        fastneg.info_nce(q, k, torch.tensor([0, 1, 1, 2]), symmetric=True)
    with pytest.raises(ValueError, match="negatives"):
        fastneg.info_nce(q, k, symmetric=True, negatives=torch.zeros(4, 2, dtype=torch.long))
