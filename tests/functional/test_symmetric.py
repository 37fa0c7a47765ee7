"""info_nce(symmetric=True): CLIP's two-directional loss, with the rules applied to both directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastneg
from helpers import RULES, TRITON_DEVICE, build, check, make_problem, max_error


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


# --- the fused kernels against the dense reference (rules applied to both directions) ----------

@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_symmetric_rules(rule: str, dtype: torch.dtype) -> None:
    # 130 rows: three row blocks in two thread groups, whose column partials are merged; 530 keys: three tiles
    problem, options = build(rule, 130, 530, 33, seed=5, peaked=True)
    check(problem, "cpu", dtype, symmetric=True, **options)


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (70, 70, 33), (200, 260, 16)])
def test_cpu_symmetric_ragged_shapes(shape: tuple[int, int, int]) -> None:
    problem, options = build("all_rules_simans", *shape, seed=6)
    check(problem, "cpu", torch.float32, symmetric=True, **options)


def test_cpu_symmetric_half_inputs() -> None:
    problem, options = build("labels", 70, 90, 16, seed=7, peaked=True)
    check(problem, "cpu", torch.bfloat16, symmetric=True, **options)


TRITON_RULES = ["plain", "label_levels", "max_score", "guide_relative", "hardness", "all_rules_simans"]


@pytest.mark.parametrize("rule", TRITON_RULES)
def test_triton_symmetric_rules(rule: str) -> None:
    # interpreter tiles are 16 x 16: 3 row blocks over 2 programs, 5 key tiles
    problem, options = build(rule, 37, 70, 19, seed=8, peaked=True)
    check(problem, "triton", torch.float32, symmetric=True, **options)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    # the interpreter cannot run bfloat16 dots (numpy has no bfloat16): GPU only
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
])
def test_triton_symmetric_half_precision(dtype: torch.dtype) -> None:
    problem, options = build("simans", 20, 40, 16, seed=9, peaked=True)
    check(problem, "triton", dtype, symmetric=True, **options)


@pytest.mark.parametrize("backend", ["cpu", "triton", "portable"])
def test_fully_masked_rows_and_columns(backend: str) -> None:
    """All queries share one label: every row and every column has only its positive left."""
    problem = make_problem(20, 30, 8, seed=10)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q = problem.query.float().to(device).requires_grad_()
    k = problem.keys.float().to(device).requires_grad_()
    labels = torch.zeros(30, dtype=torch.long, device=device)
    loss = fastneg.info_nce(q, k, problem.positives.to(device), key_labels=labels, weighting="simans",
                            symmetric=True, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.equal(loss.detach().cpu(), torch.zeros(20))
    assert torch.equal(q.grad.cpu(), torch.zeros_like(q.grad.cpu()))
    assert torch.equal(k.grad.cpu(), torch.zeros_like(k.grad.cpu()))


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace == "fastneg":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_symmetric_is_one_fused_call_each_way() -> None:
    """One forward op call (rows and columns from the same tiles) and one backward call."""
    problem = make_problem(100, 150, 16, seed=11)
    q, k = problem.query.float().requires_grad_(), problem.keys.float().requires_grad_()
    with _CountOps() as mode:
        loss = fastneg.info_nce(q, k, problem.positives, margin=0.1, symmetric=True, backend="cpu")
        loss.backward()
    assert [c.split(".")[0] for c in mode.calls] == ["info_nce_fwd_cpu", "info_nce_bwd_cpu"]


def test_thread_count_changes_only_rounding() -> None:
    """Column partials are merged per thread group: another thread count merges differently
    (rounding only); the same thread count gives the same bits."""
    problem, options = build("all_rules_simans", 300, 400, 24, seed=12)
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 3):
            torch.set_num_threads(threads)
            q, k = problem.query.clone().requires_grad_(), problem.keys.clone().requires_grad_()
            loss = fastneg.info_nce(q, k, problem.positives, symmetric=True, backend="cpu", **problem.extra, **options)
            loss.backward()
            results.setdefault(threads, []).append((loss.detach(), q.grad, k.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results[3]):
        assert torch.equal(a, b)
    for a, b in zip(results[1][0], results[3][0]):
        assert max_error(a, b) < 1e-12 * max(1.0, float(b.abs().max()))


def test_symmetric_bad_input() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="distinct positives"):
        fastneg.info_nce(q, k, torch.tensor([0, 1, 1, 2]), symmetric=True)
    with pytest.raises(ValueError, match="negatives"):
        fastneg.info_nce(q, k, symmetric=True, negatives=torch.zeros(4, 2, dtype=torch.long))
